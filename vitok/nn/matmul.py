"""The weight matmuls of both families, written so that bfloat16 compute runs as bfloat16 matmuls.

A dot of two bfloat16 arrays with a bfloat16 result is, on XLA:CPU, converted to a float32 dot
(both operands upcast, the result rounded back), so `model.dtype=bfloat16` ran no faster than
float32 there. A dot of two bfloat16 arrays that *accumulates into float32*
(`preferred_element_type=float32`) is one the CPU libraries run natively (about 2x the float32
rate on this project's CPU), and it is what GPU and TPU matrix units do anyway. So every matmul of
`x (..., d)` with a kernel `w (d, ...)` here is computed as bf16 x bf16 -> f32 and rounded to the
compute dtype, and its backward pass is written out (custom VJP) so that both gradient matmuls,
dx = g w^T and dw = x^T g, have that form too: JAX's own transpose of such a dot would multiply a
float32 cotangent with a bfloat16 operand, which again upcasts to float32.

Numerically this is what the float32-accumulating matmul units compute and what PyTorch's
autocast does: products and sums in float32, one rounding of each result to bfloat16. The bias
is added in float32 before that rounding, and its gradient summed in float32. `layers.Dense` and
`layers.FusedDense` call this in low-precision compute; float32 compute keeps flax's own path.
"""

import jax
import jax.numpy as jnp
from jax import lax

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _contract_last_first(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., d) . w (d, *rest) -> (..., *rest), accumulated in float32."""
  return lax.dot_general(
      x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


@jax.custom_vjp
def low_precision_dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  """x (..., d) . w (d, *rest) + b (*rest), in x's low-precision dtype: products accumulated in
  float32, the float32 bias added before the one rounding. `b` stays float32 (or None), so its
  gradient, a sum over every token, is also taken in float32 (a bfloat16 sum makes XLA:CPU
  rewrite it into a slow windowed tree reduction)."""
  y = _contract_last_first(x, w)
  if b is not None:
    y = y + b.astype(jnp.float32)
  return y.astype(x.dtype)


def _dense_fwd(x, w, b):
  return low_precision_dense(x, w, b), (x, w, b)


def _dense_bwd(residuals, g):
  x, w, b = residuals
  rest = w.ndim - 1  # the kernel's output axes, trailing in g
  lead = x.ndim - 1  # x's batch/token axes, leading in g
  dx = lax.dot_general(
      g,
      w,
      ((tuple(range(g.ndim - rest, g.ndim)), tuple(range(1, w.ndim))), ((), ())),
      preferred_element_type=jnp.float32,
  )
  dw = lax.dot_general(
      x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())), preferred_element_type=jnp.float32
  )
  db = (
      None if b is None else jnp.sum(g.astype(jnp.float32), axis=tuple(range(lead))).astype(b.dtype)
  )
  return dx.astype(x.dtype), dw.astype(w.dtype), db


low_precision_dense.defvjp(_dense_fwd, _dense_bwd)


def is_low_precision(dtype) -> bool:
  return dtype is not None and any(jnp.dtype(dtype) == t for t in LOW_PRECISION)
