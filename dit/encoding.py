"""Encoding video with a frozen tokenizer. `encode` writes a dataset once into a latent cache
(dit/latents.py), as `python -m launch.encode` and `python -m launch.demo` do: every example of
the train and eval splits, centre-cropped (no augmentation), to its posterior mean and
log-variance. Resumable (finished chunks are kept) and a finished cache is left as it is.
Multi-process runs encode their rows of every batch, with the tokenizer sharded by its rules.
`sampled_statistics` gives a run that encodes on the fly (`latents.source='video'`) the
statistics a cache would hold."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit import latents as latents_lib
from vitok.core import sharding, trainer
from vitok.data import DataError, datasets, pipeline, pixels
from vitok.tokenizer import frozen as frozen_tokenizer


def in_clips(code, video: jax.Array, clip: int) -> jax.Array:
  """`code` (a tokenizer's encode or decode, (B, t, ...) -> (B, t', ...)) applied to consecutive,
  non-overlapping clips of `clip` frames along axis 1, the results put back one after another:
  a sequence longer than the tokenizer's trained clip is coded as the clips it was trained on."""
  b, t = video.shape[:2]
  if t <= clip:
    return code(video)
  if t % clip:
    raise ValueError(f'{t} frames do not split into clips of {clip}')
  out = code(video.reshape(b * (t // clip), clip, *video.shape[2:]))
  return out.reshape(b, t // clip * out.shape[1], *out.shape[2:])


def encode_function(graphdef, params, mesh, rules, batch_sharding, clip_frames: int | None = None):
  """(video uint8, label, mask) -> (mean, logvar, label, mask) of the whole global batch as host
  arrays on every process, each process giving its rows; the tokenizer `graphdef` + `params`
  (sharded by `rules` on `mesh`) encodes them in one jitted program, in consecutive clips of
  `clip_frames` (the tokenizer's trained length; None: whole)."""
  replicated = sharding.replicated(mesh)

  @jax.jit
  def run(params, video, label, mask):
    model = nnx.merge(graphdef, params)
    moments = lambda clips: jnp.concatenate(
        model.encode_moments(pixels.to_unit_range(clips)), axis=-1
    )
    both = in_clips(moments, video, clip_frames or video.shape[1])
    mean, logvar = jnp.split(both, 2, axis=-1)
    return jax.lax.with_sharding_constraint((mean, logvar, label, mask), replicated)

  def encode_batch(video, label, mask):
    arrays = [
        jax.make_array_from_process_local_data(batch_sharding, np.asarray(x))
        for x in (video, label, mask)
    ]
    with sharding.activation_sharding(mesh, rules):
      out = run(params, *arrays)
    return jax.device_get(out)

  return encode_batch


def encoding_batch_size(batch: int, mesh, rules) -> int:
  """`batch` rounded up to a multiple of the data-parallel size and of the process count."""
  dp = int(np.lcm(sharding.data_parallel_size(mesh, rules), jax.process_count()))
  return -(-batch // dp) * dp


class _Subset:
  """source[indices] as a random-access source."""

  def __init__(self, source, indices):
    self._source, self._indices = source, indices

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._source[int(self._indices[index])]


def sampled_statistics(graphdef, params, mesh, rules, data_cfg, source, clips: int, channels: int):
  """Per-channel mean and standard deviation of the latents (`latents.channel_statistics`) of
  `clips` clips spread evenly over `source`, centre-cropped as `encode` sees them: the statistics
  of a DiT run that encodes its clips on the fly. Every process computes the same numbers."""
  if len(source) == 0:
    raise DataError('the training split is empty: no clips to compute latent statistics from')
  data_cfg = data_cfg.copy_and_resolve_references()
  data_cfg.eval_batch_size = encoding_batch_size(data_cfg.eval_batch_size, mesh, rules)
  count = min(clips, len(source))
  indices = np.unique(np.linspace(0, len(source) - 1, count).round().astype(np.int64))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  encode_batch = encode_function(graphdef, params, mesh, rules, batch_sharding)

  def moments():
    subset = _Subset(source, indices)
    for batch in pipeline.eval_batches(data_cfg, subset, jax.process_index(), jax.process_count()):
      mean, logvar, _, mask = encode_batch(batch['video'], batch['label'], batch['mask'])
      yield {'mean': mean[mask], 'logvar': logvar[mask]}

  return latents_lib.channel_statistics(moments(), channels)


def encode(tokenizer_dir: str, out: str, data_cfg, batch: int) -> dict:
  frozen = frozen_tokenizer.open_tokenizer(tokenizer_dir)
  mesh = sharding.make_mesh(frozen.config.mesh)
  data_cfg = data_cfg.copy_and_resolve_references()
  clip_frames = int(frozen.config.data.frames)  # what the tokenizer was trained on
  if data_cfg.frames > clip_frames and data_cfg.frames % clip_frames:
    raise DataError(
        f'data.frames={data_cfg.frames} is longer than the clips of {clip_frames} frames the '
        f'tokenizer was trained on, and not a multiple of them: long videos are encoded clip '
        f'after clip'
    )
  clip_frames = min(clip_frames, data_cfg.frames)
  grid = frozen.model_cfg.latent_grid(data_cfg.frames, data_cfg.res)
  clip_latents = frozen.model_cfg.latent_grid(clip_frames, data_cfg.res)[0]
  rules = frozen.config.sharding_rules
  data_cfg.eval_batch_size = encoding_batch_size(batch, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  print(
      f'encoding with {frozen.source}: clips {data_cfg.frames}x{data_cfg.res}x{data_cfg.res} '
      f'-> latents {grid} x {frozen.model_cfg.channels}'
      + (f', in clips of {clip_frames} frames' if clip_frames < data_cfg.frames else ''),
      flush=True,
  )

  class _Data:  # trainer.prepare_data builds on process 0 first

    def prepare_data(self):
      return datasets.prepare(data_cfg)

  sources = trainer.prepare_data(_Data())
  encode_batch = encode_function(
      frozen.graphdef, frozen.params, mesh, rules, batch_sharding, clip_frames
  )
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
      channels=frozen.model_cfg.channels,
      num_classes=int(datasets.num_classes(data_cfg)),
      splits=splits,
      channel_mean=(),
      channel_std=(),
      tokenizer=os.path.abspath(tokenizer_dir),
      data=json.loads(data_cfg.to_json_best_effort()),
      clip_latents=int(clip_latents),
  )
  train = latents_lib.LatentSource(out, data_cfg.train_split, metadata)
  mean, std = latents_lib.channel_statistics(
      (train[i] for i in range(len(train))), metadata.channels
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
