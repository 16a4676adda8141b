"""ViTok stage 1: the reconstruction objective, held-out evaluation, and the task object the shared
trainer drives (`vitok.core.trainer.train`).

Loss = l2 * MSE + l1 * MAE + beta * KL + eta * LPIPS, each term logged separately.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vitok import evaluation, metrics, tokenizer
from vitok import lpips as lpips_lib
from vitok.core import config_checks, hardware, sharding
from vitok.core import task as task_lib
from vitok.data import builders, pipeline, video_io


def stage1_loss(model: tokenizer.ViTok, batch, rng, frozen, loss_cfg):
  """batch['video']: uint8 (B, T, H, W, 3). Returns (scalar loss, dict of scalar metrics)."""
  video = tokenizer.to_unit_range(batch['video'])
  sample_key, lpips_key = jax.random.split(rng)
  recon, mean, logvar = model(video, key=sample_key)
  return reconstruction_loss(recon, video, mean, logvar, frozen, loss_cfg, lpips_key)


def reconstruction_loss(recon, video, mean, logvar, frozen, loss_cfg, lpips_key):
  """l2 * MSE + l1 * MAE + beta * KL + eta * LPIPS of a reconstruction of `video` (both float in
  [-1, 1]) from the posterior (mean, logvar). Returns (weighted sum, dict of the terms and the
  training PSNR)."""
  error = recon - video
  terms = {
      'l2': jnp.mean(jnp.square(error)),
      'l1': jnp.mean(jnp.abs(error)),
      'kl': jnp.mean(tokenizer.kl_divergence(mean, logvar)),
  }
  if loss_cfg.lpips > 0:
    frames = loss_cfg.lpips_frames or None
    with jax.named_scope('lpips'):  # names its ops in profiles (core/profile.py)
      terms['lpips'] = jnp.mean(
          lpips_lib.video_lpips(frozen['lpips'], recon, video, num_frames=frames, key=lpips_key)
      )
  else:
    terms['lpips'] = jnp.zeros(())
  loss = (
      loss_cfg.l2 * terms['l2']
      + loss_cfg.l1 * terms['l1']
      + loss_cfg.kl * terms['kl']
      + loss_cfg.lpips * terms['lpips']
  )
  terms['train_psnr'] = 10.0 * jnp.log10(4.0 / jnp.maximum(terms['l2'], 1e-10))
  return loss, terms


# Ranges of the loss and evaluation fields (the model's fields are checked by TokenizerConfig, the
# shared ones by vitok.core.config_checks.TRAINING_FIELDS).
LOSS_FIELDS = {
    'loss.l2': config_checks.NON_NEGATIVE,
    'loss.l1': config_checks.NON_NEGATIVE,
    'loss.kl': config_checks.NON_NEGATIVE,
    'loss.lpips': config_checks.NON_NEGATIVE,
    'loss.lpips_frames': config_checks.Range(0, note='0 = all frames'),
    'fvd_every': config_checks.Range(0, note='0 = rFVD only in launch.eval'),
    'fid_every': config_checks.Range(0, note='0 = rFID only in launch.eval'),
}


class TokenizerTask:
  """ViTok stage 1 as a `vitok.core.task.Task`: video clips in, reconstruction loss out, evaluated
  by PSNR / SSIM / LPIPS of the held-out split against the pooled-codec baseline."""

  name = 'vitok'
  progress_metrics = ('train_psnr',)

  def __init__(self, config):
    self.config = config
    config_checks.check_fields(config, LOSS_FIELDS)
    if config.loss.lpips_frames > config.data.frames:
      raise config_checks.ConfigError(
          f'config.loss.lpips_frames={config.loss.lpips_frames} is more than the '
          f'data.frames={config.data.frames} frames of a clip'
      )
    # model.dtype='auto': the dtype the target computes fastest in (vitok/core/hardware.py).
    self.model_cfg = tokenizer.TokenizerConfig.from_config(
        hardware.with_compute_dtype(config.model)
    )
    # Fails at start-up (naming data.frames / data.res) when the clip does not tile into tubelets.
    self.grid = self.model_cfg.latent_grid(config.data.frames, config.data.res)
    self.tokens_per_clip = int(np.prod(self.grid))
    self.latent_floats = self.tokens_per_clip * self.model_cfg.channels  # E
    if self.model_cfg.attention == 'auto':  # the kernel for the target and the token count
      attention = hardware.auto_attention(self.tokens_per_clip, self.model_cfg.dtype)[0]
      self.model_cfg = dataclasses.replace(self.model_cfg, attention=attention)
    self.model_cfg.check_backend(hardware.target_platform())

  # --- the model and its objective ---

  def create_model(self, rngs: nnx.Rngs) -> tokenizer.ViTok:
    return tokenizer.ViTok(self.model_cfg, rngs=rngs)

  def loss_fn(self, model, batch, rng, frozen, step=None):
    del step  # no schedule inside the objective
    return stage1_loss(model, batch, rng, frozen, self.config.loss)

  def train_flops_per_clip(self) -> int:
    """Model FLOPs of one training clip: forward + backward = 3 x forward, 2 FLOPs per MAC (the
    usual MFU convention; LPIPS and elementwise work are not model FLOPs)."""
    return (
        6
        * tokenizer.forward_macs(self.model_cfg, self.config.data.frames, self.config.data.res)[
            'total'
        ]
    )

  # --- input ---

  def abstract_batch(self) -> dict:
    d = self.config.data
    return {
        'video': jax.ShapeDtypeStruct((d.batch_size, d.frames, d.res, d.res, 3), np.uint8),
        'label': jax.ShapeDtypeStruct((d.batch_size,), np.int32),
    }

  def prepare_data(self) -> dict:
    return builders.prepare(self.config.data)

  def train_iterator(self, sources, start_step: int, process_index: int, process_count: int):
    d = self.config.data
    return pipeline.train_iterator(
        d,
        seed=d.seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        source=sources[d.train_split],
    )

  # --- frozen networks: LPIPS, VGG16 and AlexNet (no logical axes: replicated) ---

  def abstract_frozen(self, mesh):
    return sharding.abstract_placed(self._frozen_params(), mesh, self.config.sharding_rules)

  def frozen(self, mesh):
    return sharding.place(self._frozen_params(), self.abstract_frozen(mesh))

  def _frozen_params(self):
    """VGG16 LPIPS (loss and metric) and, where the frames are large enough, AlexNet LPIPS
    (reported beside it)."""
    alexnet = self.config.data.res >= lpips_lib.MIN_LPIPS_SIZE['alexnet']
    return _lpips_params(alexnet)

  # --- evaluation and reports ---

  def evaluators(self) -> list[task_lib.Evaluator]:
    return [
        task_lib.Evaluator(
            name='reconstruction',
            every=self.config.eval_every,
            metrics=('psnr', 'ssim', 'lpips', 'lpips_alex', 'baseline_psnr', 'baseline_ssim'),
            run=lambda c: evaluate(
                self,
                c.graphdef,
                c.params,
                c.frozen,
                c.sources[self.config.data.eval_split],
                c.step,
                c.workdir,
                c.mesh,
            ),
        ),
        # rFVD and rFID (I3D on every held-out clip, Inception-v3 on every frame: costly on a
        # CPU): during training every `fvd_every` / `fid_every` steps and at the end when that is
        # > 0; always in launch.eval.
        *[
            task_lib.Evaluator(
                name=f'r{network.name}',
                every=max(self.config.get(f'{network.name}_every', 0), 1),
                metrics=(f'r{network.name}', f'baseline_r{network.name}'),
                run=functools.partial(evaluation.evaluate_reconstruction, network, self),
                during_training=self.config.get(f'{network.name}_every', 0) > 0,
            )
            for network in (evaluation.FVD, evaluation.FID)
        ],
    ]

  def describe(self) -> dict:
    """Parameter counts, tokens, E, pixels per latent float and forward GMACs per clip."""
    cfg, frames, res = self.model_cfg, self.config.data.frames, self.config.data.res
    params = tokenizer.count_params(cfg)
    macs = tokenizer.forward_macs(cfg, frames, res)
    return {
        'task': self.name,
        'variant': cfg.variant,
        'clip': [frames, res, res, 3],
        'latent': list(self.grid) + [cfg.channels],
        'params_encoder_M': round(params['encoder'] / 1e6, 2),
        'params_decoder_M': round(params['decoder'] / 1e6, 2),
        'params_total_M': round(params['total'] / 1e6, 2),
        'tokens_per_clip': self.tokens_per_clip,
        'E': self.latent_floats,
        'pixels_per_latent_float': round(frames * res * res * 3 / self.latent_floats, 3),
        'gmacs_encoder': round(macs['encoder'] / 1e9, 2),
        'gmacs_decoder': round(macs['decoder'] / 1e9, 2),
        'gmacs_per_clip': round(macs['total'] / 1e9, 2),
    }


@functools.lru_cache(maxsize=2)
def _lpips_params(alexnet: bool):
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
    video = tokenizer.to_unit_range(video_uint8)
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
    return out, mask, tokenizer.to_uint8(recon)

  return run


def evaluate(
    task: TokenizerTask, graphdef, params, frozen, eval_source, step: int, workdir: str, mesh=None
) -> dict:
  """PSNR / SSIM / LPIPS of the mean reconstruction over the whole held-out split, the honesty
  baseline at no more floats than E, and sample images/videos (the shared loop and launch.eval
  append the result to metrics.jsonl).

  Multi-host: each process decodes only its rows of every evaluation batch; the batch is split
  over the mesh's data axes like training batches; only process 0 writes files. `mesh` defaults
  to the config's mesh over all devices."""
  cfg = task.config
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  batch_sharding = sharding.batch_sharding(mesh, cfg.sharding_rules)
  T, res = cfg.data.frames, cfg.data.res
  pairs = metrics.baseline_factors(T, res, res, task.latent_floats)
  run = _eval_fn(graphdef, tuple(map(tuple, pairs)), mesh, batch_sharding)
  accumulator, samples = metrics.MetricAccumulator(), []
  for video, mask in evaluation.global_eval_batches(cfg, eval_source, mesh):
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
    write_samples(samples, os.path.join(workdir, 'samples'), step)
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


def load_tokenizer(directory: str, mesh=None) -> tokenizer.ViTok:
  """The tokenizer of `directory` (see `open_tokenizer`) ready for inference:
  `model.encode(video)` / `model.decode(z)`, its parameters placed by the config's sharding rules
  on `mesh` (default: every device, data-parallel, i.e. replicated)."""
  frozen = open_tokenizer(directory, mesh)
  return nnx.merge(frozen.graphdef, frozen.params)


class FrozenTokenizer(NamedTuple):
  config: Any  # the tokenizer run's config
  task: TokenizerTask
  graphdef: Any
  params: Any  # nnx.State of the parameters, sharded by the config's rules on the mesh
  source: str  # what was read: the export, or checkpoint step N (EMA or raw)


def abstract_tokenizer_params(model_cfg: tokenizer.TokenizerConfig, mesh, rules):
  """The parameters of a tokenizer of `model_cfg` as ShapeDtypeStructs sharded by `rules` on
  `mesh`, and its graphdef: the restore target of a frozen tokenizer (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: tokenizer.ViTok(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, sharding.abstract_placed(params, mesh, rules)


def read_tokenizer_config(directory: str):
  """The config.json of a tokenizer export (`launch.export`) or training workdir."""
  import ml_collections

  path = os.path.join(directory, 'config.json')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise config_checks.ConfigError(
        f'{directory} is not a tokenizer (an export of launch.export or a training workdir): '
        f'cannot read {path}: {type(e).__name__}: {e}'
    ) from None


def open_tokenizer(directory: str, mesh=None, rules=None) -> FrozenTokenizer:
  """A trained tokenizer, frozen, for a downstream model (the DiT) or for inference: from an
  export of `launch.export` (`params/`) or from a training workdir (its newest checkpoint that
  restores; the EMA when the run kept one). Parameters are sharded by `rules` (default: the
  tokenizer config's) on `mesh` (default: all devices, data-parallel)."""
  from vitok.core import checkpoint as ckpt_lib  # checkpoint I/O only where it is needed

  config = read_tokenizer_config(directory)
  if mesh is None:
    config.mesh.shape = [-1] + [1] * (len(config.mesh.axes) - 1)
    mesh = sharding.make_mesh(config.mesh)
  task = TokenizerTask(config)
  rules = config.sharding_rules if rules is None else rules
  graphdef, abstract = abstract_tokenizer_params(task.model_cfg, mesh, rules)
  # A stage-2 run holds the tokenizer beside its discriminator: restore that tree, keep the
  # tokenizer's part.
  if config.get('task') == 'vitok_stage2':
    from vitok import stage2 as stage2_lib

    _, whole = stage2_lib.abstract_params(config, mesh, rules)
    tokenizer_of = lambda params: params['tokenizer']
  else:
    whole, tokenizer_of = abstract, lambda params: params
  if os.path.isdir(os.path.join(directory, 'params')):
    params = tokenizer_of(ckpt_lib.load_params(os.path.join(directory, 'params'), whole))
    return FrozenTokenizer(config, task, graphdef, params, f'the export {directory}')
  checkpointer = ckpt_lib.Checkpointer(directory, create=False)
  if checkpointer.latest_step() is None:
    raise ckpt_lib.CheckpointError(
        f'{directory} has neither exported parameters (params/) nor checkpoints: train or '
        'export the tokenizer first'
    )
  ema = config.optim.ema_decay > 0
  params = tokenizer_of(checkpointer.restore_params(whole, ema=ema))
  step = checkpointer.restored_step
  return FrozenTokenizer(
      config,
      task,
      graphdef,
      params,
      f'step {step} of {directory} ({"EMA" if ema else "raw"} parameters)',
  )
