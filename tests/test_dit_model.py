"""The DiT network: adaLN-Zero identity at init, the original DiT's parameter and GMAC counts,
shapes, conditioning, sizes that do not collide with the tokenizer's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit import model as M
from vitok.tokenizer import model as tokenizer

TINY = dict(variant='DiT-cpu64/1', grid=(2, 4, 4), channels=4, num_classes=10)


def _model(**kw):
  return M.DiT(M.DiTConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    'size,depth,width,params_m,gmacs',
    [
        ('S', 12, 384, 33, 6.06),
        ('B', 12, 768, 130, 23.01),
        ('L', 24, 1024, 458, 80.71),
        ('XL', 28, 1152, 675, 118.64),
    ],
)
def test_classic_recipe_matches_the_dit_paper(size, depth, width, params_m, gmacs):
  # 256x256 images = 32x32x4 SD-VAE latents, patch 2, learned sigma, 1000 classes.
  cfg = M.DiTConfig(
      variant=f'DiT-{size}/2', recipe='classic', grid=(1, 32, 32), channels=4, num_classes=1000
  )
  d, tokens, patch_values, out_values = width, 16 * 16, 2 * 2 * 4, 2 * 2 * 8  # 8: noise, sigma
  # Trainable parameters of facebookresearch/DiT's model by hand (its sin-cos position embedding
  # is fixed; its LayerNorms have no scale or bias): the patch embedding, the timestep MLP
  # (256 frequencies -> d -> d), the 1000 + 1 class embeddings (one for classifier-free
  # guidance), per block q/k/v, projection, MLP (4d) and adaLN (6d), all with biases, then the
  # final adaLN (2d) and linear layer.
  block = (
      (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 6 * d * (d + 1)
  )
  params = (
      (patch_values * d + d)
      + (256 * d + d + d * d + d)
      + 1001 * d
      + depth * block
      + (2 * d * (d + 1) + out_values * d + out_values)
  )
  assert M.count_params(cfg) == params
  assert abs(params / 1e6 - params_m) <= 0.5  # the paper's table rounds to whole millions
  # Multiply-accumulates by hand: the matmuls above per token (the adaLN ones per clip: their
  # input is the conditioning vector), and per block the attention products 2 x tokens^2 x d.
  macs = (
      tokens * patch_values * d
      + (256 * d + d * d)
      + depth * (tokens * 12 * d * d + 2 * tokens * tokens * d + 6 * d * d)
      + (2 * d * d + tokens * d * out_values)
  )
  assert M.forward_macs(cfg) == macs
  # The paper's figures (rounded to 0.01 G) exceed these by (2 x depth + 1) x tokens x d for all
  # four sizes, to within that rounding: one operation per token and channel of each adaLN
  # modulation (two per block, one in the final layer), elementwise work not counted here.
  assert abs(macs + (2 * depth + 1) * tokens * d - gmacs * 1e9) <= 0.005e9


def test_every_block_starts_as_the_identity_and_the_output_is_zero():
  for recipe, mixer in (('vitok', 'attention'), ('classic', 'attention'), ('vitok', 'mate')):
    model = _model(recipe=recipe, mixer=mixer)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4, 4, 4))
    t, y = jnp.array([0.0, 500.0, 999.0]), jnp.array([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == (3, 2, 4, 4, 8)  # 2c: noise and variance
    np.testing.assert_array_equal(out, 0.0)
    tokens = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 64))
    cond = jax.random.normal(jax.random.PRNGKey(2), (3, 64))
    for block in model.blocks:
      np.testing.assert_array_equal(block(tokens, cond, None, grid=(2, 4, 4)), tokens)


def test_the_output_depends_on_input_time_and_class_once_trained_away_from_zero():
  model = _model()
  # Perturb the zero-initialised layers as training would.
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and not np.any(var[...]):
      var[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), var.shape)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 4, 4, 4))
  base = model(x, jnp.array([10.0, 10.0]), jnp.array([1, 1]))
  assert not np.allclose(base, model(x * 0.5, jnp.array([10.0, 10.0]), jnp.array([1, 1])))
  assert not np.allclose(base, model(x, jnp.array([900.0, 900.0]), jnp.array([1, 1])))
  assert not np.allclose(base, model(x, jnp.array([10.0, 10.0]), jnp.array([2, 10])))


def test_patches_tokens_and_bf16():
  cfg = M.DiTConfig(
      variant='DiT-cpu64/2',
      grid=(2, 4, 4),
      channels=4,
      num_classes=10,
      learn_sigma=False,
      dtype='bfloat16',
  )
  assert cfg.tokens == 2 * 2 * 2 and cfg.out_channels == 4
  model = M.DiT(cfg, rngs=nnx.Rngs(0))
  out = model(jnp.ones((1, 2, 4, 4, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
  assert out.shape == (1, 2, 4, 4, 4) and out.dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  # The null class of classifier-free guidance has its own embedding row.
  assert model.y_embed.embedding.shape == (11, 64)


def test_bf16_gradients_sum_over_tokens_in_float32():
  """The adaLN shift / scale / gate gradients are sums over every token. In bfloat16, XLA:CPU
  computes such sums as slow windowed trees, so they must be float32 (the modulation's dtype)."""
  cfg = M.DiTConfig(
      variant='DiT-cpu64/2', grid=(2, 8, 8), channels=4, num_classes=10, dtype='bfloat16'
  )
  graphdef, params = nnx.split(M.DiT(cfg, rngs=nnx.Rngs(0)), nnx.Param)

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x, jnp.ones(2), jnp.ones(2, jnp.int32))
    return jnp.mean(out**2)

  text = jax.jit(jax.grad(loss)).lower(params, jnp.ones((2, 2, 8, 8, 4))).as_text()
  reduced = re.findall(r'stablehlo\.reduce\(.*?: \((tensor<[^>]*>)', text)
  assert any(re.fullmatch(r'tensor<2x32x64xf32>', t) for t in reduced)  # (batch, tokens, width)
  assert not [t for t in reduced if re.fullmatch(r'tensor<\d+x\d+x\d+xbf16>', t)]


def test_sizes_are_named_apart_from_the_tokenizers():
  assert not set(f'DiT-{s}' for s in M.SIZES) & set(tokenizer.SIZES)
  assert (M.SIZES['S'].width, M.SIZES['L'].width) != (
      tokenizer.SIZES['S'].width,
      tokenizer.SIZES['L'].width,
  )
  with pytest.raises(ValueError, match='DiT-<size>/<patch>'):
    M.DiTConfig(variant='L/2')
  with pytest.raises(ValueError, match="unknown DiT size 'Ti'"):
    M.DiTConfig(variant='DiT-Ti/2')
  with pytest.raises(ValueError, match='does not divide'):
    M.DiTConfig(variant='DiT-S/3', grid=(1, 8, 8))
  with pytest.raises(ValueError, match='model.recipe'):
    M.DiTConfig(recipe='llama')


def test_frame_mask_and_stride_conditioning_reach_the_output_and_start_as_no_ops():
  model = _model(frame_mask=True, strides=(1, 2, 4))
  assert model.patch_embed.kernel.shape[0] == 5  # c + the mask channel
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 4, 4, 4))
  t, y = jnp.array([10.0, 10.0]), jnp.array([1, 1])
  with pytest.raises(ValueError, match='needs each clip'):
    model(x, t, y)
  for path, var in nnx.iter_graph(model):  # away from the zero initialisation, as training would
    if isinstance(var, nnx.Param) and not np.any(var[...]):
      var[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), var.shape)
  stride = jnp.array([1, 1])
  base = model(x, t, y, known=jnp.zeros((2, 2)), stride=stride)
  np.testing.assert_array_equal(base, model(x, t, y, stride=stride))  # no mask = nothing known
  known = model(x, t, y, known=jnp.array([[1.0, 0.0], [1.0, 0.0]]), stride=stride)
  assert not np.allclose(base, known)
  other = model(x, t, y, known=jnp.zeros((2, 2)), stride=jnp.array([4, 2]))
  assert not np.allclose(base[0], other[0]) and not np.allclose(base[1], other[1])
  with pytest.raises(ValueError, match='without model.frame_mask'):
    _model()(x, t, y, known=jnp.zeros((2, 2)))
  with pytest.raises(Exception, match='distinct positive frame strides'):
    M.DiTConfig(**{**TINY, 'strides': (1, 1)})


def test_a_clip_longer_than_trained_runs_with_positions_past_the_trained_range():
  """ExVideo's question: the same parameters on 4x the trained latent frames; the first frames'
  output changes (attention now sees more frames) but the shapes follow the input."""
  model = _model()
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and not np.any(var[...]):
      var[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), var.shape)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 4, 4, 4))
  out = model(x, jnp.array([10.0]), jnp.array([1]))
  assert out.shape == (1, 8, 4, 4, 8) and np.isfinite(out).all()
