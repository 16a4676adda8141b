"""Encoding a video dataset once with a frozen tokenizer into a latent cache (dit/latents.py), as
`python -m launch.encode` and `python -m launch.demo` do: every example of the train and eval
splits, centre-cropped (no augmentation), to its posterior mean and log-variance. Resumable
(finished chunks are kept) and a finished cache is left as it is. Multi-process runs encode their
rows of every batch, with the tokenizer sharded by its rules."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from dit import latents as latents_lib
from vitok import stage1, tokenizer
from vitok.core import sharding, trainer
from vitok.data import builders, pipeline


def encode_function(frozen, mesh, batch_sharding):
  """Jitted (video uint8, label, mask) -> (mean, logvar, label, mask), the whole batch on every
  process."""
  replicated = sharding.replicated(mesh)
  model_graphdef = frozen.graphdef

  @jax.jit
  def run(params, video, label, mask):
    model = nnx.merge(model_graphdef, params)
    mean, logvar = model.encode_moments(tokenizer.to_unit_range(video))
    return jax.lax.with_sharding_constraint((mean, logvar, label, mask), replicated)

  def encode_batch(video, label, mask):
    arrays = [
        jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))
        for x in (video, label, mask)
    ]
    with sharding.activation_sharding(mesh, frozen.config.sharding_rules):
      out = run(frozen.params, *arrays)
    return jax.device_get(out)

  return encode_batch


def encode(tokenizer_dir: str, out: str, data_cfg, batch: int) -> dict:
  frozen = stage1.open_tokenizer(tokenizer_dir)
  mesh = sharding.make_mesh(frozen.config.mesh)
  data_cfg = data_cfg.copy_and_resolve_references()
  grid = frozen.task.model_cfg.latent_grid(data_cfg.frames, data_cfg.res)
  dp = int(
      np.lcm(sharding.data_parallel_size(mesh, frozen.config.sharding_rules), jax.process_count())
  )
  data_cfg.eval_batch_size = -(-batch // dp) * dp
  batch_sharding = sharding.batch_sharding(mesh, frozen.config.sharding_rules)
  print(
      f'encoding with {frozen.source}: clips {data_cfg.frames}x{data_cfg.res}x{data_cfg.res} '
      f'-> latents {grid} x {frozen.task.model_cfg.channels}',
      flush=True,
  )

  class _Data:  # trainer.prepare_data builds on process 0 first

    def prepare_data(self):
      return builders.prepare(data_cfg)

  sources = trainer.prepare_data(_Data())
  encode_batch = encode_function(frozen, mesh, batch_sharding)
  splits = {}
  for split in dict.fromkeys((data_cfg.train_split, data_cfg.eval_split)):
    source = sources[split]
    batches_from = lambda src: pipeline.eval_batches(
        data_cfg, src, jax.process_index(), jax.process_count()
    )
    splits[split] = latents_lib.encode_split(
        encode_batch, batches_from, source, out, split, data_cfg.eval_batch_size
    )
    print(f'{split}: {splits[split]} clips encoded', flush=True)
  metadata = latents_lib.Metadata(
      grid=tuple(grid),
      channels=frozen.task.model_cfg.channels,
      num_classes=int(builders.num_classes(data_cfg)),
      splits=splits,
      channel_mean=(),
      channel_std=(),
      tokenizer=os.path.abspath(tokenizer_dir),
      data=json.loads(data_cfg.to_json_best_effort()),
  )
  mean, std = latents_lib.channel_statistics(
      latents_lib.LatentSource(out, data_cfg.train_split, metadata)
  )
  metadata = dataclasses.replace(
      metadata, channel_mean=tuple(map(float, mean)), channel_std=tuple(map(float, std))
  )
  if jax.process_index() == 0:
    latents_lib.write_metadata(out, metadata)
  return {
      'out': out,
      'splits': splits,
      'grid': list(grid),
      'channels': metadata.channels,
      'channel_std': [round(s, 4) for s in std],
  }
