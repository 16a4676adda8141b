"""Generation metrics of a DiT run: gFVD (I3D, per clip) and gFID (Inception-v3, per frame) of
class-balanced generated clips, decoded by the frozen tokenizer, against every clip of the real
held-out split of the data the latents were encoded from.

The real split's feature statistics are the ones the tokenizer's rFVD / rFID use (the same
protocol, cached next to the dataset): a generator's gFVD and its tokenizer's rFVD are measured
against the same reference. The protocol written beside the numbers adds the sampler, its steps,
the guidance, the seed and the number of generated clips.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vitok.core import task as task_lib
from vitok.data import builders
from vitok.evals import frechet


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
    stored = builders.storage_params(data_cfg)['clip_frames']
    data_cfg.update(
        frames=task.window * task.tokenizer_cfg.parsed.q, frame_stride=1, clip_frames=stored
    )
  return data_cfg


def generation_config(config) -> ml_collections.ConfigDict:
  """config.generation, with its defaults for runs started before it existed."""
  defaults = ml_collections.ConfigDict(dict(every=0, clips=0))
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
  source = builders.prepare(data_cfg)[data_cfg.eval_split]
  count = generation_config(config).clips or len(source)
  classes = task.sample_classes()
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
    generated = frechet.clip_statistics(
        network, clips, batch, mesh, config.sharding_rules, weights
    )
    result[f'g{network.name}'] = generated.distance(real)
    result[f'{network.name}_protocol'] = dict(
        frechet.protocol(
            network, real_cfg, real.count // network.rows_per_clip(data_cfg.frames)
        ),
        generated_clips=int(count),
        classes=len(classes),
        sampler=s.sampler,
        steps=int(s.steps),
        guidance=float(s.guidance),
        seed=int(s.seed),
    )
  return result
