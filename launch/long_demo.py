"""The long-video stages of `python -m launch.demo --long` (see launch/demo.py): long videos of
every digit generated hierarchically (diffusion over diffusion) and autoregressively by the DiT of
the demo, measured against real videos of the same length (dit/long_evaluation.py), and the
report. The commands' shared code only: flags live in launch/demo.py.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from dit import long_evaluation, long_video
from launch import tasks
from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, sharding, trainer
from vitok.data import video_io

METHODS = long_video.METHODS


def open_dit(directory: str):
  """(task, graphdef, params, step) of the finished DiT run in `directory` (its EMA), on all
  devices, data-parallel."""
  with open(os.path.join(directory, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config_checks.add_missing_defaults(config, tasks.family_of(config).base_config())
  config.mesh.shape = [-1] + [1] * (len(config.mesh.axes) - 1)
  task = tasks.make_task(config)
  mesh = sharding.make_mesh(config.mesh)
  layout = trainer.create_layout(task, config, mesh)
  checkpointer = ckpt_lib.Checkpointer(directory, create=False)
  params = checkpointer.restore_params(layout.abstract.params, ema=config.optim.ema_decay > 0)
  step = checkpointer.restored_step
  checkpointer.close()
  return task, layout.graphdef, params, mesh, step


def measure(directory: str, out: str, frames: int, per_class: int, seed: int = 0) -> dict:
  """Every class, `per_class` videos of `frames` frames by each method, timed compiled (one video,
  and all videos in one batch per call), their coherence, and the real references."""
  task, graphdef, params, mesh, step = open_dit(directory)
  frozen = task.frozen(mesh)
  classes = list(range(task.model_cfg.num_classes))
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  window, q = task.model_cfg.grid[0], task.tokenizer_cfg.parsed.q
  results = {'dit_step': step, 'frames': frames, 'videos': int(len(labels))}
  boundaries = {}
  for method in METHODS:
    sampler = long_video.window_sampler(task, graphdef, params, mesh)
    generate = lambda labels: long_video.generate(
        task, graphdef, params, frozen, mesh, labels, frames, method, seed=seed, sampler=sampler
    )
    generate(labels[:1])  # compiles the calls of one video
    one = generate(labels[:1])
    generate(labels)  # compiles the calls of the batch
    every = generate(labels)
    boundary = long_video.boundary_transitions(every.owner, q, frames)
    boundaries[method] = boundary
    results[method] = {
        **{k: v for k, v in every.summary().items() if k != 'sampling_seconds'},
        'sequential_dit_evaluations': long_video.sequential_calls(every.plan)
        * long_video.model_evaluations_per_call(task),
        'seconds_one_video': round(one.sampling_seconds, 2),
        'seconds_all_videos': round(every.sampling_seconds, 2),
        **long_evaluation.coherence(every.videos, labels, boundary),
    }
    if jax.process_index() == 0:
      _write_videos(os.path.join(out, method), every.videos, labels, per_class)
    print(f'{method}: {json.dumps(results[method])}', flush=True)
  real, real_labels = long_evaluation.real_videos(len(labels), frames, task.config.data.res)
  encode = long_evaluation.encoder(task, frozen)
  reconstructed = long_evaluation.reconstruct(task, frozen, real, encode)
  for name, videos in (('real', real), ('real_reconstructed', reconstructed)):
    results[name] = long_evaluation.coherence(videos, real_labels, None)
    for method, boundary in boundaries.items():  # true motion at the methods' seams
      jumps = long_evaluation.centroid_jumps(videos, boundary)
      results[name][f'jump_boundary_{method}'] = jumps['jump_boundary']
      results[name][f'jump_inside_{method}'] = jumps['jump_inside']
  results['window_latent_frames'] = window
  results['strides'] = list(task.strides)
  results['context'] = int(task.config.long.context)
  results['sampler'] = f'{task.config.sample.sampler}, {task.config.sample.steps} steps'
  results['guidance'] = float(task.config.sample.guidance)
  return results


def _write_videos(directory: str, videos: np.ndarray, labels: np.ndarray, per_class: int) -> None:
  """The first video of every class: an mp4 and a filmstrip of 16 frames."""
  os.makedirs(directory, exist_ok=True)
  for i in range(0, len(videos), per_class):
    video = videos[i]
    name = os.path.join(directory, f'class{labels[i]}')
    video_io.write_mp4(name + '.mp4', video)
    index = np.linspace(0, len(video) - 1, 16).round().astype(int)
    video_io.write_png(name + '.png', np.concatenate(list(video[index]), axis=1))


def report_text(long: dict, tokenizer_eval: dict, accuracy: dict | None, seconds: dict) -> str:
  """WORKDIR/report.md of the long-video demo."""
  h, a = long['hierarchical'], long['autoregressive']
  real, recon = long['real'], long['real_reconstructed']
  pct = lambda x: f'{100 * x:.1f}%'
  rows = []
  for name, m in (('hierarchical', h), ('autoregressive', a)):
    rows.append(
        f'| {name} | {m["sequential_calls"]} | {m["sequential_dit_evaluations"]} | '
        f'{m["windows"]} | {m["seconds_one_video"]:.2f} | {m["seconds_all_videos"]:.2f} | '
        f'{pct(m["class_consistency_first_quarter"])} | '
        f'{pct(m["class_consistency_last_quarter"])} | {m["jump_boundary"]:.2f} | '
        f'{m["jump_inside"]:.2f} |'
    )
  for name, m in (('real videos', real), ('real, reconstructed by the tokenizer', recon)):
    rows.append(
        f'| {name} | | | | | | {pct(m["class_consistency_first_quarter"])} | '
        f'{pct(m["class_consistency_last_quarter"])} | '
        f'{m["jump_boundary_hierarchical"]:.2f} / {m["jump_boundary_autoregressive"]:.2f} | '
        f'{m["jump_inside_hierarchical"]:.2f} / {m["jump_inside_autoregressive"]:.2f} |'
    )
  levels = lambda m: ', '.join(
      f'stride {x["stride"]}: {x["calls"]} call(s), {x["windows"]} window(s)' for x in m['levels']
  )
  times = ', '.join(
      f'{stage} {"done earlier" if value is None else value}' for stage, value in seconds.items()
  )
  short = ''
  if accuracy:
    short = (
        f'\nThe DiT alone (windows of {long["window_latent_frames"] * 4} frames, nothing known): '
        f'class accuracy {pct(accuracy["accuracy_guided"])} with guidance '
        f'{accuracy["guidance"]:g}, {pct(accuracy["accuracy_unguided"])} without; real clips '
        f'{pct(accuracy["accuracy_real"])}, reconstructed {pct(accuracy["accuracy_reconstructed"])}.\n'
    )
  return f"""# Long video: diffusion over diffusion against autoregressive extension

{long['videos']} videos of {long['frames']} frames ({long['videos'] // 10} per digit class),
generated by one DiT (step {long['dit_step']}) that was trained on windows of
{long['window_latent_frames']} latent frames from 128-frame moving-digit videos at strides
{long['strides']} (latent frames), with known frames; sampler {long['sampler']}, guidance
{long['guidance']:g}; continuation windows know {long['context']} latent frame(s).

| method | sequential sampler calls | sequential DiT evaluations | windows | s, one video | s, all videos | class, first quarter | class, last quarter | centroid jump at seams (px) | inside segments (px) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Wall times are of the sampling (compiled, on this machine), decoding excluded. Class consistency
is the share of frames an independent classifier trained on real frames assigns the requested
class; the centroid jump is the digit's move between consecutive frames, at segment seams
(consecutive frames from latent frames generated by different windows) and inside segments. For
real videos it is given at the seams of each method (hierarchical / autoregressive): true
motion, the reference.

Plans: hierarchical {levels(h)}; autoregressive {levels(a)}.
{short}
Tokenizer: held-out PSNR {tokenizer_eval['psnr']:.2f} dB (pooled codec
{tokenizer_eval.get('baseline_psnr', float('nan')):.2f} dB).

Filmstrips (16 frames evenly spaced over each video) and mp4s: `long/hierarchical/classK.png`,
`long/autoregressive/classK.png`.

Stage times (s): {times}.
"""
