"""Blockwise (flash-style) attention: equal to the reference softmax attention, values and
gradients, for lengths that do and do not fill the last key block, in float32 and bfloat16; and
it never materialises the L x L scores (its compiled temporaries stay far below them). The dense
attention ('xla') equals jax.nn.dot_product_attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok.nn.attention import blockwise_attention, dense_attention


def _qkv(length, dtype=jnp.float32, batch=2, heads=3, head_dim=16):
  keys = jax.random.split(jax.random.PRNGKey(length), 3)
  return [
      (2.0 * jax.random.normal(k, (batch, length, heads, head_dim))).astype(dtype) for k in keys
  ]


def _reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v written out, in float32."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


# bfloat16's unit roundoff: 8 significant bits, so rounding to it errs by at most 2^-8 relative.
BF16_ROUNDOFF = 2.0**-8


def _bfloat16_gradient_bounds(q, k, v, d_out):
  """Componentwise bounds, in numpy float64 from the inputs alone, on the error of a bfloat16
  attention backward that rounds its operands to bfloat16 and accumulates in float32 (as both
  kernels here do), against the exact gradients at the same (already bfloat16) q, k, v.

  Each rounding to bfloat16 errs by at most u = 2^-8 of the rounded value (Higham, Accuracy and
  Stability of Numerical Algorithms, 2.2); an error e in the terms of a sum moves it by at most
  e * sum(|terms|). With P = softmax(q k^T / sqrt(d)), O = P v and the cotangent dO rounded:
    dv = P^T dO: P and dO rounded, then the result: |error| <= 3u (P^T |dO|).
    ds = P (dP - delta) / sqrt(d) with dP = dO v^T, delta = rowsum(dO O): dO's rounding moves dP
      by u |dO| |v|^T; delta by 3u rowsum(|dO| (P |v|)) (dO, and O whose P and result the forward
      rounded); P's rounding (the dense kernel saves it in bfloat16) and ds's own add u each:
      |error of ds| <= 6u S, S = P (|dO| |v|^T + rowsum(|dO| (P |v|))) / sqrt(d).
    dq = ds k, dk = ds^T q: that, then the result's rounding: |error| <= 7u (S |k|), 7u (S^T |q|).
  First order in u: the u^2 terms are under 3% of these, and float32 accumulation (L 2^-24
  relative) under 0.1%; both are covered by taking one more u. The bounds hold element by
  element, whatever the order of the reductions."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  scale = 1.0 / np.sqrt(q.shape[-1])
  s = np.einsum('bqhd,bkhd->bhqk', q, k) * scale
  p = np.exp(s - s.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  abs_out = np.einsum('bhqk,bkhd->bqhd', p, np.abs(v))  # P |v|, above |O|
  d_p = np.einsum('bqhd,bkhd->bhqk', np.abs(d_out), np.abs(v))
  delta = np.einsum('bqhd,bqhd->bhq', np.abs(d_out), abs_out)
  s_bound = p * (d_p + delta[..., None]) * scale
  u = BF16_ROUNDOFF
  return (
      8 * u * np.einsum('bhqk,bkhd->bqhd', s_bound, np.abs(k)),
      8 * u * np.einsum('bhqk,bqhd->bkhd', s_bound, np.abs(q)),
      4 * u * np.einsum('bhqk,bqhd->bkhd', p, np.abs(d_out)),
  )


def _assert_bfloat16_gradients(attention, q, k, v):
  """attention's gradients w.r.t. bfloat16 q, k, v against float32 autodiff of the written-out
  reference at the same (rounded) inputs, within `_bfloat16_gradient_bounds`."""
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  grads = jax.jit(jax.grad(loss(attention), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  # The output is bfloat16, so the cotangent reaching the kernel is rounded to bfloat16 too.
  rounded_cotangent = cotangent.astype(jnp.bfloat16).astype(jnp.float32)
  bounds = _bfloat16_gradient_bounds(q, k, v, rounded_cotangent)
  for name, got, want, bound in zip('qkv', grads, expected, bounds):
    assert got.dtype == jnp.bfloat16
    error = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(error <= bound), (name, np.max(error / bound))
    # Not vacuous: worst cases, the bounds are loose where the terms' errors cancel (measured
    # errors reach 5-10% of them for dq, dk and 50% for dv), but a gradient of zero would break
    # them on about half of dq's and dk's elements and on nearly all of dv's.
    assert np.mean(np.abs(np.asarray(want)) > bound) > 0.4, name


@pytest.mark.parametrize('length,block', [(96, 32), (100, 32), (20, 64)])
def test_equals_the_reference_attention_with_gradients(length, block):
  q, k, v = _qkv(length)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  ours = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, block))
  np.testing.assert_allclose(ours(q, k, v), _reference(q, k, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      ours(q, k, v), jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5
  )
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dense_attention_equals_jax_dot_product_attention_with_gradients():
  q, k, v = _qkv(40)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  ours, jax_xla = jax.jit(dense_attention), jax.jit(jax.nn.dot_product_attention)
  np.testing.assert_allclose(ours(q, k, v), jax_xla(q, k, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours(q, k, v), _reference(q, k, v), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.jit(jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # bfloat16: float32 scores and softmax, one rounding of the probabilities and of the output.
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = ours(q16, k16, v16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      out.astype(np.float32), _reference(q16, k16, v16), rtol=0.02, atol=0.02
  )
  # Its written-out backward in bfloat16 against float32 autodiff of the reference on the same
  # rounded inputs: bf16 operands, float32 accumulation, errors of a few bf16 spacings.
  grads16 = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q16, k16, v16)
  expected16 = jax.grad(loss(_reference), argnums=(0, 1, 2))(q16, k16, v16)
  for got, want in zip(grads16, expected16):
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=0.015 * scale)
  # And element by element within the bounds that bfloat16's rounding allows.
  _assert_bfloat16_gradients(ours, q16, k16, v16)


def test_bfloat16_inputs_keep_float32_statistics():
  q, k, v = _qkv(100, jnp.bfloat16)
  out = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, 32))(q, k, v)
  assert out.dtype == jnp.bfloat16
  # Only the inputs' and output's rounding: as close as bfloat16 allows (8 bits of mantissa).
  np.testing.assert_allclose(out.astype(np.float32), _reference(q, k, v), rtol=0.02, atol=0.02)


@pytest.mark.parametrize('length,block', [(96, 32), (100, 32), (20, 64)])
def test_bfloat16_gradients_of_the_blockwise_kernel_against_float32(length, block):
  q, k, v = _qkv(length, jnp.bfloat16)
  _assert_bfloat16_gradients(lambda q, k, v: blockwise_attention(q, k, v, block), q, k, v)


def test_the_scores_are_never_materialised():
  length, heads = 4096, 2
  q = jax.ShapeDtypeStruct((1, length, heads, 32), jnp.float32)
  scores_bytes = heads * length * length * 4  # one float32 L x L matrix per head: 128 MiB

  def temp_bytes(f):
    compiled = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
    return compiled.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  reference = temp_bytes(jax.nn.dot_product_attention)
  blockwise = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, 128))
  assert reference >= scores_bytes  # the reference holds at least one L x L matrix
  # A few (L x 128) blocks per head (scores, probabilities, their gradient): measured 20 MiB
  # against the reference's 386 MiB.
  assert blockwise < scores_bytes / 4, (blockwise, reference)


def test_the_tokenizer_with_blockwise_attention_equals_the_reference_one():
  from flax import nnx

  from vitok.tokenizer import model as tokenizer

  video = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 32, 32, 3), minval=-1, maxval=1)
  outputs = []
  for attention in ('xla', 'blockwise'):
    cfg = tokenizer.TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4, attention=attention)
    graphdef, params = nnx.split(tokenizer.ViTok(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mean = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_moments(x)[0])(params, video)
    outputs.append(mean)
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


@pytest.fixture
def tpu_interpret_mode():
  """Pallas TPU kernels run on the CPU in Pallas's TPU interpret mode."""
  from jax.experimental.pallas import tpu as pltpu

  with pltpu.force_tpu_interpret_mode():
    yield


def test_the_pallas_tpu_kernel_equals_the_reference_with_gradients(tpu_interpret_mode):
  from vitok.nn.attention import pallas_tpu_attention

  with pytest.raises(ValueError, match='blocks of 128 tokens, but this stack has 64 tokens'):
    pallas_tpu_attention(*_qkv(64))
  q, k, v = _qkv(256, batch=1, heads=2, head_dim=32)  # two blocks of 128
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  out = jax.jit(pallas_tpu_attention)(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(loss(pallas_tpu_attention), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_pallas_kernel_attends_each_devices_shard_on_a_data_x_model_mesh(tpu_interpret_mode):
  import ml_collections

  from configs import common as config_common
  from vitok.core import sharding
  from vitok.nn import layers
  from vitok.nn.attention import pallas_tpu_attention

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(2, 4), axes=('data', 'model'))))
  rules = config_common.SHARDING_RULES
  q, k, v = _qkv(128, batch=2, heads=4, head_dim=32)

  @jax.jit
  def attend(q, k, v):
    with sharding.activation_sharding(mesh, rules):
      q, k, v = (sharding.constrain(x, layers.HEADS) for x in (q, k, v))
      return sharding.shard_mapped(pallas_tpu_attention, layers.HEADS, q, k, v)

  out = attend(q, k, v)
  assert out.sharding.spec[0] == ('data',) or out.sharding.spec[0] == 'data'
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_the_splash_tpu_kernel_equals_the_reference_with_gradients(tpu_interpret_mode):
  from vitok.nn.attention import splash_tpu_attention

  with pytest.raises(ValueError, match='blocks of 128 tokens'):
    splash_tpu_attention(*_qkv(64))
  q, k, v = _qkv(256, heads=2, head_dim=32, batch=1)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  out = jax.jit(splash_tpu_attention)(q, k, v)
  np.testing.assert_allclose(out, _reference(q, k, v), rtol=2e-5, atol=2e-5)
  grads = jax.jit(jax.grad(loss(splash_tpu_attention), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
