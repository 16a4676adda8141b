"""Diffusion objectives and samplers, as pure functions of a model function (no parameters here).

    model_fn(x, t_model, labels) -> output      x: (B, ...) latents; t_model: (B,) on a 0..1000 scale

DDPM (Ho et al.; improved-DDPM's learned variance, as DiT and ViTok trained):
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), linear betas 1e-4 -> 0.02, T = 1000.
    The network outputs [eps, v] (2c channels); the reverse variance is
    exp(f log beta_t + (1 - f) log beta~_t) with f = (v + 1) / 2.
    Loss = MSE(eps) + VB, VB = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dimension
    with a stop-gradient on the predicted mean (VB trains only the variance); at t = 0 the
    decoder term is the Gaussian NLL of x_0 (the latents are continuous, so the 8-bit
    discretised likelihood of image-space DDPM does not apply).
    Samplers: ancestral (the learned variance) and DDIM (eta), on any subsequence of the T steps
    (respacing: the betas are recomputed from abar on the subsequence, as improved-DDPM does).

Rectified flow (velocity prediction, as SiT / SD3):
    x_t = (1 - t) x_0 + t noise,  target v = noise - x_0,  t ~ logit-normal(m, s).
    Samplers: Euler and Heun from t = 1 to 0.

Classifier-free guidance scales only the noise / velocity prediction, never the variance
channels: out = uncond + g (cond - uncond); g = 1 is plain conditional sampling (one model
call, no null-class batch). Guidance may be limited to an interval of noise levels.
Every sampler is one `lax.fori_loop`, reproducible from its key.

Known frames (`Known`: a (B, t) mask over latent frames and their clean values): every loss and
sampler puts the clean values in place of the noisy ones wherever the mask is set, before each
model call and after each step, and tells the model the mask (`model_fn(..., known=mask)`); the
losses average over the unknown frames only. So conditioning frames are never noised, never
changed by sampling, and never trained on. Other per-clip conditions (`conditions`, e.g. the
frame stride) reach the model as keyword arguments; guidance keeps them in both of its halves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[..., jax.Array]  # (x, t_model, labels, **conditions) -> output


class Known(NamedTuple):
  """Latent frames given clean: `mask` (B, t) bool and `values` (B, t, ...) (read where set). A
  pytree: it passes into and out of jitted functions."""

  mask: jax.Array
  values: jax.Array

  def frames(self, x: jax.Array) -> jax.Array:
    """The mask broadcast over x (B, t, ...)."""
    return self.mask.reshape(self.mask.shape + (1,) * (x.ndim - 2))

  def apply(self, x: jax.Array) -> jax.Array:
    """x with the known frames put in place."""
    return jnp.where(self.frames(x), self.values.astype(x.dtype), x)


def _conditions(known: Known | None, conditions: dict | None) -> dict:
  out = dict(conditions or {})
  if known is not None:
    out['known'] = known.mask.astype(jnp.float32)
  return out


def _mean_over_unknown(x: jax.Array, known: Known | None) -> jax.Array:
  """Per-example mean of x (B, t, ...) over the frames the mask does not give (all frames
  without a mask); 0 for an example whose frames are all given."""
  if known is None:
    return _mean_per_example(x)
  weight = jnp.broadcast_to(1.0 - known.frames(x).astype(jnp.float32), x.shape)
  total = (x * weight).reshape(x.shape[0], -1).sum(axis=-1)
  return total / jnp.maximum(weight.reshape(x.shape[0], -1).sum(axis=-1), 1.0)


# ----------------------------------------------------------------------------------------------
# DDPM.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete Gaussian diffusion: the betas of its steps and the original timestep each step
  stands for (`timesteps`: what the network is told; the identity unless respaced). Arrays are
  float64 numpy, converted per use."""

  betas: np.ndarray
  timesteps: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self) -> np.ndarray:
    """beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t): the variance of q(x_{t-1} | x_t, x_0)."""
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_log_variance_clipped(self) -> np.ndarray:
    # beta~_0 = 0: its log is replaced by log beta~_1 (as improved-DDPM does).
    v = self.posterior_variance
    return np.log(np.append(v[1], v[1:]))

  @property
  def posterior_mean_coef1(self) -> np.ndarray:
    return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_mean_coef2(self) -> np.ndarray:
    return (
        (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)
    )


def linear_schedule(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
  """The DDPM linear betas, scaled as improved-DDPM does so that other step counts keep the same
  total noise (scale = 1000 / num_steps)."""
  scale = 1000.0 / num_steps
  betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
  return Schedule(betas=betas, timesteps=np.arange(num_steps))


def respace(schedule: Schedule, num_steps: int) -> Schedule:
  """The schedule on `num_steps` evenly spaced steps of `schedule` (first and last kept), betas
  recomputed so that abar on the kept steps is unchanged."""
  if not 1 <= num_steps <= schedule.num_steps:
    raise ValueError(f'sampling steps={num_steps} must be in [1, {schedule.num_steps}]')
  keep = np.unique(np.round(np.linspace(0, schedule.num_steps - 1, num_steps)).astype(int))
  abar = schedule.alphas_cumprod[keep]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return Schedule(betas=betas, timesteps=schedule.timesteps[keep])


def _at(values: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] for a batch of step indices, shaped to broadcast over (B, ...) of rank `ndim`."""
  out = jnp.asarray(values, jnp.float32)[t]
  return out.reshape(out.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t ~ q(x_t | x_0) for the given noise."""
  abar = _at(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior(schedule: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array):
  """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (
      _at(schedule.posterior_mean_coef1, t, xt.ndim) * x0
      + _at(schedule.posterior_mean_coef2, t, xt.ndim) * xt
  )
  return mean, _at(schedule.posterior_log_variance_clipped, t, xt.ndim)


def p_mean_variance(schedule: Schedule, eps: jax.Array, v: jax.Array, xt: jax.Array, t: jax.Array):
  """The model's Gaussian p(x_{t-1} | x_t) from its noise prediction `eps` and variance output
  `v` in [-1, 1]: (mean, log-variance, predicted x_0)."""
  abar = _at(schedule.alphas_cumprod, t, xt.ndim)
  x0 = (xt - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
  mean, min_log = q_posterior(schedule, x0, xt, t)
  max_log = _at(np.log(schedule.betas), t, xt.ndim)
  frac = (v + 1.0) / 2.0
  return mean, frac * max_log + (1.0 - frac) * min_log, x0


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (
      -1.0
      + logvar2
      - logvar1
      + jnp.exp(logvar1 - logvar2)
      + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def gaussian_nll(x, mean, logvar):
  """-log N(x; mean, exp(logvar)), elementwise, in nats."""
  return 0.5 * (math.log(2.0 * math.pi) + logvar + jnp.square(x - mean) * jnp.exp(-logvar))


def _mean_per_example(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).mean(axis=-1)


def ddpm_loss_terms(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    known: Known | None = None,
    conditions: dict | None = None,
) -> dict:
  """Per-example loss terms of one training batch (t uniform over the steps): 'mse' of the noise
  prediction, 'vb' in bits per dimension (learned variance; stop-gradient on the mean), and
  'loss' = mse + vb; over the unknown frames only when `known` is given."""
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  xt = q_sample(schedule, x0, t, noise)
  if known is not None:
    xt = known.apply(xt)
  model_t = jnp.asarray(schedule.timesteps)[t].astype(jnp.float32)
  out = model_fn(xt, model_t, labels, **_conditions(known, conditions))
  eps, v = jnp.split(out, 2, axis=-1)
  mse = _mean_over_unknown(jnp.square(noise - eps), known)
  # VB trains only the variance: the mean comes from a frozen copy of the noise prediction.
  mean, logvar, _ = p_mean_variance(schedule, jax.lax.stop_gradient(eps), v, xt, t)
  true_mean, true_logvar = q_posterior(schedule, x0, xt, t)
  kl = _mean_over_unknown(normal_kl(true_mean, true_logvar, mean, logvar), known) / math.log(2.0)
  nll = _mean_over_unknown(gaussian_nll(x0, mean, logvar), known) / math.log(2.0)
  vb = jnp.where(t == 0, nll, kl) * (schedule.num_steps / 1000.0)
  return {'mse': mse, 'vb': vb, 'loss': mse + vb, 't': t}


# ----------------------------------------------------------------------------------------------
# Rectified flow.
# ----------------------------------------------------------------------------------------------


def flow_interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x_0 + t noise (t = 0: data, t = 1: noise)."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * noise


def flow_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity d x_t / d t = noise - x_0."""
  return noise - x0


def logit_normal(key: jax.Array, n: int, mean: float = 0.0, std: float = 1.0) -> jax.Array:
  """t = sigmoid(N(mean, std^2)): more training at intermediate noise levels (SD3)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def flow_loss_terms(
    model_fn: ModelFn,
    x0: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    t_mean: float = 0.0,
    t_std: float = 1.0,
    known: Known | None = None,
    conditions: dict | None = None,
) -> dict:
  """Per-example velocity MSE ('mse' = 'loss') at logit-normal times; over the unknown frames
  only when `known` is given."""
  t_key, noise_key = jax.random.split(key)
  t = logit_normal(t_key, x0.shape[0], t_mean, t_std)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  xt = flow_interpolate(x0, noise, t)
  if known is not None:
    xt = known.apply(xt)
  out = model_fn(xt, 1000.0 * t, labels, **_conditions(known, conditions))
  mse = _mean_over_unknown(jnp.square(out - flow_target(x0, noise)), known)
  return {'mse': mse, 'loss': mse, 't': t}


# ----------------------------------------------------------------------------------------------
# Guidance and samplers.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance: `scale` (1 = none) applied while the noise level, as a fraction
  of the way from data (0) to pure noise (1), lies in [low, high]."""

  scale: float = 1.0
  null_class: int = 0
  low: float = 0.0
  high: float = 1.0


def guided(
    model_fn: ModelFn, guidance: Guidance, guided_channels: int, conditions: dict | None = None
) -> Callable:
  """(x, t_model, labels, level) -> output with the first `guided_channels` channels (noise or
  velocity) guided; the others (variance) are the conditional prediction's. `conditions` (per
  clip) reach both halves: only the class is dropped."""
  conditions = conditions or {}
  if guidance.scale == 1.0:
    return lambda x, t, labels, level: model_fn(x, t, labels, **conditions)
  doubled = jax.tree.map(lambda a: jnp.concatenate([a, a]), conditions)

  def fn(x, t, labels, level):
    both = model_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([labels, jnp.full_like(labels, guidance.null_class)]),
        **doubled,
    )
    cond, uncond = jnp.split(both, 2)
    scale = jnp.where((level >= guidance.low) & (level <= guidance.high), guidance.scale, 1.0)
    mixed = uncond[..., :guided_channels] + scale * (
        cond[..., :guided_channels] - uncond[..., :guided_channels]
    )
    return jnp.concatenate([mixed, cond[..., guided_channels:]], axis=-1)

  return fn


def ddpm_sample(
    schedule: Schedule,
    model_fn: ModelFn,
    shape: tuple,
    labels: jax.Array,
    key: jax.Array,
    guidance: Guidance = Guidance(),
    eta: float | None = None,
    known: Known | None = None,
    conditions: dict | None = None,
):
  """Samples x_0 by the reverse process on `schedule` (respace it for fewer steps): ancestral
  with the learned variance when `eta` is None, DDIM with that eta otherwise (0: deterministic).
  The model's output has [eps, v] channels. `known` frames are kept at their values."""
  n, channels = schedule.num_steps, shape[-1]
  fn = guided(model_fn, guidance, channels, _conditions(known, conditions))
  keep = known.apply if known is not None else lambda x: x
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  abar_prev = jnp.asarray(schedule.alphas_cumprod_prev, jnp.float32)
  timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
  x_key, loop_key = jax.random.split(key)

  def body(i, x):
    step = n - 1 - i
    t = jnp.full((shape[0],), step, jnp.int32)
    out = fn(x, jnp.full((shape[0],), timesteps[step]), labels, timesteps[step] / 999.0)
    eps, v = out[..., :channels], out[..., channels:]
    noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape)
    if eta is None:
      mean, logvar, _ = p_mean_variance(schedule, eps, v, x, t)
      return keep(mean + jnp.where(step > 0, jnp.exp(0.5 * logvar), 0.0) * noise)
    x0 = (x - jnp.sqrt(1.0 - abar[step]) * eps) / jnp.sqrt(abar[step])
    sigma = eta * jnp.sqrt(
        (1.0 - abar_prev[step]) / (1.0 - abar[step]) * (1.0 - abar[step] / abar_prev[step])
    )
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev[step] - sigma**2, 0.0)) * eps
    return keep(jnp.sqrt(abar_prev[step]) * x0 + direction + sigma * noise)

  return jax.lax.fori_loop(0, n, body, keep(jax.random.normal(x_key, shape)))


def flow_sample(
    model_fn: ModelFn,
    shape: tuple,
    labels: jax.Array,
    key: jax.Array,
    steps: int = 50,
    method: str = 'euler',
    guidance: Guidance = Guidance(),
    known: Known | None = None,
    conditions: dict | None = None,
):
  """Integrates dx/dt = v(x, t) from noise at t = 1 to data at t = 0 in `steps` uniform steps,
  by Euler or Heun (Heun's correction is skipped on the last step, which ends at t = 0).
  `known` frames are kept at their values."""
  if method not in ('euler', 'heun'):
    raise ValueError(f"sampler must be 'euler' or 'heun', got {method!r}")
  fn = guided(model_fn, guidance, shape[-1], _conditions(known, conditions))
  keep = known.apply if known is not None else lambda x: x
  times = jnp.linspace(1.0, 0.0, steps + 1)

  def velocity(x, t):
    return fn(x, jnp.full((shape[0],), 1000.0 * t), labels, t)

  def body(i, x):
    t, t_next = times[i], times[i + 1]
    v = velocity(x, t)
    x_euler = keep(x + (t_next - t) * v)
    if method == 'euler':
      return x_euler
    heun = lambda: keep(x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next)))
    return jax.lax.cond(i == steps - 1, lambda: x_euler, heun)

  return jax.lax.fori_loop(0, steps, body, keep(jax.random.normal(key, shape)))
