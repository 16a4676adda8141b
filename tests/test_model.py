"""The ViTok network: shapes, dtypes, parameter counts and MACs, RoPE, KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitok.data import pixels
from vitok.nn import layers
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer.model import TokenizerConfig, ViTok


def tiny(**kw):
  return ViTok(
      TokenizerConfig(**{'variant': 'cpu128-cpu128/2x8', 'channels': 4, **kw}), rngs=nnx.Rngs(0)
  )


def test_encode_decode_shapes_and_dtypes():
  model = tiny()
  video = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 32, 48, 3), minval=-1, maxval=1)
  z = model.encode(video)
  assert z.shape == (2, 2, 4, 6, 4) and z.dtype == jnp.float32
  recon = model.decode(z)
  assert recon.shape == video.shape and recon.dtype == jnp.float32
  # Mean at evaluation is deterministic; a key draws a different sample around it.
  np.testing.assert_array_equal(z, model.encode(video))
  z_sample = model.encode(video, key=jax.random.PRNGKey(1))
  assert z_sample.shape == z.shape and not np.allclose(z_sample, z)
  recon2, mean, logvar = model(video)
  np.testing.assert_allclose(recon2, recon, atol=1e-5)
  assert mean.shape == logvar.shape == z.shape


def test_images_are_single_frame_clips():
  model = ViTok(TokenizerConfig(variant='cpu128-cpu128/16', channels=8), rngs=nnx.Rngs(0))
  img = jnp.zeros((3, 1, 32, 32, 3))
  assert model.encode(img).shape == (3, 1, 2, 2, 8)
  assert model.decode(model.encode(img)).shape == img.shape


def test_bf16_compute_keeps_float32_params():
  model = tiny(dtype='bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  video = jnp.zeros((1, 2, 16, 16, 3))
  assert model.patch_embed(jnp.zeros((1, 2 * 8 * 8 * 3))).dtype == jnp.bfloat16
  assert model(video)[0].dtype == jnp.float32  # pixels are returned in float32


@pytest.mark.parametrize(
    'variant, enc, dec, total',
    [
        ('S-B/4x8', 43.3, 85.8, 129.0),
        ('S-L/4x8', 43.3, 383.7, 426.8),
        ('S-B/16', 43.3, 85.8, 129.0),
    ],
)
def test_parameter_counts_match_the_paper(variant, enc, dec, total):
  counts = tokenizer.count_params(TokenizerConfig(variant=variant, channels=16))
  assert counts['encoder'] / 1e6 == pytest.approx(enc, rel=0.01)
  assert counts['decoder'] / 1e6 == pytest.approx(dec, rel=0.01)
  assert counts['total'] / 1e6 == pytest.approx(total, rel=0.01)


def test_macs_match_the_paper():
  sb = TokenizerConfig(variant='S-B/16', channels=16)
  assert tokenizer.forward_macs(sb, 1, 256)['total'] / 1e9 == pytest.approx(34.8, rel=0.05)
  assert tokenizer.forward_macs(sb, 1, 512)['total'] / 1e9 == pytest.approx(160.8, rel=0.05)
  video_sb = TokenizerConfig(variant='S-B/4x8', channels=16)
  assert tokenizer.forward_macs(video_sb, 16, 128)['total'] / 1e9 == pytest.approx(160.8, rel=0.05)
  sl = TokenizerConfig(variant='S-L/16', channels=16)
  assert tokenizer.forward_macs(sl, 1, 256)['total'] / 1e9 == pytest.approx(113.4, rel=0.05)


def test_analytic_macs_agree_with_xla_cost_analysis():
  cfg = TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: ViTok(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  forward = lambda p, v: nnx.merge(graphdef, p)(v)[0]
  compiled = (
      jax.jit(forward).lower(params, jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32)).compile()
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = tokenizer.forward_macs(cfg, 4, 32)['total']
  # XLA also counts element-wise work (norms, activations, RoPE), so it is a little higher.
  assert analytic <= cost['flops'] / 2 <= 1.3 * analytic


@pytest.mark.parametrize(
    'variant, message',
    [
        ('S-X/4x8', 'unknown decoder size'),
        ('Q-B/4x8', 'unknown encoder size'),
        ('S-B-4x8', 'malformed'),
        ('SB/4x8', 'malformed'),
    ],
)
def test_bad_variants_name_the_field(variant, message):
  with pytest.raises(ValueError, match=message) as err:
    tokenizer.parse_variant(variant)
  assert 'model.variant' in str(err.value)


def test_parse_variant():
  assert tokenizer.parse_variant('S-L/4x8') == tokenizer.Variant('S', 'L', 4, 8)
  assert tokenizer.parse_variant('B-S/16') == tokenizer.Variant('B', 'S', 1, 16)


def test_grid_errors_name_the_setting():
  cfg = TokenizerConfig(variant='S-B/4x8')
  assert cfg.latent_grid(16, 128) == (4, 16, 16)
  with pytest.raises(ValueError, match='data.frames=6'):
    cfg.latent_grid(6, 128)
  with pytest.raises(ValueError, match='data.res=100'):
    cfg.latent_grid(16, 100)
  with pytest.raises(ValueError, match='model.channels'):
    TokenizerConfig(channels=0)


@pytest.mark.parametrize('kind', ['3d', '1d'])
def test_rope_logits_depend_only_on_relative_position(kind):
  grid, head_dim = (3, 4, 5), 32
  angles = layers.rope_angles(grid, head_dim, kind)
  q = jax.random.normal(jax.random.PRNGKey(0), (head_dim,))
  k = jax.random.normal(jax.random.PRNGKey(1), (head_dim,))
  L = int(np.prod(grid))
  rq = layers.apply_rope(jnp.broadcast_to(q, (1, L, 1, head_dim)), angles)[0, :, 0]
  rk = layers.apply_rope(jnp.broadcast_to(k, (1, L, 1, head_dim)), angles)[0, :, 0]
  logits = np.asarray(rq @ rk.T)
  coords = np.stack(np.meshgrid(*map(np.arange, grid), indexing='ij'), -1).reshape(-1, 3)
  pos = coords if kind == '3d' else np.arange(L)[:, None]
  # Every pair of token pairs with the same offset has the same logit...
  by_offset = {}
  for i in range(L):
    for j in range(L):
      by_offset.setdefault(tuple(pos[i] - pos[j]), []).append(logits[i, j])
  spreads = [np.ptp(v) for v in by_offset.values()]
  assert max(spreads) < 1e-4
  # ...and different offsets do give different logits (the embedding is not trivial).
  assert np.ptp([v[0] for v in by_offset.values()]) > 1e-2
  # Rotation preserves norms.
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)


def test_3d_rope_uses_every_axis():
  angles = layers.rope_angles((2, 3, 4), 64, '3d')
  pairs = layers._axis_pairs(32, 3)
  assert sum(pairs) == 32 and min(pairs) >= 10
  # Moving one step along w changes only the w-group of angles.
  delta = np.asarray(angles[1] - angles[0])
  assert np.all(delta[: pairs[0] + pairs[1]] == 0) and np.all(delta[pairs[0] + pairs[1] :] != 0)


def test_kl_matches_numerical_integration():
  mean = jnp.array([[0.3, -1.2], [0.0, 2.0]])
  logvar = jnp.array([[-0.5, 0.7], [0.0, -2.0]])
  kl = np.asarray(
      tokenizer.kl_divergence(mean[:, :, None, None, None], logvar[:, :, None, None, None])
  )
  # KL(p || N(0,1)) = integral p log(p/q), by the trapezoid rule on a fine grid.
  x = np.linspace(-20, 20, 400_001)

  def numeric(m, lv):
    s = np.exp(0.5 * lv)
    log_p = -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    log_q = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
    return np.trapezoid(np.exp(log_p) * (log_p - log_q), x)

  expected = np.array(
      [
          [numeric(m, lv) for m, lv in zip(row_m, row_l)]
          for row_m, row_l in zip(np.asarray(mean), np.asarray(logvar))
      ]
  ).mean(axis=1)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  assert (
      float(tokenizer.kl_divergence(jnp.zeros((1, 2, 2, 2, 4)), jnp.zeros((1, 2, 2, 2, 4)))[0])
      == 0.0
  )


def test_logvar_is_clamped():
  model = tiny(logvar_min=-1.0, logvar_max=1.0)
  model.to_moments.bias[...] = model.to_moments.bias[...].at[4:].set(100.0)
  _, logvar = model.encode_moments(jnp.zeros((1, 2, 16, 16, 3)))
  assert float(logvar.max()) == 1.0


def test_uint8_conversions_round_trip():
  x = jnp.arange(256, dtype=jnp.uint8).reshape(1, 1, 16, 16, 1)
  f = pixels.to_unit_range(x)
  assert float(f.min()) == -1.0 and float(f.max()) == 1.0
  np.testing.assert_array_equal(pixels.to_uint8(f), x)
