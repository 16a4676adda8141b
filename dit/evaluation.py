"""The DiT's evaluators, each at its cadence `config.evals.<name>.every` in training (launch.eval
runs all of them):

- 'loss' (cheap): the objective at fixed noise levels on the held-out latents, with fixed noise;
- 'samples': a grid of generated clips per class, decoded to PNG and mp4;
- 'class_accuracy' (with `accuracy.classifier`, a judge named in JUDGES): the share of generated
  clips, with and without guidance, that the independent judge assigns to the class they were
  sampled for, beside its accuracy on real held-out clips and on their reconstructions by the
  frozen tokenizer;
- 'generation' (costly; not during training by default): gFVD (I3D, per clip) and gFID
  (Inception-v3, per frame) of class-balanced generated clips, decoded by the frozen tokenizer,
  against every clip of the real held-out split of the data the latents were encoded from. The
  real split's feature statistics are the ones the tokenizer's rFVD / rFID use (the same
  protocol, cached next to the dataset); the protocol written beside the numbers adds the
  sampler, its steps, the guidance, the seed and the number of generated clips.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dit import diffusion, encoding
from dit import latents as latents_lib
from vitok.core import task as task_lib
from vitok.data import datasets, pipeline, pixels, video_io
from vitok.evals import digit_classifier, frechet

EVAL_LEVELS = (0.1, 0.5, 0.9)  # noise levels of the 'loss' evaluator (fraction of the way to noise)
# The judges of generated clips, by config.accuracy.classifier (the names dit/settings.py accepts):
# a module with trained(frames, res) -> a judge with .accuracy(videos, labels), and
# real_clips(split, count, frames, res) -> (uint8 clips, labels).
JUDGES = {'moving_digits': digit_classifier}
EVALUATORS = ('loss', 'samples', 'class_accuracy', 'generation')  # the names of config.evals


def evaluators(task) -> list[task_lib.Evaluator]:
  """The DiT's evaluators (see the module docstring), each at its cadence, config.evals.<name>."""
  levels = tuple(f'eval_mse_{int(100 * level)}' for level in EVAL_LEVELS)
  runs = {
      'loss': (('eval_mse',) + levels, functools.partial(evaluate_loss, task)),
      'samples': ((), functools.partial(evaluate_samples, task)),
      'class_accuracy': (
          ('accuracy_guided', 'accuracy_unguided'),
          functools.partial(evaluate_class_accuracy, task, {}),
      ),
      'generation': (('gfvd', 'gfid'), functools.partial(evaluate_generation, task)),
  }
  if not task.config.accuracy.classifier:  # no judge: no class accuracy
    del runs['class_accuracy']
  return [
      task_lib.Evaluator(name, metrics=metrics, run=run, **task_lib.cadence(task.config, name))
      for name, (metrics, run) in runs.items()
  ]


def evaluate_loss(task, context: task_lib.EvalContext) -> dict:
  """The objective's MSE at fixed noise levels on the held-out latents, with fixed noise."""
  source = context.sources[task.eval_split]
  n = min(len(source), task.config.data.eval_batch_size * 4)
  if task.on_the_fly:  # the first n clips, centre-cropped, encoded in the evaluation program
    d = task.config.data
    view = pipeline.CenterClip(frames=d.frames, frame_stride=d.frame_stride, res=d.res)
    clips = [view.map(source[i]) for i in range(n)]
    batch = {k: np.stack([clip[k] for clip in clips]) for k in ('video', 'label')}
  else:
    view = (
        latents_lib.LatentWindows(task.window, task.strides).first if task.window else lambda x: x
    )
    examples = [view(source[i]) for i in range(n)]
    batch = {k: np.stack([x[k] for x in examples]) for k in examples[0] if k != 'stride'}
    if task.strides:
      batch['stride'] = np.stack([x['stride'] for x in examples])
  run = _eval_loss_fn(task, context.graphdef, context.mesh)
  per_level = jax.device_get(run(context.params, context.frozen, batch))
  result = {'step': context.step, 'split': task.eval_split, 'clips': int(n)}
  for level, value in zip(EVAL_LEVELS, per_level):
    result[f'eval_mse_{int(100 * level)}'] = float(value)
  result['eval_mse'] = float(np.mean(per_level))
  return result


def evaluate_samples(task, context: task_lib.EvalContext) -> dict:
  """`sample.per_class` clips of every class in `sample.classes`, decoded; a PNG grid (a row per
  class, the clips' frames side by side) and one mp4 per clip in WORKDIR/samples/."""
  classes = task.sample_classes
  labels = np.repeat(np.asarray(classes, np.int32), task.config.sample.per_class)
  videos = task.generate(
      context.graphdef,
      context.params,
      context.frozen,
      labels,
      context.mesh,
      seed=task.config.sample.seed,
  )
  if jax.process_index() == 0:
    directory = os.path.join(context.workdir, 'samples')
    write_sample_grid(videos, labels, directory, f'step{context.step:07d}')
  return {'samples': int(len(labels))}


def evaluate_class_accuracy(task, ceilings: dict, context: task_lib.EvalContext) -> dict:
  """`accuracy.per_class` clips of every class, sampled with the config's guidance and without
  (guidance 1), labelled by the independent classifier; beside them, once per run, the
  classifier's accuracy on real held-out clips (the ceiling) and on their reconstructions by
  the frozen tokenizer (the ceiling of anything decoded by it), measured on the first call and
  kept in `ceilings` (one dict per run's evaluator). The judge is config.accuracy.classifier's."""
  a = task.config.accuracy
  labels = np.repeat(np.asarray(task.sample_classes, np.int32), a.per_class)
  result = {'step': context.step, 'clips': int(len(labels))}
  for name, guidance in (('guided', None), ('unguided', 1.0)):
    videos = task.generate(
        context.graphdef, context.params, context.frozen, labels, context.mesh, guidance=guidance
    )
    # Trained on real clips of up to 16 frames (its SVC grows with the frames); it scores
    # clips of any length, frame by frame.
    judge = digit_classifier.trained(min(videos.shape[1], 16), videos.shape[2])
    result[f'accuracy_{name}'] = judge.accuracy(videos, labels)
  if not ceilings:
    real, real_labels = JUDGES[a.classifier].real_clips(
        task.eval_split, a.real_clips, videos.shape[1], videos.shape[2]
    )
    decoded = np.concatenate(
        [
            _reconstruct_fn(
                task.tokenizer_graphdef, task.clip_latents * task.tokenizer_cfg.parsed.q
            )(context.frozen['tokenizer'], real[i : i + 50])
            for i in range(0, len(real), 50)
        ]
    )
    ceilings.update(
        {
            'accuracy_real': judge.accuracy(real, real_labels),
            'accuracy_reconstructed': judge.accuracy(decoded, real_labels),
            'real_clips': int(len(real)),
        }
    )
  result.update(ceilings)
  result['guidance'] = float(task.config.sample.guidance)
  return result


def real_data_config(task) -> ml_collections.ConfigDict | None:
  """The data config of the real clips: config.data when the run encodes on the fly, else the
  one recorded in the latent cache's description (None when it records none)."""
  if task.on_the_fly:
    return task.config.data
  recorded = task.latents.data if task.latents is not None else None
  if not recorded:
    return None
  data_cfg = ml_collections.ConfigDict(recorded)
  if task.window:  # the DiT generates windows of the cached long videos: real clips as long
    stored = datasets.storage_params(data_cfg)['clip_frames']
    data_cfg.update(
        frames=task.window * task.tokenizer_cfg.parsed.q, frame_stride=1, clip_frames=stored
    )
  return data_cfg


def generation_config(config) -> ml_collections.ConfigDict:
  """config.generation, with its defaults for runs started before it existed."""
  defaults = ml_collections.ConfigDict(dict(clips=0))
  defaults.update(config.get('generation', {}))
  return defaults


def evaluate_generation(task, context: task_lib.EvalContext) -> dict:
  """gFVD and gFID of `generation.clips` generated clips (0: as many as the real held-out split
  has), classes in turn, sampled with the run's sampler, steps and guidance."""
  config, mesh = task.config, context.mesh
  result = {'step': int(context.step)}
  data_cfg = real_data_config(task)
  if data_cfg is None:
    reason = 'the latent cache records no data config to take real clips from'
    return dict(result, gfvd_unavailable=reason, gfid_unavailable=reason)
  real_cfg = ml_collections.ConfigDict({'data': data_cfg, 'sharding_rules': config.sharding_rules})
  source = datasets.prepare(data_cfg)[data_cfg.eval_split]
  count = generation_config(config).clips or len(source)
  classes = list(task.sample_classes)
  labels = np.asarray([classes[i % len(classes)] for i in range(count)], np.int32)
  networks = {}
  for network in (frechet.FVD, frechet.FID):
    weights, reason = frechet.load_weights(network, mesh, config.sharding_rules)
    rows = min(count, len(source)) * network.rows_per_clip(data_cfg.frames)
    if weights is None:
      result[f'g{network.name}_unavailable'] = reason
    elif rows < 2:
      result[f'g{network.name}_unavailable'] = (
          f'g{network.name} needs at least 2 feature vectors a side; got {rows}'
      )
    else:
      networks[network] = weights
  if not networks:
    return result

  # Generated in batches of one shape (the last padded with class 0, then dropped): one compile.
  batch = min(config.data.eval_batch_size, count)
  padded = np.concatenate([labels, np.full(-count % batch, classes[0], np.int32)])
  clips = np.concatenate(
      [
          task.generate(
              context.graphdef,
              context.params,
              context.frozen,
              padded[i : i + batch],
              mesh,
              seed=config.sample.seed + i,
          )
          for i in range(0, count, batch)
      ]
  )[:count]
  s = config.sample
  for network, weights in networks.items():
    real = frechet.real_statistics(network, real_cfg, source, mesh, weights)
    generated = frechet.clip_statistics(network, clips, batch, mesh, config.sharding_rules, weights)
    result[f'g{network.name}'] = generated.distance(real)
    result[f'{network.name}_protocol'] = dict(
        frechet.protocol(network, real_cfg, real.count // network.rows_per_clip(data_cfg.frames)),
        generated_clips=int(count),
        classes=len(classes),
        sampler=s.sampler,
        steps=int(s.steps),
        guidance=float(s.guidance),
        seed=int(s.seed),
    )
  return result


@functools.lru_cache(maxsize=4)
def _eval_loss_fn(task, graphdef, mesh):
  """Jitted: the mean MSE at each of EVAL_LEVELS on a batch, with fixed noise."""

  @jax.jit
  def run(params, frozen, batch):
    model = nnx.merge(graphdef, params)
    x0 = task.normalized_latents(batch, frozen)
    noise = jax.random.normal(jax.random.PRNGKey(1234), x0.shape)
    out = []
    for level in EVAL_LEVELS:
      n = x0.shape[0]
      if task.config.diffusion.objective == 'ddpm':
        step = jnp.full((n,), int(level * 999), jnp.int32)
        xt = diffusion.q_sample(task.schedule, x0, step, noise)
        out_ = model(xt, step.astype(jnp.float32), batch['label'], **task.conditions(batch))
        eps = jnp.split(out_, 2, axis=-1)[0]
        out.append(jnp.mean(jnp.square(eps - noise)))
      else:
        t = jnp.full((n,), level)
        xt = diffusion.flow_interpolate(x0, noise, t)
        v = model(xt, 1000.0 * t, batch['label'], **task.conditions(batch))
        out.append(jnp.mean(jnp.square(v - diffusion.flow_target(x0, noise))))
    return jnp.stack(out)

  return run


@functools.lru_cache(maxsize=2)
def _reconstruct_fn(tokenizer_graphdef, clip_frames: int):
  """Jitted: uint8 clips -> the frozen tokenizer's reconstructions (posterior means), uint8."""

  @jax.jit
  def run(params, videos):
    model = nnx.merge(tokenizer_graphdef, params)
    code = lambda clips: model.decode(model.encode_moments(pixels.to_unit_range(clips))[0])
    return pixels.to_uint8(encoding.in_clips(code, videos, clip_frames))

  return lambda params, videos: np.asarray(
      multihost_utils.process_allgather(run(params, videos), tiled=True)
  )


def write_sample_grid(videos: np.ndarray, labels: np.ndarray, directory: str, name: str):
  """A PNG grid (a row per class: each clip's frames side by side, clips one after another) and
  an mp4 per clip."""
  os.makedirs(directory, exist_ok=True)
  rows = []
  for label in dict.fromkeys(labels.tolist()):
    clips = videos[labels == label]
    rows.append(np.concatenate([np.concatenate(list(clip), axis=1) for clip in clips], axis=1))
  video_io.write_png(os.path.join(directory, f'{name}_grid.png'), np.concatenate(rows, axis=0))
  for i, (clip, label) in enumerate(zip(videos, labels)):
    if clip.shape[0] > 1:
      video_io.write_mp4(os.path.join(directory, f'{name}_class{label}_{i}.mp4'), clip)
  with open(os.path.join(directory, f'{name}_labels.json'), 'w') as f:
    json.dump([int(x) for x in labels], f)
