"""Low-precision matmuls (vitok/nn/matmul.py) and the layers that use them: the values of
bf16 x bf16 -> f32 matmuls rounded once, against float64 on the same rounded inputs; gradients;
every matmul of forward and backward kept in bfloat16; float32 layers unchanged."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitok.nn import layers, matmul

BF16_ULP = 2.0**-7  # spacing of bfloat16 numbers relative to their magnitude (8-bit significand)


def _inputs(shape_x, shape_w, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape_x), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal(shape_w) / np.sqrt(shape_w[0]), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal(shape_w[1:]), jnp.float32)
  return x, w, b


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize('shape_w', [(48, 40), (48, 3, 4, 5)])  # a Dense and a fused q/k/v kernel
def test_forward_is_the_rounded_float32_accumulation(shape_w):
  x, w, b = _inputs((2, 7, 48), shape_w)
  y = matmul.low_precision_dense(x, w, b)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 7) + shape_w[1:]
  ref = np.tensordot(_f64(x), _f64(w), axes=1) + _f64(b)
  # One rounding to bfloat16 of a float32 sum: within one bfloat16 spacing of the exact value.
  np.testing.assert_allclose(_f64(y), ref, rtol=BF16_ULP, atol=1e-6)


@pytest.mark.parametrize('shape_w', [(48, 40), (48, 3, 4, 5)])
def test_gradients_match_float64(shape_w):
  x, w, b = _inputs((2, 7, 48), shape_w, seed=1)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7) + shape_w[1:]), jnp.bfloat16)
  _, vjp = jax.vjp(matmul.low_precision_dense, x, w, b)
  dx, dw, db = vjp(g)
  assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  rest = len(shape_w) - 1
  ref_dx = np.tensordot(_f64(g), _f64(w), axes=(list(range(2, 2 + rest)), list(range(1, 1 + rest))))
  ref_dw = np.tensordot(_f64(x), _f64(g), axes=([0, 1], [0, 1]))
  ref_db = _f64(g).sum(axis=(0, 1))
  for got, ref in ((dx, ref_dx), (dw, ref_dw), (db, ref_db)):
    np.testing.assert_allclose(_f64(got), ref, rtol=BF16_ULP, atol=1e-5)


def test_without_bias_and_under_jit():
  x, w, _ = _inputs((5, 48), (48, 8))
  y = jax.jit(matmul.low_precision_dense)(x, w, None)
  np.testing.assert_allclose(_f64(y), _f64(x) @ _f64(w), rtol=BF16_ULP, atol=1e-6)
  dx, dw = jax.grad(lambda x, w: jnp.sum(matmul.low_precision_dense(x, w, None)), (0, 1))(x, w)
  np.testing.assert_allclose(_f64(dw), np.tile(_f64(x).sum(0)[:, None], (1, 8)), rtol=BF16_ULP)
  assert dx.shape == x.shape


def _dot_operand_types(fn, *args) -> list[str]:
  """The element types of every dot_general in the lowered (StableHLO) program of `fn`."""
  text = jax.jit(fn).lower(*args).as_text()
  return re.findall(r'stablehlo\.dot_general.*?:\s*\((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)', text)


@pytest.mark.parametrize('attention', ['xla', 'blockwise'])
def test_every_matmul_of_a_bfloat16_block_step_is_bf16_by_bf16(attention):
  """Forward and backward of a bfloat16 transformer block, with either CPU attention: every
  matmul multiplies two bfloat16 operands (a float32 operand would make XLA:CPU run it as a
  float32 matmul). jax.nn.dot_product_attention does not have this property: its backward
  multiplies float32 score gradients with bfloat16 values."""
  block = layers.Block(32, 4, 'swiglu', attention=attention, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(block)
  x = jnp.ones((2, 16, 32), jnp.float32)
  angles = layers.rope_angles((1, 4, 4), 8)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x, angles).astype(jnp.float32) ** 2)

  kinds = [
      tuple(re.findall(r'x(bf16|f32)>', ops))
      for ops, _ in _dot_operand_types(jax.grad(loss), params, x)
  ]
  # 4 projections (qkv, out, gate_up, down) x (forward, dx, dw) and 2 + 4 attention matmuls;
  # the only float32 one is the backward's rowsum(do * o), a (B, L, H) reduction.
  assert kinds.count(('bf16', 'bf16')) >= 18
  assert set(kinds) <= {('bf16', 'bf16'), ('f32', 'f32')} and kinds.count(('f32', 'f32')) <= 1


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_layers_equal_flax_layers(dtype):
  """Same parameters as nnx.Linear / nnx.Einsum; float32 gives the very same numbers, bfloat16
  the same up to bfloat16 rounding (the bias is added before the rounding here, after it in flax).
  """
  rngs = lambda: nnx.Rngs(0)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 24)), jnp.float32)
  ours = layers.dense(24, 16, ('embed', 'mlp'), dtype=dtype, rngs=rngs())
  ours.bias[...] = jnp.linspace(-1, 1, 16)
  flax_linear = nnx.Linear(24, 16, dtype=dtype, rngs=rngs())
  nnx.update(flax_linear, nnx.state(ours))
  fused = layers.fused_dense(
      24, (3, 2, 4), ('embed', None, 'heads', None), use_bias=True, dtype=dtype, rngs=rngs()
  )
  flax_einsum = nnx.Einsum('...d,dabc->...abc', (24, 3, 2, 4), (3, 2, 4), dtype=dtype, rngs=rngs())
  nnx.update(flax_einsum, nnx.state(fused))
  for a, b in ((ours, flax_linear), (fused, flax_einsum)):
    ya, yb = a(x), b(x)
    assert ya.dtype == yb.dtype == dtype
    if dtype == jnp.float32:
      np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))
    else:
      np.testing.assert_allclose(_f64(ya), _f64(yb), rtol=2 * BF16_ULP, atol=2 * BF16_ULP)
