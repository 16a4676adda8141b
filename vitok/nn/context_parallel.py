"""Context parallelism: one clip's tokens split over the mesh axes of the 'act_length' rule (the
`context` axis), and self-attention across them by one of two schemes (`model.context_attention`).

Everything in a transformer block but attention works token by token, so with the activations
laid out (batch, length / context, width) XLA's partitioner runs it on each device's tokens with
no communication: the tubelet embedding, the MLPs, the norms, unpatchify and the loss (a global
mean). Positions stay global because RoPE angles, absolute position tables and known-frame masks
are computed for the whole grid and laid out the same way as the tokens they belong to. Only
attention needs every token, and here it is written out as an explicit `shard_map`:

  all_to_all  (DeepSpeed-Ulysses; Jacobs et al. 2023). One all-to-all turns (L / n tokens, all
              heads) into (all L tokens, heads / n) on each device; the single-device kernel of
              `model.attention` (xla, blockwise, cudnn, pallas_tpu, splash_tpu) attends; a second
              all-to-all turns the result back. Per layer a device sends (n - 1) / n of four
              (B, L / n, D) tensors forward (q, k, v, the output) and four backward: less as n
              grows. Needs the heads on a device to divide by n.

  ring        (Ring Attention; Liu et al. 2023). Each device keeps its queries and passes its
              key/value block around the ring (`lax.ppermute`) n - 1 times, folding each block
              into an online softmax (`attention.partial_attention` / `merge_partial`: the
              blockwise kernel, whatever `model.attention` says, so no device ever holds more
              than (L / n) x 512 scores per head). The backward pass goes around the ring again,
              recomputing probabilities from the saved log-sum-exp, while each key block's float32
              gradient travels with it and arrives home after n moves. Per layer a device sends
              about 2 (n - 1) blocks of (B, L / n, D) forward and 2 (n - 1) + 4 n backward:
              roughly constant in n. Any head count. Each step sends the next key/value block
              before it uses the current one, so XLA's latency-hiding scheduler can overlap the
              transfer with the matmuls (TPU, GPU).

The sequence dimension must split evenly over the axis: a clip whose token count does not is
refused in one line (padding would change what the padded keys take from the softmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vitok.core import sharding
from vitok.nn import attention as attention_lib

SCHEMES = sharding.CONTEXT_SCHEMES
HEADS = sharding.ATTENTION_HEADS  # q, k, v: (B, L, heads, head_dim)


def sequence_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split activation tokens while tracing under
  `sharding.activation_sharding`; () outside it or when the rules split no tokens."""
  active = sharding.active()
  if active is None:
    return ()
  mesh, rules = active
  return tuple(a for a in rules.get('act_length', ()) if mesh.shape.get(a, 1) > 1)


def attention(q, k, v, kernel, scheme: str):
  """softmax(q k^T / sqrt(d)) v over all tokens of q, k, v (B, L, heads, head_dim) laid out
  (batch, length / n, heads, ...) on the context axes, by `scheme`; `kernel(q, k, v)` is the
  single-device kernel that all-to-all runs on whole sequences. None when no axis splits tokens
  (the caller runs its kernel as usual)."""
  axes = sequence_axes()
  if not axes:
    return None
  mesh, rules = sharding.active()
  n = sharding.check_context_split(mesh, rules, q.shape[1], q.shape[2], scheme)
  spec = sharding.logical_to_spec(HEADS, rules, mesh, q.shape)
  axis = axes[0] if len(axes) == 1 else axes
  if scheme == 'all_to_all':
    fn = functools.partial(_all_to_all, axis=axis, kernel=kernel)
  else:
    block = min(attention_lib.DEFAULT_BLOCK, q.shape[1] // n)
    fn = lambda q, k, v: ring_attention(q, k, v, axis, n, block)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
      q, k, v
  )


def _all_to_all(q, k, v, *, axis, kernel):
  """Per device: (B, L/n, H, D) x 3 -> one all-to-all to (B, L, H/n, D) x 3 -> kernel -> back."""
  qkv = jax.lax.all_to_all(jnp.stack([q, k, v]), axis, split_axis=3, concat_axis=2, tiled=True)
  y = kernel(qkv[0], qkv[1], qkv[2])
  return jax.lax.all_to_all(y, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(size: int):
  """Device i sends to i + 1: after s moves a device holds the block that started s places back."""
  return [(i, (i + 1) % size) for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def ring_attention(q, k, v, axis, size: int, block: int):
  """Inside `shard_map`: this device's queries against every device's keys and values on the
  `size` devices of `axis`, (B, L/n, H, D) -> (B, L/n, H, D)."""
  return _ring_forward(q, k, v, axis, size, block)[0]


def _ring_forward(q, k, v, axis, size, block):
  result = None
  for step in range(size):
    if step < size - 1:  # send the next block first: the transfer can overlap this step's matmuls
      k_next, v_next = jax.lax.ppermute((k, v), axis, _ring(size))
    part = attention_lib.partial_attention(q, k, v, block)
    result = part if result is None else attention_lib.merge_partial(result, part)
    if step < size - 1:
      k, v = k_next, v_next
  out, lse = result
  return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, axis, size, block):
  out, lse = _ring_forward(q, k, v, axis, size, block)
  return out, (q, k, v, out, lse)


def _ring_bwd(axis, size, block, residuals, d_out):
  q, k, v, out, lse = residuals
  delta = attention_lib.softmax_correction(d_out, out)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for step in range(size):
    if step < size - 1:
      k_next, v_next = jax.lax.ppermute((k, v), axis, _ring(size))
    dq_part, dk_part, dv_part = attention_lib.partial_gradients(q, k, v, d_out, lse, delta, block)
    dq = dq + dq_part
    # A key block's gradient travels with it; after `size` moves it is back on its own device.
    dk, dv = jax.lax.ppermute((dk + dk_part, dv + dv_part), axis, _ring(size))
    if step < size - 1:
      k, v = k_next, v_next
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


ring_attention.defvjp(_ring_fwd, _ring_bwd)
