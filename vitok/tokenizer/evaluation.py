"""The tokenizer's evaluators, both called with the run's `EvalContext`:

- `evaluate_reconstruction`: PSNR / SSIM / LPIPS (VGG, and AlexNet where frames are large enough)
  of the posterior-mean reconstruction over the whole held-out split, beside the pooled codec at no
  more floats than E (the honesty baseline), and sample images / videos;
- `evaluate_frechet`: rFVD (I3D) or rFID (Inception-v3) of the reconstructions of the whole split
  and of the pooled codec, against the split's clips (vitok/evals/frechet.py), with the protocol.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vitok.core import sharding
from vitok.core import task as task_lib
from vitok.data import pixels, video_io
from vitok.evals import frechet, fvd, metrics
from vitok.evals import lpips as lpips_lib


@functools.lru_cache(maxsize=2)
def lpips_params(alexnet: bool):
  params = {'lpips': lpips_lib.load_lpips_params()}
  if alexnet:
    params['lpips_alex'] = lpips_lib.load_lpips_params('alexnet')
  return params


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef, baseline_pairs, mesh, batch_sharding):
  """Jitted per-batch evaluation: per-clip metrics of the tokenizer and of the baseline codec, and
  the mask, replicated so every process can read them; reconstructions stay split by batch.
  Cached, so the evaluations of one run share one compilation."""
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated, batch_sharding))
  def run(params, video_uint8, mask, frozen):
    video = pixels.to_unit_range(video_uint8)
    recon, _, _ = nnx.merge(graphdef, params)(video)  # posterior mean at evaluation
    recon = jnp.clip(recon, -1.0, 1.0)
    out = {
        'psnr': metrics.psnr(recon, video),
        'ssim': metrics.ssim(recon, video),
        'lpips': lpips_lib.video_lpips(frozen['lpips'], recon, video),
    }
    if 'lpips_alex' in frozen:
      out['lpips_alex'] = lpips_lib.video_lpips(frozen['lpips_alex'], recon, video, net='alexnet')
    for st, s in baseline_pairs:
      pooled = metrics.pool_and_resize(video, st, s)
      out[f'baseline_{st}x{s}'] = metrics.psnr(pooled, video)
      out[f'baseline_ssim_{st}x{s}'] = metrics.ssim(pooled, video)
    return out, mask, pixels.to_uint8(recon)

  return run


def evaluate_reconstruction(task, context: task_lib.EvalContext) -> dict:
  """PSNR / SSIM / LPIPS of the mean reconstruction over the whole held-out split, the honesty
  baseline at no more floats than E, and sample images/videos (the shared loop and launch.eval
  append the result to metrics.jsonl).

  Multi-host: each process decodes only its rows of every evaluation batch; the batch is split
  over the mesh's data axes like training batches; only process 0 writes files."""
  cfg, mesh, step = task.config, context.mesh, context.step
  graphdef, params, frozen = context.graphdef, context.params, context.frozen
  eval_source = context.sources[cfg.data.eval_split]
  batch_sharding = sharding.batch_sharding(mesh, cfg.sharding_rules)
  T, res = cfg.data.frames, cfg.data.res
  pairs = metrics.baseline_factors(T, res, res, task.latent_floats)
  run = _eval_fn(graphdef, tuple(map(tuple, pairs)), mesh, batch_sharding)
  accumulator, samples = metrics.MetricAccumulator(), []
  for video, mask in frechet.global_eval_batches(cfg, eval_source, mesh):
    with sharding.activation_sharding(mesh, cfg.sharding_rules):  # traced on the first batch
      per_clip, mask, recon = run(params, video, mask, frozen)
    per_clip, mask = jax.device_get((per_clip, mask))  # the whole batch's, on every process
    accumulator.update(per_clip, mask)
    if len(samples) < cfg.num_eval_videos:  # the same decision on every process (global mask)
      video, recon = multihost_utils.process_allgather((video, recon), tiled=True)
      real = np.flatnonzero(mask)[: cfg.num_eval_videos - len(samples)]
      samples += [(video[i], recon[i]) for i in real]
  count = accumulator.count('psnr')
  if count == 0:
    raise ValueError(
        f'data.eval_split={cfg.data.eval_split!r} of data.name={cfg.data.name!r} '
        'has no clips to evaluate'
    )
  means = accumulator.result()
  st, s = metrics.best_baseline_pair(
      {(a, b): means[f'baseline_{a}x{b}'] for a, b in pairs}, T, res, res
  )
  result = {
      'step': int(step),
      'split': cfg.data.eval_split,
      'clips': int(count),
      'psnr': means['psnr'],
      'ssim': means['ssim'],
      'lpips': means['lpips'],
      'baseline_psnr': means[f'baseline_{st}x{s}'],
      'baseline_ssim': means[f'baseline_ssim_{st}x{s}'],  # at the pooling of the best PSNR
      'baseline_floats': metrics.baseline_floats(T, res, res, st, s),
      'baseline_pool': [st, s, s],
      'latent_floats': task.latent_floats,
  }
  if 'lpips_alex' in means:
    result['lpips_alex'] = means['lpips_alex']
  else:
    minimum = lpips_lib.MIN_LPIPS_SIZE['alexnet']
    result['lpips_alex_unavailable'] = f'LPIPS-AlexNet needs frames of at least {minimum}x{minimum}'
  if jax.process_index() == 0:
    write_samples(samples, os.path.join(context.workdir, 'samples'), step)
  return result


def write_samples(samples, directory: str, step: int) -> None:
  """For each (original, reconstruction) uint8 (T, H, W, 3) pair: a PNG with the original frames
  on the top row and the reconstruction below, and an mp4 of original | reconstruction."""
  if not samples:
    return
  os.makedirs(directory, exist_ok=True)
  for i, (real, recon) in enumerate(samples):
    grid = np.concatenate(
        [np.concatenate(list(real), axis=1), np.concatenate(list(recon), axis=1)], axis=0
    )
    video_io.write_png(os.path.join(directory, f'step{step:07d}_clip{i}.png'), grid)
    if real.shape[0] > 1:
      side_by_side = np.concatenate([real, recon], axis=2)
      video_io.write_mp4(os.path.join(directory, f'step{step:07d}_clip{i}.mp4'), side_by_side)


# --- rFVD / rFID of the tokenizer and of the pooled codec ---


@functools.lru_cache(maxsize=8)
def _reconstruction_features_fn(graphdef, pair, mesh, network: frechet.FeatureNetwork):
  """Jitted per-batch features (replicated, so every process reads the whole batch's) of the
  tokenizer's mean reconstructions and of the pooled codec at `pair`."""

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def run(params, video_uint8, weights):
    video = pixels.to_unit_range(video_uint8)
    recon = jnp.clip(nnx.merge(graphdef, params)(video)[0], -1.0, 1.0)
    return {
        'recon': network.features(weights, recon),
        'baseline': network.features(weights, metrics.pool_and_resize(video, *pair)),
    }

  return run


@functools.lru_cache(maxsize=8)
def _baseline_psnr_fn(pairs, mesh):
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def run(video_uint8):
    video = pixels.to_unit_range(video_uint8)
    return {p: metrics.psnr(metrics.pool_and_resize(video, *p), video) for p in pairs}

  return run


def best_baseline_pair(task, context) -> tuple[tuple[int, int], int]:
  """The pooled codec's pooling with the best PSNR on the held-out split (the one the
  reconstruction evaluator reports), and the number of clips."""
  cfg, mesh = task.config, context.mesh
  T, res = cfg.data.frames, cfg.data.res
  pairs = tuple(map(tuple, metrics.baseline_factors(T, res, res, task.latent_floats)))
  psnr_fn, accumulator = _baseline_psnr_fn(pairs, mesh), metrics.MetricAccumulator()
  for video, mask in frechet.global_eval_batches(cfg, context.sources[cfg.data.eval_split], mesh):
    accumulator.update(
        {f'{a}x{b}': v for (a, b), v in jax.device_get(psnr_fn(video)).items()},
        jax.device_get(mask),
    )
  clips = accumulator.count(f'{pairs[0][0]}x{pairs[0][1]}')
  if clips == 0:
    return pairs[0], 0
  means = accumulator.result()
  return metrics.best_baseline_pair({p: means[f'{p[0]}x{p[1]}'] for p in pairs}, T, res, res), clips


def evaluate_frechet(network: frechet.FeatureNetwork, task, context: task_lib.EvalContext) -> dict:
  """r<FVD|FID> of the tokenizer's reconstructions of the whole held-out split and of the pooled
  codec (at the pooling that gives it the best PSNR, as `baseline_psnr`), against the split's clips,
  with the frechet.protocol."""
  cfg, mesh, name = task.config, context.mesh, f'r{network.name}'
  pair, clips = best_baseline_pair(task, context)
  rows = clips * network.rows_per_clip(cfg.data.frames)
  if rows < 2:  # a covariance needs two feature vectors
    return {
        'step': int(context.step),
        f'{name}_unavailable': f'{name} needs at least 2 feature vectors; data.eval_split='
        f'{cfg.data.eval_split!r} of data.name={cfg.data.name!r} gives {rows} ({clips} clips)',
    }
  weights, reason = frechet.load_weights(network, mesh, cfg.sharding_rules)
  if weights is None:
    return {'step': int(context.step), f'{name}_unavailable': reason}
  source = context.sources[cfg.data.eval_split]
  real = frechet.real_statistics(network, cfg, source, mesh, weights)
  stats = {k: fvd.FeatureStatistics(network.dim) for k in ('recon', 'baseline')}
  run = _reconstruction_features_fn(context.graphdef, pair, mesh, network)
  for video, mask in frechet.global_eval_batches(cfg, source, mesh):
    with sharding.activation_sharding(mesh, cfg.sharding_rules):
      features = jax.device_get(run(context.params, video, weights))
    mask = frechet.frame_mask(jax.device_get(mask), network.rows_per_clip(cfg.data.frames))
    for k, v in features.items():
      stats[k].update(v, mask)
  return {
      'step': int(context.step),
      name: stats['recon'].distance(real),
      f'baseline_{name}': stats['baseline'].distance(real),
      f'{network.name}_protocol': dict(
          frechet.protocol(network, cfg, clips),
          reconstruction='posterior mean, clipped to [-1, 1]',
          baseline_pool=[pair[0], pair[1], pair[1]],
      ),
  }
