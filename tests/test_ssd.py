"""Mamba2's chunked SSD (vitok/nn/ssd.py) against the recurrence it stands for, token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok.nn import ssd

jax.config.update('jax_default_matmul_precision', 'highest')


def recurrence(x, dt, a, b, c):
  """h_l = exp(dt_l a) h_{l-1} + dt_l x_l B_l^T; y_l = h_l C_l, one token at a time (lax.scan),
  written from the equations, not from the chunked code."""
  heads = x.shape[2]
  b = jnp.repeat(b, heads // b.shape[2], axis=2)
  c = jnp.repeat(c, heads // c.shape[2], axis=2)

  def step(h, token):
    xl, dtl, bl, cl = token  # (B, H, P), (B, H), (B, H, N), (B, H, N)
    h = jnp.exp(dtl * a)[..., None, None] * h + (dtl[..., None] * xl)[..., None] * bl[:, :, None]
    return h, jnp.einsum('bhpn,bhn->bhp', h, cl)

  batch, _, _, p = x.shape
  h0 = jnp.zeros((batch, heads, p, b.shape[-1]))
  tokens = tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, b, c))
  _, y = jax.lax.scan(step, h0, tokens)
  return jnp.moveaxis(y, 0, 1)


def _inputs(length, heads=4, groups=2, p=3, n=5, batch=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (batch, length, heads, p))
  dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, length, heads)) - 1.0)
  a = -jnp.exp(jax.random.normal(ks[2], (heads,)))
  b = jax.random.normal(ks[3], (batch, length, groups, n))
  c = jax.random.normal(ks[4], (batch, length, groups, n))
  return x, dt, a, b, c


@pytest.mark.parametrize('length,chunk', [(16, 4), (13, 5), (7, 16), (9, 1)])
def test_chunked_scan_equals_the_recurrence_values_and_gradients(length, chunk):
  args = _inputs(length)
  np.testing.assert_allclose(ssd.ssd(*args, chunk=chunk), recurrence(*args), rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(9), args[0].shape)
  loss = lambda f: lambda *t: jnp.sum(weights * f(*t))
  chunked = jax.grad(loss(lambda *t: ssd.ssd(*t, chunk=chunk)), argnums=range(5))(*args)
  reference = jax.grad(loss(recurrence), argnums=range(5))(*args)
  for name, got, want in zip('x dt a b c'.split(), chunked, reference):
    assert np.all(np.isfinite(got)), name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_strong_decay_stays_finite():
  """Large dt * |A| makes exp(cum_l - cum_s) overflow for s > l unless masked before the
  exponential; the gradients must stay finite (and equal the recurrence's)."""
  x, dt, a, b, c = _inputs(12)
  dt = dt * 40.0
  got = jax.grad(lambda d: jnp.sum(ssd.ssd(x, d, a, b, c, chunk=6)))(dt)
  want = jax.grad(lambda d: jnp.sum(recurrence(x, d, a, b, c)))(dt)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_two_scans_in_one_call_equal_each_alone():
  """A bidirectional layer's two directions, side by side as heads with their own B/C groups."""
  first, second = _inputs(11, seed=1), _inputs(11, seed=2)
  y1, y2 = ssd.two_scans(first, second, chunk=4)
  np.testing.assert_allclose(y1, recurrence(*first), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y2, recurrence(*second), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_are_scanned_in_float32():
  args = _inputs(20)
  low = (args[0].astype(jnp.bfloat16),) + args[1:]
  y = ssd.ssd(*low, chunk=8)
  assert y.dtype == jnp.bfloat16
  want = recurrence(low[0].astype(jnp.float32), *args[1:])
  np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
