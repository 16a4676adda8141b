"""ViTok stage 2: the decoder fine-tuned against a discriminator.

Stage 2 starts from a finished stage-1 run (its parameters only), freezes the encoder, the
bottleneck (`to_moments`) and the patch embedding, and trains the decoder side (`from_latent`,
`decoder`, `to_pixels`) on the stage-1 reconstruction loss plus an adversarial term, while a
StyleGAN-style discriminator (`vitok.tokenizer.discriminator`) learns to tell clips from reconstructions.
Both are updated in one compiled step by two optimizers (`param_groups`); the state is one
pytree, so checkpoints, resume and sharding work as in stage 1.

One scalar carries both objectives, each reading the other's network through `stop_gradient`, so
the gradient with respect to the decoder is the generator's and with respect to the discriminator
is the discriminator's:

    generator      L_rec(recon) + w(step) * lambda * (-mean D(recon))       D's parameters stopped
    discriminator  mean relu(1 - D(x)) + mean relu(1 + D(recon))            recon stopped
                   + lecam * (mean relu(D(x) - a_fake)^2 + mean relu(a_real - D(recon))^2)

w(step) = gan.weight x a linear ramp from 0 at `gan.start_step` to 1 at `gan.start_step +
gan.ramp_steps` (the discriminator trains from the first step, so it is useful when the generator
starts listening to it). lambda = 1, or with `gan.adaptive_weight` the VQGAN rule
||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4) at the decoder's last layer W, clipped to
[0, gan.adaptive_max]. LeCam (Tseng et al. 2021) anchors a_real, a_fake are EMAs (decay
`gan.lecam_decay`) of the discriminator's mean outputs; they live in the parameters as
`lecam_anchors`, updated by SGD with learning rate 1 - decay on 0.5 (a - mean D)^2, which is
exactly that EMA.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vitok.core import config_checks, hardware
from vitok.core import train_state as ts
from vitok.data import pixels
from vitok.tokenizer import discriminator as disc_lib
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer import stage1

# The tokenizer modules stage 2 keeps frozen (the latent space a downstream DiT was or will be
# trained on stays exactly the stage-1 one).
FROZEN_MODULES = ('patch_embed', 'encoder', 'to_moments')

# Model fields that change the tokenizer's parameters: they must equal the stage-1 run's.
# (Compute choices -- dtype, remat, attention -- may differ.)
_PARAMETER_FIELDS = ('variant', 'channels', 'mlp', 'scan')

GAN_FIELDS = {
    'gan.weight': config_checks.NON_NEGATIVE,
    'gan.start_step': config_checks.NON_NEGATIVE,
    'gan.ramp_steps': config_checks.Range(0, note='0 = switched on at once'),
    'gan.lecam': config_checks.NON_NEGATIVE,
    'gan.lecam_decay': config_checks.DECAY,
    'gan.adaptive_weight': config_checks.OneOf((True, False)),
    'gan.adaptive_max': config_checks.POSITIVE,
    'disc.kind': config_checks.OneOf(disc_lib.KINDS),
    'disc.channels': config_checks.AT_LEAST_1,
    'disc.max_channels': config_checks.AT_LEAST_1,
    'disc.dtype': config_checks.OneOf(('float32', 'bfloat16', 'auto')),
    'disc.frames': config_checks.Range(0, note='0 = every frame'),
    'disc_optim.lr': config_checks.POSITIVE,
    'disc_optim.b1': config_checks.DECAY,
    'disc_optim.b2': config_checks.DECAY,
    'disc_optim.weight_decay': config_checks.NON_NEGATIVE,
    'disc_optim.warmup_steps': config_checks.NON_NEGATIVE,
    'disc_optim.end_lr_fraction': config_checks.FRACTION,
    'disc_optim.clip_norm': config_checks.NON_NEGATIVE,
}


# --- the losses, as pure functions of discriminator logits ---


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))) (Lim & Ye 2017)."""
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
  """-mean(D(G(z))): the generator's side of the hinge game."""
  return -jnp.mean(fake_logits)


def adversarial_ramp(step: jax.Array, start_step: int, ramp_steps: int) -> jax.Array:
  """0 before `start_step`, then linear to 1 over `ramp_steps` steps (a step at once when 0)."""
  step = jnp.asarray(step, jnp.float32)
  if ramp_steps == 0:
    return (step >= start_step).astype(jnp.float32)
  return jnp.clip((step - start_step) / ramp_steps, 0.0, 1.0)


def lecam_regularizer(real_logits, fake_logits, anchor_real, anchor_fake) -> jax.Array:
  """mean(relu(D(x) - a_fake)^2) + mean(relu(a_real - D(G(z)))^2): keeps the discriminator's
  outputs near the other side's running mean (Tseng et al. 2021, their released form)."""
  return jnp.mean(jnp.square(jax.nn.relu(real_logits - anchor_fake))) + jnp.mean(
      jnp.square(jax.nn.relu(anchor_real - fake_logits))
  )


def adaptive_weight(rec_grad_norm, gan_grad_norm, max_weight: float) -> jax.Array:
  """||grad L_rec|| / (||grad L_gan|| + 1e-4), clipped to [0, max_weight], no gradient."""
  weight = rec_grad_norm / (gan_grad_norm + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


# --- the model ---


class Stage2Model(nnx.Module):
  """The tokenizer, its discriminator and the LeCam anchors, trained together. Called like the
  tokenizer (`model(video)`, `encode`, `decode`), so stage 1's evaluation runs on it unchanged."""

  def __init__(self, tokenizer_cfg, disc_cfg, frames: int, res: int, *, rngs: nnx.Rngs):
    self.tokenizer = tokenizer.ViTok(tokenizer_cfg, rngs=rngs)
    self.discriminator = disc_lib.Discriminator(disc_cfg, frames, res, rngs=rngs)
    self.lecam_anchors = nnx.Param(jnp.zeros((2,), jnp.float32))  # EMA of mean D(real), D(fake)

  def __call__(self, video, key=None):
    return self.tokenizer(video, key=key)

  def encode(self, video, key=None):
    return self.tokenizer.encode(video, key)

  def decode(self, z):
    return self.tokenizer.decode(z)


def param_group(path: tuple[str, ...]) -> str | None:
  """The optimizer of the parameter at `path`: 'decoder', 'discriminator', 'lecam_anchors', or
  None for the frozen encoder side."""
  if path[0] == 'tokenizer':
    return None if path[1] in FROZEN_MODULES else 'decoder'
  return path[0]


def stage2_loss(model: Stage2Model, batch, rng, frozen, step, config):
  """The summed generator and discriminator objectives of one batch (see the module docstring)."""
  gan = config.gan
  video = pixels.to_unit_range(batch['video'])
  sample_key, lpips_key, disc_key = jax.random.split(rng, 3)
  tok = model.tokenizer
  mean, logvar = tok.encode_moments(video)  # frozen: the train step stops its gradients
  z = tokenizer.sample(mean, logvar, sample_key)
  features = tok.decode_features(z)
  grid = z.shape[1:4]
  head_graph, head_state = nnx.split(tok.to_pixels)
  video_of = lambda head: tok.tokens_to_video(nnx.merge(head_graph, head)(features), grid)
  recon = video_of(head_state)
  rec_loss, terms = stage1.reconstruction_loss(
      recon, video, mean, logvar, frozen, config.loss, lpips_key
  )

  # The frames the discriminator judges (a 2-D discriminator may see a random subset per step).
  frames = config.disc.frames
  if config.disc.kind == '2d' and 0 < frames < video.shape[1]:
    chosen = jax.random.choice(disc_key, video.shape[1], (frames,), replace=False)
    judged = lambda v: jnp.take(v, chosen, axis=1)
  else:
    judged = lambda v: v

  # Generator: the discriminator is read through stop_gradient.
  disc_graph, disc_state = nnx.split(model.discriminator)
  judge = nnx.merge(disc_graph, jax.lax.stop_gradient(disc_state))
  g_adv = generator_adversarial_loss(judge(judged(recon)))
  ramp = adversarial_ramp(step, gan.start_step, gan.ramp_steps)
  if gan.adaptive_weight:

    def head_grad_norm(loss_of_video):
      grads = jax.grad(lambda head: loss_of_video(video_of(head)))(head_state)
      return optax.global_norm(grads['kernel'])

    rec_of = lambda v: stage1.reconstruction_loss(
        v, video, mean, logvar, frozen, config.loss, lpips_key
    )[0]
    scale = adaptive_weight(
        head_grad_norm(rec_of),
        head_grad_norm(lambda v: generator_adversarial_loss(judge(judged(v)))),
        gan.adaptive_max,
    )
  else:
    scale = jnp.ones(())
  gan_weight = gan.weight * ramp * scale

  # Discriminator: real clips and stopped reconstructions in one pass.
  logits = model.discriminator(
      judged(jnp.concatenate([video, jax.lax.stop_gradient(recon)], axis=0))
  )
  real, fake = jnp.split(logits, 2, axis=0)
  d_hinge = hinge_discriminator_loss(real, fake)
  anchors = model.lecam_anchors[...]
  lecam = lecam_regularizer(
      real, fake, jax.lax.stop_gradient(anchors[0]), jax.lax.stop_gradient(anchors[1])
  )
  means = jax.lax.stop_gradient(jnp.stack([jnp.mean(real), jnp.mean(fake)]))
  anchor_fit = 0.5 * jnp.sum(jnp.square(anchors - means))  # its SGD step is the anchors' EMA

  loss = rec_loss + gan_weight * g_adv + d_hinge + gan.lecam * lecam + anchor_fit
  terms.update(
      rec_loss=rec_loss,
      g_adv=g_adv,
      gan_weight=gan_weight,
      gan_scale=scale,
      d_loss=d_hinge,
      d_real=jnp.mean(real),
      d_fake=jnp.mean(fake),
      d_accuracy=0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0)),
      lecam=lecam,
  )
  return loss, terms


# --- the task ---


class Stage2Task(stage1.TokenizerTask):
  """ViTok stage 2 as a `vitok.core.task.Task`: stage 1's data, evaluation and reports, with the
  adversarial objective, two optimizers and the frozen encoder side."""

  name = 'vitok_stage2'
  progress_metrics = ('train_psnr', 'd_accuracy')

  def __init__(self, config):
    super().__init__(config)
    config_checks.check_fields(config, GAN_FIELDS)
    self.disc_cfg = disc_lib.DiscriminatorConfig.from_config(
        hardware.with_compute_dtype(config.disc)
    )
    try:
      self.disc_cfg.levels(config.data.res)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None
    frames = config.disc.frames
    if frames > config.data.frames or (frames and config.disc.kind == '3d'):
      raise config_checks.ConfigError(
          f'config.disc.frames={frames} must be 0 (every frame) or, for a 2-D discriminator, at '
          f'most data.frames={config.data.frames}'
      )
    self.judged_frames = frames or config.data.frames

  def create_model(self, rngs: nnx.Rngs) -> Stage2Model:
    d = self.config.data
    return Stage2Model(self.model_cfg, self.disc_cfg, d.frames, d.res, rngs=rngs)

  def loss_fn(self, model, batch, rng, frozen, step):
    return stage2_loss(model, batch, rng, frozen, step, self.config)

  def param_groups(self, total_steps: int) -> ts.ParamGroups:
    batch = self.config.data.batch_size
    decoder, schedule = ts.make_optimizer(self.config.optim, batch, total_steps)
    discriminator, _ = ts.make_optimizer(self.config.disc_optim, batch, total_steps)
    return ts.ParamGroups(
        group=param_group,
        optimizers={
            'decoder': decoder,
            'discriminator': discriminator,
            'lecam_anchors': optax.sgd(1.0 - self.config.gan.lecam_decay),
        },
        schedule=schedule,
    )

  def warm_start(self, params, mesh):
    """`params` with the tokenizer replaced by the stage-1 run's (`config.stage1`); the
    discriminator and anchors keep their initialisation."""
    source = self.config.stage1
    if not source:
      raise config_checks.ConfigError(
          'config.stage1 is empty: stage 2 fine-tunes a finished stage-1 run; set it to that '
          "run's --workdir (or a launch.export directory)"
      )
    check_same_tokenizer(self.config, source)
    stage1_run = frozen_tokenizer.open_tokenizer(source, mesh, self.config.sharding_rules)
    print(f'stage 2 starts from {stage1_run.source}', flush=True)
    params['tokenizer'] = stage1_run.params
    return params

  def train_flops_per_clip(self) -> int:
    """Model FLOPs of one training clip: encoder forward only (frozen), decoder forward and
    backward, and the discriminator on real and reconstructed clips (forward and backward) and
    once more on reconstructions for the generator (forward and backward to the input)."""
    d = self.config.data
    macs = tokenizer.forward_macs(self.model_cfg, d.frames, d.res)
    disc = disc_lib.forward_macs(self.disc_cfg, self.judged_frames, d.res)
    return 2 * macs['encoder'] + 6 * macs['decoder'] + 18 * disc

  def describe(self) -> dict:
    out = super().describe()
    d = self.config.data
    disc = nnx.eval_shape(
        lambda: disc_lib.Discriminator(self.disc_cfg, d.frames, d.res, rngs=nnx.Rngs(0))
    )
    count = sum(x.size for x in jax.tree.leaves(nnx.state(disc, nnx.Param)))
    out.update(
        task=self.name,
        params_discriminator_M=round(count / 1e6, 2),
        gmacs_discriminator=round(
            disc_lib.forward_macs(self.disc_cfg, self.judged_frames, d.res) / 1e9, 2
        ),
    )
    return out


def check_same_tokenizer(config, source: str) -> None:
  """Raises ConfigError naming every parameter-shaping model field that differs from the stage-1
  run in `source` (its config.json)."""
  theirs = frozen_tokenizer.read_tokenizer_config(source).model
  # A run saved before a field existed has that field's default.
  defaults = {f.name: f.default for f in dataclasses.fields(tokenizer.TokenizerConfig)}
  theirs = {k: theirs.get(k, defaults[k]) for k in _PARAMETER_FIELDS}
  differ = [
      f'model.{k}={config.model[k]!r} but the stage-1 run has {theirs[k]!r}'
      for k in _PARAMETER_FIELDS
      if theirs[k] != config.model[k]
  ]
  if differ:
    raise config_checks.ConfigError(
        f'config.stage1={source}: the tokenizer differs: {"; ".join(differ)} '
        f'({os.path.join(source, "config.json")})'
    )
