r"""Generate long videos with a DiT trained on windows of long videos (configs/dit.py:long_digits):
diffusion over diffusion (NUWA-XL) or autoregressive continuation (dit/long_video.py), or, with a
MATE DiT (configs/dit.py:long_digits_mate), the whole video in one pass (LinGen).

    python -m launch.sample_long --workdir=DIT_DIR --class=3 --frames=256 \
        --method=hierarchical --out=/tmp/long
    python -m launch.sample_long --workdir=DIT_DIR --class=0,3 --videos=2 --frames=256 \
        --method=autoregressive --context=1 --out=/tmp/long
    python -m launch.sample_long --workdir=MATE_DIT_DIR --class=3 --frames=256 \
        --method=direct --out=/tmp/long

The DiT generates windows of its training clip (K latent frames) at its strides; the latent
sequence is decoded by its tokenizer in overlapping, blended windows of the tokenizer's clip
length. --frames that the method cannot reach with the model's window and strides is an error
naming the nearest reachable frame counts.

Writes into --out, per video, `<method>_class<c>_<i>.mp4` and a filmstrip PNG (--filmstrip frames
evenly spaced, each labelled by nothing but its place), and `<method>.json`: the plan (its
sequential sampler calls, windows per call and their strides), the number of sequential DiT
evaluations, wall times (sampling with compilation, sampling again compiled when --timed, and
decoding). The last line printed is that JSON.
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags

from dit import long_video
from launch import common
from vitok.data import video_io

_OUT = flags.DEFINE_string('out', None, 'Directory to write the videos to.')
_CLASS = flags.DEFINE_string('class', '0', 'Class id(s) of the videos, e.g. 3 or 0,3,7.')
_VIDEOS = flags.DEFINE_integer('videos', 1, 'Videos per class.')
_FRAMES = flags.DEFINE_integer('frames', 256, 'Frames per video.')
_METHOD = flags.DEFINE_enum('method', 'hierarchical', long_video.METHODS, 'How to generate.')
_CONTEXT = flags.DEFINE_integer(
    'context', None, "Known latent frames each continuation window sees (default: the config's)."
)
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Classifier-free guidance scale (1 = none).')
_STEPS = flags.DEFINE_integer('steps', None, "Sampler steps (default: the config's).")
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed: the same seed gives the same videos.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest that restores).')
_RAW = flags.DEFINE_bool('raw', False, 'Sample with the raw parameters instead of the EMA.')
_FILMSTRIP = flags.DEFINE_integer('filmstrip', 16, 'Frames in each filmstrip PNG.')
_TIMED = flags.DEFINE_bool(
    'timed', False, 'Sample a second time, compiled, and report that wall time as well.'
)


def _classes(num_classes: int) -> list[int]:
  try:
    classes = [int(c) for c in _CLASS.value.split(',') if c.strip()]
  except ValueError:
    common.fail(f'bad flag --class={_CLASS.value}: expected class ids such as 3 or 0,3,7')
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or not classes:
    common.fail(f'bad flag --class={_CLASS.value}: class ids are in [0, {num_classes})')
  return classes


def filmstrip(video: np.ndarray, count: int) -> np.ndarray:
  """`count` frames evenly spaced over the video (first and last included), side by side."""
  index = np.unique(np.linspace(0, len(video) - 1, max(count, 1)).round().astype(int))
  return np.concatenate(list(video[index]), axis=1)


def main(argv):
  del argv
  common.quiet_library_logs()
  out = common.directory_flag('out')
  run = common.open_trained_run(_STEP.value, _RAW.value)
  task, mesh = run.task, run.layout.mesh
  if run.config.get('task') != 'dit' or not task.model_cfg.frame_mask:
    common.fail(
        f'--workdir={common.workdir()} is not a DiT trained with known frames '
        '(config.model.frame_mask): it cannot continue or fill in videos'
    )
  window = task.model_cfg.grid[0]
  q = task.tokenizer_cfg.parsed.q
  context = _CONTEXT.value or task.config.long.context
  try:
    long_video.latent_length(_FRAMES.value, q, window, task.strides or (1,), _METHOD.value)
    long_video.continuation(np.arange(window), window, context)  # checks the context
  except ValueError as e:
    common.fail(f'bad flag: {e}')
  labels = np.repeat(np.asarray(_classes(task.model_cfg.num_classes), np.int32), _VIDEOS.value)
  frozen = task.frozen(mesh)
  sampler = long_video.window_sampler(
      task, run.layout.graphdef, run.params, mesh, _GUIDANCE.value, _STEPS.value
  )

  def generate():
    return long_video.generate(
        task,
        run.layout.graphdef,
        run.params,
        frozen,
        mesh,
        labels,
        _FRAMES.value,
        _METHOD.value,
        context=context,
        seed=_SEED.value,
        sampler=sampler,
    )

  started = time.perf_counter()
  result = generate()
  first = time.perf_counter() - started
  summary = {
      'method': _METHOD.value,
      'frames': _FRAMES.value,
      'classes': sorted(set(labels.tolist())),
      'videos': int(len(labels)),
      'context': context,
      'seed': _SEED.value,
      'step': run.step,
      'ema': run.ema,
      **result.summary(),
      'sequential_dit_evaluations': long_video.sequential_calls(result.plan)
      * long_video.model_evaluations_per_call(task, _STEPS.value),
      'seconds_with_compile': round(first, 2),
  }
  if _TIMED.value:
    again = generate()
    np.testing.assert_array_equal(again.latents, result.latents)  # same seed, same videos
    summary['sampling_seconds_compiled'] = round(again.sampling_seconds, 2)
  if jax.process_index() == 0:
    for i, (video, label) in enumerate(zip(result.videos, labels)):
      name = f'{_METHOD.value}_class{label}_{i}'
      video_io.write_mp4(os.path.join(out, f'{name}.mp4'), video)
      video_io.write_png(os.path.join(out, f'{name}.png'), filmstrip(video, _FILMSTRIP.value))
    with open(os.path.join(out, f'{_METHOD.value}.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    print(f'wrote {len(labels)} video(s) of {_FRAMES.value} frames to {out}')
    print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  flags.mark_flag_as_required('out')
  common.run(main)
