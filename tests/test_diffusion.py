"""The diffusion objectives and samplers against closed forms: forward noising, the posterior,
the learned-variance terms, flow-matching interpolation and target, guidance, determinism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit import diffusion as D

SCHEDULE = D.linear_schedule(1000)


def test_linear_schedule_is_ddpms():
  betas = SCHEDULE.betas
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
  np.testing.assert_allclose(SCHEDULE.alphas_cumprod, np.cumprod(1 - betas))
  assert 0 < SCHEDULE.alphas_cumprod[-1] < 1e-4  # almost pure noise at T


def test_forward_noising_has_the_closed_form_mean_and_variance():
  x0 = jnp.full((20000, 1), 0.7)
  t = jnp.full((20000,), 300)
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  xt = np.asarray(D.q_sample(SCHEDULE, x0, t, noise))
  abar = SCHEDULE.alphas_cumprod[300]
  assert xt.mean() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
  assert xt.var() == pytest.approx(1 - abar, rel=0.03)
  # Exactly: sqrt(abar) x0 + sqrt(1 - abar) noise.
  np.testing.assert_allclose(
      xt, math.sqrt(abar) * 0.7 + math.sqrt(1 - abar) * np.asarray(noise), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('step', [1, 10, 500, 999])
def test_posterior_is_the_product_of_the_two_gaussians(step):
  # q(x_{t-1} | x_t, x_0) is proportional to q(x_{t-1} | x_0) q(x_t | x_{t-1}): complete the square.
  x0, xt = 0.3, -1.2
  abar_prev = SCHEDULE.alphas_cumprod[step - 1]
  beta = SCHEDULE.betas[step]
  precision = 1 / (1 - abar_prev) + (1 - beta) / beta
  mean = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(1 - beta) * xt / beta) / precision
  got_mean, got_logvar = D.q_posterior(
      SCHEDULE, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([step])
  )
  assert float(got_mean[0, 0]) == pytest.approx(mean, rel=1e-4)
  assert math.exp(float(got_logvar[0, 0])) == pytest.approx(1 / precision, rel=1e-4)


def test_normal_kl_and_nll_match_numerical_integration():
  x = np.linspace(-20, 20, 400001)
  m1, v1, m2, v2 = 0.4, 0.5, -0.3, 2.0
  p = np.exp(-((x - m1) ** 2) / (2 * v1)) / np.sqrt(2 * np.pi * v1)
  q = np.exp(-((x - m2) ** 2) / (2 * v2)) / np.sqrt(2 * np.pi * v2)
  kl = np.trapezoid(p * (np.log(p + 1e-300) - np.log(q + 1e-300)), x)
  got = D.normal_kl(
      jnp.float32(m1), jnp.log(jnp.float32(v1)), jnp.float32(m2), jnp.log(jnp.float32(v2))
  )
  assert float(got) == pytest.approx(kl, rel=1e-4)
  nll = D.gaussian_nll(jnp.float32(0.1), jnp.float32(m2), jnp.log(jnp.float32(v2)))
  assert float(nll) == pytest.approx(-np.log(np.interp(0.1, x, q)), rel=1e-5)


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
  xt, eps = jnp.zeros((3, 2)), jnp.zeros((3, 2))
  t = jnp.array([5, 5, 5])
  v = jnp.array([[-1.0] * 2, [1.0] * 2, [0.0] * 2])
  _, logvar, _ = D.p_mean_variance(SCHEDULE, eps, v, xt, t)
  low, high = SCHEDULE.posterior_log_variance_clipped[5], math.log(SCHEDULE.betas[5])
  np.testing.assert_allclose(logvar[:, 0], [low, high, (low + high) / 2], rtol=1e-5)


def test_ddpm_loss_terms_mse_vb_and_the_stop_gradient():
  x0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
  labels = jnp.zeros((4,), jnp.int32)

  def model_fn(params):
    return lambda x, t, y: jnp.concatenate([params['eps'] * x, params['v'] * jnp.ones_like(x)], -1)

  params = {'eps': jnp.float32(0.5), 'v': jnp.float32(0.2)}
  terms = D.ddpm_loss_terms(SCHEDULE, model_fn(params), x0, labels, jax.random.PRNGKey(2))
  assert terms['mse'].shape == terms['vb'].shape == (4,)
  np.testing.assert_allclose(terms['loss'], terms['mse'] + terms['vb'], rtol=1e-6)
  assert np.all(terms['vb'] >= 0) or np.any(terms['t'] == 0)
  # The MSE closed form: recompute x_t with the same keys.
  t_key, noise_key = jax.random.split(jax.random.PRNGKey(2))
  noise = jax.random.normal(noise_key, x0.shape)
  xt = D.q_sample(SCHEDULE, x0, terms['t'], noise)
  np.testing.assert_allclose(
      terms['mse'], np.mean((np.asarray(noise) - 0.5 * np.asarray(xt)) ** 2, axis=(1, 2)), rtol=1e-5
  )

  # VB trains the variance only: d vb / d eps-head = 0, d vb / d v-head != 0.
  def vb(p):
    return D.ddpm_loss_terms(SCHEDULE, model_fn(p), x0, labels, jax.random.PRNGKey(2))['vb'].sum()

  grads = jax.grad(vb)(params)
  assert float(grads['eps']) == 0.0 and float(grads['v']) != 0.0


def test_vb_at_t0_is_the_decoder_nll_and_zero_when_the_model_is_exact():
  # With the true noise and the true posterior variance, the KL term vanishes (t > 0).
  x0 = jax.random.normal(jax.random.PRNGKey(3), (64, 8))
  key = jax.random.PRNGKey(4)
  t_key, noise_key = jax.random.split(key)
  noise = jax.random.normal(noise_key, x0.shape)
  t = jax.random.randint(t_key, (64,), 0, 1000)

  def oracle(x, t_model, y):
    v = -jnp.ones_like(x)  # log-variance = log beta~ (the true one for t > 0)
    return jnp.concatenate([noise, v], axis=-1)

  terms = D.ddpm_loss_terms(SCHEDULE, oracle, x0, jnp.zeros(64, jnp.int32), key)
  np.testing.assert_array_equal(terms['t'], t)
  assert float(jnp.max(jnp.where(t > 0, terms['vb'], 0.0))) < 2e-3
  assert float(jnp.max(terms['mse'])) < 1e-10


def test_flow_interpolation_and_velocity_target():
  x0 = jax.random.normal(jax.random.PRNGKey(5), (3, 4))
  noise = jax.random.normal(jax.random.PRNGKey(6), (3, 4))
  np.testing.assert_allclose(D.flow_interpolate(x0, noise, jnp.zeros(3)), x0)
  np.testing.assert_allclose(D.flow_interpolate(x0, noise, jnp.ones(3)), noise)
  # The target is d x_t / d t.
  t = jnp.array([0.2, 0.5, 0.9])
  derivative = jax.jacfwd(lambda s: D.flow_interpolate(x0, noise, s).sum(axis=1))(t)
  np.testing.assert_allclose(jnp.diag(derivative), D.flow_target(x0, noise).sum(axis=1), rtol=1e-5)
  times = D.logit_normal(jax.random.PRNGKey(7), 100000)
  assert 0 < float(times.min()) and float(times.max()) < 1
  assert float(jnp.median(times)) == pytest.approx(0.5, abs=0.01)


def _linear_model(scale=0.9):
  """A toy network whose output depends on the label: guidance must change it."""
  return lambda x, t, y: scale * x + (y[:, None, None].astype(jnp.float32) - 1.0) * 0.1


def test_guidance_one_is_conditional_sampling_and_guidance_changes_only_the_noise():
  shape, labels, key = (4, 6, 2), jnp.array([0, 1, 2, 3]), jax.random.PRNGKey(8)
  respaced = D.respace(SCHEDULE, 20)

  def ddpm_model(x, t, y):
    out = _linear_model()(x, t, y)
    return jnp.concatenate([out, jnp.zeros_like(out)], -1)  # [eps, v]

  plain = D.ddpm_sample(respaced, ddpm_model, shape, labels, key)
  unit = D.ddpm_sample(respaced, ddpm_model, shape, labels, key, D.Guidance(1.0, null_class=9))
  np.testing.assert_array_equal(plain, unit)
  assert not np.allclose(
      plain, D.ddpm_sample(respaced, ddpm_model, shape, labels, key, D.Guidance(3.0, null_class=9))
  )
  # Guided output: uncond + g (cond - uncond) on the noise channels; the variance channels are
  # the conditional ones.
  fn = D.guided(
      lambda x, t, y: jnp.concatenate([x + y[:, None, None], 10.0 * y[:, None, None] + 0 * x], -1),
      D.Guidance(3.0, null_class=0),
      2,
  )
  out = fn(jnp.zeros(shape), jnp.zeros(4), labels, 0.5)
  np.testing.assert_allclose(out[..., :2], 3.0 * labels[:, None, None] * jnp.ones(shape))
  np.testing.assert_allclose(out[..., 2:], 10.0 * labels[:, None, None] * jnp.ones(shape))
  outside = D.guided(
      lambda x, t, y: jnp.broadcast_to(y[:, None, None] * 1.0, x.shape),
      D.Guidance(3.0, null_class=0, low=0.0, high=0.3),
      2,
  )
  np.testing.assert_allclose(
      outside(jnp.zeros(shape), jnp.zeros(4), labels, 0.5), labels[:, None, None] * jnp.ones(shape)
  )


@pytest.mark.parametrize('sampler', ['ancestral', 'ddim', 'euler', 'heun'])
def test_samplers_are_deterministic_by_seed(sampler):
  shape, labels = (2, 3, 2), jnp.array([0, 1])
  if sampler in ('ancestral', 'ddim'):
    model = lambda x, t, y: jnp.concatenate([_linear_model()(x, t, y), jnp.zeros_like(x)], -1)
    eta = None if sampler == 'ancestral' else 0.5
    run = jax.jit(
        lambda key: D.ddpm_sample(D.respace(SCHEDULE, 10), model, shape, labels, key, eta=eta)
    )
  else:
    run = jax.jit(
        lambda key: D.flow_sample(_linear_model(), shape, labels, key, steps=10, method=sampler)
    )
  a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_flow_samplers_integrate_a_known_velocity_field():
  # v(x, t) = x - x0_target for the straight path from x0 to noise: x_t = (1-t) x0 + t n gives
  # v = n - x0 = (x_t - x0) / t. Integrating from t = 1 must land on x0.
  target = jnp.array([[0.5, -2.0]])
  model = lambda x, t, y: (x - target) / jnp.maximum(t[:, None] / 1000.0, 1e-6)
  for method, steps in (('euler', 10), ('heun', 10)):
    out = D.flow_sample(
        model, (1, 2), jnp.zeros(1, jnp.int32), jax.random.PRNGKey(3), steps=steps, method=method
    )
    np.testing.assert_allclose(out, target, atol=1e-4)


def test_ddim_eta0_keeps_the_predicted_data_fixed_along_the_path():
  # With a constant noise prediction n, every DDIM(eta=0) step keeps x on the path
  # x_t = sqrt(abar_t) x0' + sqrt(1 - abar_t) n of one x0', so the sample is the x0' of the
  # starting point: (x_T - sqrt(1 - abar_T) n) / sqrt(abar_T).
  n = jnp.array([[0.3, -0.7, 1.1]])
  key = jax.random.PRNGKey(11)
  x_T = jax.random.normal(jax.random.split(key)[0], (1, 3))  # the sampler's starting draw
  model = lambda x, t, y: jnp.concatenate([jnp.broadcast_to(n, x.shape), jnp.zeros_like(x)], -1)
  abar_T = SCHEDULE.alphas_cumprod[-1]
  expected = (x_T - math.sqrt(1 - abar_T) * n) / math.sqrt(abar_T)
  out = D.ddpm_sample(D.respace(SCHEDULE, 50), model, (1, 3), jnp.zeros(1, jnp.int32), key, eta=0.0)
  np.testing.assert_allclose(out, expected, rtol=1e-3)


def test_respacing_keeps_the_cumulative_noise_on_the_kept_steps():
  short = D.respace(SCHEDULE, 50)
  assert short.num_steps == 50 and short.timesteps[0] == 0 and short.timesteps[-1] == 999
  np.testing.assert_allclose(
      short.alphas_cumprod, SCHEDULE.alphas_cumprod[short.timesteps], rtol=1e-10
  )
  with pytest.raises(ValueError, match='steps'):
    D.respace(SCHEDULE, 0)


# ----------------------------------------------------------------------------------------------
# Known frames: given clean, never changed by sampling, never in the loss.
# ----------------------------------------------------------------------------------------------


def _known(batch=2, frames=4):
  mask = jnp.array([[True, False, False, True], [True, True, False, False]])[:batch, :frames]
  values = jax.random.normal(jax.random.PRNGKey(5), (batch, frames, 3, 2))
  return D.Known(mask, values)


@pytest.mark.parametrize('sampler', ['ancestral', 'ddim', 'euler', 'heun'])
@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_known_frames_are_untouched_through_sampling_and_the_model_is_told_them(sampler, guidance):
  known = _known()
  shape, labels = known.values.shape, jnp.array([0, 1])
  seen = []

  mismatches = []

  def model(x, t, y, known=None, stride=None):
    seen.append((known.shape, stride.shape))
    # The model sees the clean values wherever the mask is set, at every step.
    values = jnp.concatenate([known_values] * (x.shape[0] // known_values.shape[0]))
    mismatch = jnp.max(jnp.where(known[:, :, None, None] > 0, jnp.abs(x - values), 0.0))
    jax.debug.callback(lambda m: mismatches.append(float(m)), mismatch)
    out = 0.9 * x + (y[:, None, None, None] - 1.0) * 0.1 + 0.3
    return jnp.concatenate([out, jnp.zeros_like(out)], -1) if ddpm else out

  ddpm = sampler in ('ancestral', 'ddim')
  known_values = known.values
  stride = jnp.array([4, 1])
  guide = D.Guidance(guidance, null_class=9)
  if ddpm:
    eta = None if sampler == 'ancestral' else 0.0
    out = D.ddpm_sample(
        D.respace(SCHEDULE, 5),
        model,
        shape,
        labels,
        jax.random.PRNGKey(0),
        guide,
        eta=eta,
        known=known,
        conditions={'stride': stride},
    )
  else:
    out = D.flow_sample(
        model,
        shape,
        labels,
        jax.random.PRNGKey(0),
        steps=5,
        method=sampler,
        guidance=guide,
        known=known,
        conditions={'stride': stride},
    )
  mask = np.asarray(known.mask)
  np.testing.assert_array_equal(np.asarray(out)[mask], np.asarray(known.values)[mask])
  assert not np.allclose(np.asarray(out)[~mask], np.asarray(known.values)[~mask])
  doubled = 2 if guidance != 1.0 else 1  # guidance runs both halves with the same conditions
  assert seen and all(s == ((doubled * 2, 4), (doubled * 2,)) for s in seen)
  assert len(mismatches) >= 5 and max(mismatches) == 0.0


def test_the_loss_ignores_known_frames():
  """Known frames neither count in the loss nor reach the gradient; the unknown frames' loss is
  the same mean as without a mask, over fewer frames."""
  known = _known()
  x0 = known.values
  labels = jnp.zeros(2, jnp.int32)

  def model_fn(params, ddpm):
    def fn(x, t, y, known=None):
      out = params['w'] * x
      return jnp.concatenate([out, params['v'] * jnp.ones_like(x)], -1) if ddpm else out

    return fn

  params = {'w': jnp.float32(0.5), 'v': jnp.float32(0.2)}
  for ddpm in (True, False):

    def loss(p, x0):
      if ddpm:
        terms = D.ddpm_loss_terms(
            SCHEDULE,
            model_fn(p, True),
            x0,
            labels,
            jax.random.PRNGKey(2),
            known=D.Known(known.mask, x0),
        )
      else:
        terms = D.flow_loss_terms(
            model_fn(p, False), x0, labels, jax.random.PRNGKey(2), known=D.Known(known.mask, x0)
        )
      return terms['loss'].sum()

    # Changing the known frames' values changes neither the loss nor its gradient... once the
    # model cannot see them (this toy model maps each frame to itself).
    moved = jnp.where(known.frames(x0), x0 + 5.0, x0)
    np.testing.assert_allclose(loss(params, x0), loss(params, moved), rtol=1e-6)
    grad_x = jax.grad(loss, argnums=1)(params, x0)
    np.testing.assert_array_equal(np.asarray(grad_x)[np.asarray(known.mask)], 0.0)
    assert np.abs(np.asarray(grad_x)[~np.asarray(known.mask)]).sum() > 0

  # The closed form (flow): the mean over unknown frames of (w x_t - (noise - x0))^2.
  terms = D.flow_loss_terms(model_fn(params, False), x0, labels, jax.random.PRNGKey(2), known=known)
  t_key, noise_key = jax.random.split(jax.random.PRNGKey(2))
  t = D.logit_normal(t_key, 2)
  noise = jax.random.normal(noise_key, x0.shape)
  xt = D.flow_interpolate(x0, noise, t)
  error = np.asarray((0.5 * xt - (noise - x0)) ** 2)
  mask = np.asarray(known.mask)
  expected = [error[i][~mask[i]].mean() for i in range(2)]
  np.testing.assert_allclose(terms['mse'], expected, rtol=1e-5)
