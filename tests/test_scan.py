"""model.scan: the blocks of a ViT stack or a DiT as one lax.scan over stacked parameters. The
same parameters give the same outputs and gradients as the unrolled blocks (with and without
rematerialisation), the compiled program stops growing with depth, and the stacked axis is
sharded by the rules ('layers': whole on every device)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common as config_common
from dit import model as dit_model
from vitok.core import sharding
from vitok.nn import layers
from vitok.tokenizer import model as tokenizer


def _stack_blocks(tree):
  """Unrolled parameters (a pure dict) in the scanned layout: the entries of every 'blocks' list,
  block i at index i of a new leading 'layers' axis."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == 'blocks':
      value = jax.tree.map(lambda *xs: np.stack(xs), *[value[i] for i in range(len(value))])
    out[key] = _stack_blocks(value)
  return out


def _split(make, scan, remat='none'):
  """(graphdef, abstract parameters) of a model, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: make(scan=scan, remat=remat)), nnx.Param)


def _random_like(abstract):
  """Small random values for every parameter (a DiT starts with zero outputs, whose gradients
  would compare nothing)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape).astype(x.dtype), abstract)


def _tokenizer(scan, remat='none'):
  cfg = tokenizer.TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4, scan=scan, remat=remat)
  return tokenizer.ViTok(cfg, rngs=nnx.Rngs(0))


def _dit(scan, remat='none'):
  cfg = dit_model.DiTConfig(
      variant='DiT-cpu64/1', grid=(2, 4, 4), channels=4, num_classes=3, scan=scan, remat=remat
  )
  return dit_model.DiT(cfg, rngs=nnx.Rngs(0))


def _tokenizer_loss(model):
  video = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 32, 32, 3), minval=-1, maxval=1)
  recon, mean, _ = model(video, key=jax.random.PRNGKey(2))
  return jnp.mean(jnp.square(recon - video)) + 1e-3 * jnp.mean(jnp.square(mean))


def _dit_loss(model):
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 4, 4, 4))
  out = model(x, jnp.array([10.0, 500.0, 990.0]), jnp.array([0, 2, 3]))
  return jnp.mean(jnp.square(out - 0.5))


@pytest.mark.parametrize(
    'make,loss_of,remat',
    [(_tokenizer, _tokenizer_loss, 'none'), (_dit, _dit_loss, 'full')],
    ids=['vitok', 'dit-remat'],
)
def test_scanned_blocks_equal_the_unrolled_blocks(make, loss_of, remat):
  graphdef, abstract = _split(make, scan=False)
  scanned_graphdef, scanned = _split(make, scan=True, remat=remat)
  params = _random_like(abstract)
  stacked = _stack_blocks(jax.device_get(params.to_pure_dict()))
  nnx.replace_by_pure_dict(scanned, stacked)  # the same parameters, stacked

  def value_and_grad(graphdef, params):
    run = jax.jit(jax.value_and_grad(lambda p: loss_of(nnx.merge(graphdef, p))))
    loss, grads = run(params)
    return float(loss), jax.device_get(grads.to_pure_dict())

  loss, grads = value_and_grad(graphdef, params)
  loss_scanned, grads_scanned = value_and_grad(scanned_graphdef, scanned)
  assert loss_scanned == pytest.approx(loss, rel=1e-5)
  jax.tree.map(
      lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6),
      grads_scanned,
      _stack_blocks(grads),
  )


def _program_size(depth: int, scan: bool) -> int:
  size = layers.ViTSize(width=64, depth=depth, heads=4)
  model = nnx.eval_shape(lambda: layers.ViT(size, scan=scan, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)  # abstract: lowering allocates nothing
  angles = layers.rope_angles((2, 4, 4), 16)
  loss = lambda p, x: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x, angles)))
  x = jax.ShapeDtypeStruct((2, 32, 64), jnp.float32)
  return len(jax.jit(jax.grad(loss)).lower(params, x).as_text())


def test_the_scanned_program_does_not_grow_with_depth():
  unrolled = _program_size(8, scan=False) / _program_size(2, scan=False)
  scanned = _program_size(8, scan=True) / _program_size(2, scan=True)
  assert unrolled > 2.5 and scanned < 1.1, (unrolled, scanned)


def test_stacked_parameters_are_sharded_by_the_rules():
  model = nnx.eval_shape(lambda: _dit(scan=True))
  params = nnx.state(model, nnx.Param)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(2, 4), axes=('data', 'fsdp'))))
  placed = sharding.abstract_placed(params, mesh, config_common.SHARDING_RULES)
  qkv = placed['blocks']['attn']['qkv']['kernel']
  depth = dit_model.DiTConfig(variant='DiT-cpu64/1').size.depth
  assert qkv.shape[0] == depth
  assert tuple(qkv.sharding.spec)[:2] == (None, 'fsdp')  # layers whole, width over fsdp


@pytest.mark.parametrize('scan, remat', [(True, 'none'), (False, 'full'), (True, 'full')])
def test_a_model_merged_outside_a_sampler_loop_runs_inside_it(scan, remat):
  """A sampler merges the DiT once and calls it in its loop, a deeper trace level than the
  model's; the blocks (scanned, rematerialised) still run there, and equal the plain blocks."""
  graphdef, abstract = _split(_dit, scan, remat)
  params = _random_like(abstract)
  plain = nnx.merge(_split(_dit, False)[0], _random_like(_split(_dit, False)[1]))
  if scan:  # the same weights as the plain model, stacked
    params = nnx.State(_stack_blocks(nnx.to_pure_dict(nnx.state(plain, nnx.Param))))
  else:
    nnx.update(plain, params)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 4, 4, 4))
  t, labels = jnp.full((2,), 500.0), jnp.array([0, 2])

  @jax.jit
  def sample(params):
    model = nnx.merge(graphdef, params)
    return jax.lax.fori_loop(0, 2, lambda i, x: x - 0.1 * model(x, t, labels)[..., :4], x)

  expected = x
  for _ in range(2):
    expected = expected - 0.1 * plain(expected, t, labels)[..., :4]  # the noise half
  np.testing.assert_allclose(sample(params), expected, rtol=2e-5, atol=2e-5)
