"""Frechet distances of video, for any model family: the feature networks (I3D for FVD, one feature
vector per clip; Inception-v3 for FID, one per frame), the held-out batches split over the data
axes, the real split's statistics (cached), the statistics of given clips, and the protocol written
beside every number. The tokenizer's rFVD / rFID use them (vitok/tokenizer/evaluation.py), and so
do the DiT's gFVD / gFID (dit/evaluation.py).

The real clips' statistics are computed once per protocol and cached next to the prepared dataset
(`DATA_DIR/feature_statistics/`); a damaged cache file is recomputed, never used. A network whose
weights cannot be read makes its metric *unavailable*, with the reason, never silently skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import zipfile
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from vitok.core import sharding
from vitok.data import pipeline, pixels
from vitok.evals import fvd, i3d, inception


class FeatureNetwork(NamedTuple):
  """A pretrained network whose feature statistics a Frechet distance compares."""

  name: str  # 'fvd' / 'fid': the metrics are r<name>, baseline_r<name>, g<name>
  dim: int
  protocol: str
  load: Callable[[], dict]  # the weights; raises OSError / ImportError when they cannot be read
  # (B, T, H, W, 3) clips in [-1, 1] -> (B * rows_per_clip, dim)
  features: Callable[[dict, jax.Array], jax.Array]
  rows_per_clip: Callable[[int], int]  # of a clip of T frames
  input_frames: Callable[[int], int]  # the frames the network sees of a clip of T frames


def _per_frame_fid(weights, video):
  b, t, h, w, c = video.shape
  return inception.fid_features(weights, video.reshape(b * t, h, w, c))


FVD = FeatureNetwork(
    name='fvd',
    dim=i3d.FEATURES,
    protocol='i3d-kinetics400-logits; bilinear to 224x224; frames repeated to >= 9',
    load=i3d.load_params,
    features=fvd.fvd_features,
    rows_per_clip=lambda t: 1,
    input_frames=fvd.fvd_frames,
)
FID = FeatureNetwork(
    name='fid',
    dim=inception.FEATURES,
    protocol=inception.PROTOCOL,
    load=inception.load_params,
    features=_per_frame_fid,
    rows_per_clip=lambda t: t,
    input_frames=lambda t: 1,
)


def global_eval_batches(cfg, eval_source, mesh):
  """(video, mask) global arrays of every held-out clip, the batch split over the data axes like
  training batches; each process decodes only its rows. Every device gets whole clips: the
  batch is rounded up to a multiple of the data-parallel size (padding rows are masked out)."""
  dp = math.lcm(sharding.data_parallel_size(mesh, cfg.sharding_rules), jax.process_count())
  data_cfg = cfg.data.copy_and_resolve_references()
  data_cfg.eval_batch_size = -(-cfg.data.eval_batch_size // dp) * dp
  batch_sharding = sharding.batch_sharding(mesh, cfg.sharding_rules)
  sharding.check_process_rows(batch_sharding, data_cfg.eval_batch_size, 'data.eval_batch_size')
  for batch in pipeline.eval_batches(
      data_cfg, eval_source, jax.process_index(), jax.process_count()
  ):
    yield tuple(
        jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in ('video', 'mask')
    )


def protocol(network: FeatureNetwork, cfg, clips: int) -> dict:
  """What a Frechet number was measured on, written next to it."""
  d = cfg.data
  return {
      'features': network.protocol,
      'dataset': d.name,
      'split': d.eval_split,
      'clips': clips,
      'frames': d.frames,
      'frame_stride': d.frame_stride,
      'res': d.res,
      'network_frames': network.input_frames(d.frames),
  }


def real_statistics_path(network: FeatureNetwork, cfg) -> str:
  """Where the held-out split's feature statistics are cached: next to the prepared dataset, keyed
  by everything that changes the clips or the features."""
  d = cfg.data
  key = json.dumps(
      [network.protocol, d.name, d.eval_split, d.frames, d.frame_stride, d.res]
      + [d.get(k) for k in ('manual_dir', 'store_short_side', 'clip_frames', 'clip_stride')],
      sort_keys=True,
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  directory = os.path.join(os.path.expanduser(d.data_dir), 'feature_statistics')
  return os.path.join(directory, f'{network.name}-{d.name}-{d.eval_split}-{digest}.npz')


def cached_statistics(path: str):
  """The cached real-data statistics, or None when they must be computed: when the file is
  missing or unreadable (it is then rewritten), or missing on any process (every process must
  run the same program)."""
  try:
    stats = fvd.FeatureStatistics.load(path)
  except FileNotFoundError:
    stats = None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    print(
        f'ignoring the unreadable feature statistics {path} ({type(e).__name__}: {e}); recomputing'
    )
    stats = None
  everywhere = multihost_utils.process_allgather(np.array(stats is not None)).all()
  return stats if everywhere else None


def load_weights(network: FeatureNetwork, mesh, rules):
  """(weights placed replicated on `mesh`, None) or (None, the reason they cannot be read)."""
  try:
    weights = network.load()
  except (ImportError, OSError) as e:  # reported, never silently skipped
    return None, f'{type(e).__name__}: {e}'
  return sharding.place(weights, sharding.abstract_placed(weights, mesh, rules)), None


def frame_mask(mask, rows_per_clip: int):
  """The per-row mask of features computed `rows_per_clip` rows per clip."""
  return np.repeat(np.asarray(mask, bool), rows_per_clip)


# --- the real split's statistics, and features of given clips (generated samples) ---


@functools.lru_cache(maxsize=8)
def _features_fn(mesh, network: FeatureNetwork):
  """Jitted: uint8 clips (split over the data axes) -> their features, replicated."""

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def run(weights, video_uint8):
    return network.features(weights, pixels.to_unit_range(video_uint8))

  return run


def real_statistics(network: FeatureNetwork, cfg, source, mesh, weights) -> fvd.FeatureStatistics:
  """The feature statistics of every clip of `cfg.data`'s held-out split (`source`), read from the
  cache next to the dataset or computed (and cached)."""
  path = real_statistics_path(network, cfg)
  stats = cached_statistics(path)
  if stats is not None:
    return stats
  stats, run = fvd.FeatureStatistics(network.dim), _features_fn(mesh, network)
  for video, mask in global_eval_batches(cfg, source, mesh):
    with sharding.activation_sharding(mesh, cfg.sharding_rules):
      features = jax.device_get(run(weights, video))
    stats.update(features, frame_mask(jax.device_get(mask), network.rows_per_clip(video.shape[1])))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stats.save(path)
  return stats


def clip_statistics(
    network: FeatureNetwork, clips: np.ndarray, batch_size: int, mesh, rules, weights
) -> fvd.FeatureStatistics:
  """The feature statistics of uint8 clips (N, T, H, W, 3) held whole by every process (generated
  samples), computed in batches split over the data axes (padded to whole clips per device)."""
  dp = sharding.data_parallel_size(mesh, rules)
  batch_size = -(-batch_size // dp) * dp
  batch_sharding = sharding.batch_sharding(mesh, rules)
  stats, run = fvd.FeatureStatistics(network.dim), _features_fn(mesh, network)
  for start in range(0, len(clips), batch_size):
    chunk = clips[start : start + batch_size]
    mask = np.arange(batch_size) < len(chunk)
    padded = np.concatenate(
        [chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)]
    )
    with sharding.activation_sharding(mesh, rules):
      features = jax.device_get(run(weights, jax.device_put(padded, batch_sharding)))
    stats.update(features, frame_mask(mask, network.rows_per_clip(clips.shape[1])))
  return stats
