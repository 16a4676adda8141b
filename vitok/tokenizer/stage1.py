"""ViTok stage 1: the reconstruction objective and the task object the shared trainer drives
(`vitok.core.trainer.train`); its evaluators are in evaluation.py.

Loss = l2 * MSE + l1 * MAE + beta * KL + eta * LPIPS, each term logged separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok.core import config_checks, sharding
from vitok.core import task as task_lib
from vitok.data import datasets, pipeline, pixels
from vitok.evals import frechet
from vitok.evals import lpips as lpips_lib
from vitok.tokenizer import evaluation
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import model as tokenizer


def stage1_loss(model: tokenizer.ViTok, batch, rng, frozen, loss_cfg):
  """batch['video']: uint8 (B, T, H, W, 3). Returns (scalar loss, dict of scalar metrics)."""
  video = pixels.to_unit_range(batch['video'])
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
    'evals.reconstruction.every': config_checks.EVAL_EVERY,
    'evals.rfvd.every': config_checks.EVAL_EVERY,
    'evals.rfid.every': config_checks.EVAL_EVERY,
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
    # dtype and attention 'auto' resolved for the target; fails at start-up (naming data.frames /
    # data.res) when the clip does not tile into tubelets.
    self.model_cfg = frozen_tokenizer.model_config(
        config.model, config.data.frames, config.data.res
    )
    self.grid = self.model_cfg.latent_grid(config.data.frames, config.data.res)
    self.tokens_per_clip = int(np.prod(self.grid))
    self.latent_floats = self.tokens_per_clip * self.model_cfg.channels  # E

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
    return datasets.prepare(self.config.data)

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
    return evaluation.lpips_params(alexnet)

  # --- evaluation and reports ---

  def evaluators(self) -> list[task_lib.Evaluator]:
    return [
        task_lib.Evaluator(
            name='reconstruction',
            **task_lib.cadence(self.config, 'reconstruction'),
            metrics=('psnr', 'ssim', 'lpips', 'lpips_alex', 'baseline_psnr', 'baseline_ssim'),
            run=functools.partial(evaluation.evaluate_reconstruction, self),
        ),
        # rFVD and rFID (I3D on every held-out clip, Inception-v3 on every frame: costly on a
        # CPU): as config.evals.rfvd / rfid say; always in launch.eval.
        *[
            task_lib.Evaluator(
                name=f'r{network.name}',
                **task_lib.cadence(self.config, f'r{network.name}'),
                metrics=(f'r{network.name}', f'baseline_r{network.name}'),
                run=functools.partial(evaluation.evaluate_frechet, network, self),
            )
            for network in (frechet.FVD, frechet.FID)
        ],
    ]

  def attention_stacks(self) -> list[tuple[str, int, int, str]]:
    """(name, tokens, heads, context scheme) of each attention stack, for the start-up check
    of a context mesh axis (vitok.core.trainer.check_context_split)."""
    v, scheme = self.model_cfg.parsed, self.model_cfg.context_attention
    sizes = (('encoder', tokenizer.SIZES[v.encoder]), ('decoder', tokenizer.SIZES[v.decoder]))
    return [(name, self.tokens_per_clip, size.heads, scheme) for name, size in sizes]

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
