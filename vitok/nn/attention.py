"""Blockwise (flash-style) attention in plain JAX: softmax(q k^T / sqrt(d)) v without ever holding
the (L x L) score matrix, forward or backward, on any backend XLA compiles for.

The keys are taken in blocks of `block` (the last one padded and masked). The forward pass scans
over key blocks keeping, per query, the running maximum m, the running softmax denominator l and
the running weighted sum of values (the online softmax of Milakov & Gimelshein 2018, as in
FlashAttention, Dao et al. 2022), and saves only the output and the log-sum-exp of each query's
scores. The backward pass scans over the key blocks again, recomputing each block's
probabilities from the saved log-sum-exp:

    p = exp(s - lse)        dv = p^T do        dp = do v^T
    ds = p * (dp - rowsum(do * o))        dq += ds k / sqrt(d)        dk = ds^T q / sqrt(d)

so the memory of both passes is O(L * block) per head instead of O(L^2). Scores and statistics
are float32 whatever the input dtype (as the fused kernels do); the result has the input's dtype.

`dense_attention` is the plain formulation (the whole score matrix at once), arranged so that
XLA compiles it well. `pallas_tpu_attention` is the same computation by JAX's Pallas TPU
flash-attention kernel and `splash_tpu_attention` by its splash-attention kernel (the one MaxText
and MaxDiffusion use on TPUs: larger blocks, a mask-aware grid); both are TPU only, and run on the
CPU in Pallas's TPU interpret mode, which is how they are tested.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 512
PALLAS_BLOCK = 128


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, L, H, D) keys or values -> (n, B, block, H, D), zero-padded to n * block."""
  b, length, h, d = x.shape
  n = -(-length // block)
  x = jnp.pad(x, ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
  return jnp.moveaxis(x.reshape(b, n, block, h, d), 1, 0)


def softmax_correction(d_out: jax.Array, out: jax.Array) -> jax.Array:
  """rowsum(do * o), (B, heads, Lq) in float32: the softmax Jacobian's correction term."""
  return jnp.einsum('bqhd,bqhd->bhq', d_out.astype(jnp.float32), out.astype(jnp.float32))


def _grads_from_probabilities(p, d_out, q, k, v, delta, scale):
  """float32 (dq, dk, dv) of the queries against the keys / values `k`, `v` (all keys, or one
  block of them) from their probabilities p (B, heads, Lq, Lk): every matmul multiplies two
  operands of the inputs' dtype and accumulates in float32."""
  f32 = jnp.float32
  dv = jnp.einsum('bhqk,bqhd->bkhd', p.astype(d_out.dtype), d_out, preferred_element_type=f32)
  dp = jnp.einsum('bqhd,bkhd->bhqk', d_out, v, preferred_element_type=f32)
  ds = (p.astype(f32) * (dp - delta[..., None]) * scale).astype(q.dtype)
  dq = jnp.einsum('bhqk,bkhd->bqhd', ds, k, preferred_element_type=f32)
  dk = jnp.einsum('bhqk,bqhd->bkhd', ds, q, preferred_element_type=f32)
  return dq, dk, dv


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the whole (L x L) score matrix, for q, k, v of shape
  (B, L, heads, head_dim): the computation of `jax.nn.dot_product_attention`'s XLA path, with the
  scores and softmax in float32 as there and the probabilities rounded to v's dtype.

  Why not call that function: XLA:CPU compiles its formulation slowly. Measured forward +
  backward of one attention layer on 2 CPU cores (ms; B = 8, L = 256, 6 heads of 64 / B = 8,
  L = 128, 8 heads of 32 / B = 1, L = 1024, 12 heads of 64; 10-20% noise):

      float32    jax.nn 42-59 / 6.5-11 / 185-201    here 36-47 / 5.4-8.5 / 215-266
      bfloat16   jax.nn 42-61 / 12-13  / 172-183    here 22-32 / 5.5-6.2 / 116

  float32: the heads moved next to the batch before the two matmuls, so that XLA runs them as
  contiguous per-head matmuls rather than batched dots over strided heads with layout copies,
  and autodiff for the backward. bfloat16: jax.nn's backward multiplies float32 cotangents by
  bfloat16 operands, which XLA:CPU runs as float32 matmuls after converting both; here the
  backward is written out (as `blockwise_attention`'s, from the saved probabilities instead of
  recomputed ones) so that all four of its matmuls take bf16 operands with float32 accumulation,
  in the layout in which XLA:CPU keeps them native. At 1,024 tokens the blockwise kernel is as
  fast in bfloat16 and needs far less memory; in float32 jax.nn's formulation measured faster per
  layer at that length."""
  if q.dtype == jnp.float32:
    return _dense_float32(q, k, v)
  return _dense_low_precision(q, k, v)


def _dense_float32(q, k, v):
  scale = 1.0 / math.sqrt(q.shape[-1])
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, heads, L, head_dim)
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k) * scale
  out = jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(s, axis=-1), v)
  return jnp.swapaxes(out, 1, 2)


def _dense_low_precision_forward(q, k, v):
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum('bhqk,bkhd->bqhd', p, v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), p


@jax.custom_vjp
def _dense_low_precision(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return _dense_low_precision_forward(q, k, v)[0]


def _dense_low_precision_fwd(q, k, v):
  out, p = _dense_low_precision_forward(q, k, v)
  return out, (q, k, v, out, p)


def _dense_low_precision_bwd(residuals, d_out):
  q, k, v, out, p = residuals  # p: (B, heads, Lq, Lk) probabilities, in v's dtype
  scale = 1.0 / math.sqrt(q.shape[-1])
  delta = softmax_correction(d_out, out)
  dq, dk, dv = _grads_from_probabilities(p, d_out.astype(v.dtype), q, k, v, delta, scale)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_dense_low_precision.defvjp(_dense_low_precision_fwd, _dense_low_precision_bwd)


def _scores(q: jax.Array, k_block: jax.Array, start, length: int, scale: float) -> jax.Array:
  """float32 (B, H, Lq, block) scores of the queries against one key block; padded keys get
  -inf, so they receive no probability."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k_block, preferred_element_type=jnp.float32) * scale
  valid = start + jnp.arange(k_block.shape[1]) < length
  return jnp.where(valid, s, -jnp.inf)


def partial_attention(q, k, v, block: int):
  """The queries against these keys only, blockwise: float32 (out (B, Lq, H, D), lse (B, H, Lq)).
  Partial results against disjoint key sets combine exactly by their log-sum-exps
  (`merge_partial`), which is how ring attention (vitok/nn/context_parallel.py) uses it."""
  b, length, h, d = q.shape
  scale = 1.0 / math.sqrt(d)
  kb, vb = _blocks(k, block), _blocks(v, block)
  starts = jnp.arange(kb.shape[0]) * block

  def step(carry, xs):
    m, l, acc = carry  # (B, H, Lq), (B, H, Lq), (B, Lq, H, D) float32
    k_block, v_block, start = xs
    s = _scores(q, k_block, start, k.shape[1], scale)
    m_new = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = l * correction + p.sum(axis=-1)
    pv = jnp.einsum(
        'bhqk,bkhd->bqhd', p.astype(v.dtype), v_block, preferred_element_type=jnp.float32
    )
    acc = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
    return (m_new, l, acc), None

  init = (
      jnp.full((b, h, length), -jnp.inf, jnp.float32),
      jnp.zeros((b, h, length), jnp.float32),
      jnp.zeros((b, length, h, d), jnp.float32),
  )
  (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, starts))
  out = acc / jnp.moveaxis(l, 1, 2)[..., None]
  lse = m + jnp.log(l)  # (B, H, Lq)
  return out, lse


def _forward(q, k, v, block):
  out, lse = partial_attention(q, k, v, block)
  return out.astype(q.dtype), lse


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = DEFAULT_BLOCK):
  """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, L, heads, head_dim), the layout of
  `jax.nn.dot_product_attention`, holding at most (L x block) scores per head at a time. Fewer
  keys than `block` make one block of exactly that many (no padding)."""
  return _blockwise(q, k, v, min(block, k.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, block: int):
  return _forward(q, k, v, block)[0]


def _fwd(q, k, v, block):
  out, lse = _forward(q, k, v, block)
  return out, (q, k, v, out, lse)


def _bwd(block, residuals, d_out):
  q, k, v, out, lse = residuals
  delta = softmax_correction(d_out, out)
  dq, dk, dv = partial_gradients(q, k, v, d_out, lse, delta, block)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def partial_gradients(q, k, v, d_out, lse, delta, block: int):
  """float32 (dq, dk, dv): the gradients' share that flows through these keys, given the
  softmax statistics of *all* keys (`lse`, and `delta` = rowsum(d_out * out)); the shares of
  disjoint key sets add up to the full gradients."""
  b, length, h, d = k.shape
  scale = 1.0 / math.sqrt(d)
  kb, vb = _blocks(k, block), _blocks(v, block)
  starts = jnp.arange(kb.shape[0]) * block

  def step(dq, xs):
    k_block, v_block, start = xs
    p = jnp.exp(_scores(q, k_block, start, length, scale) - lse[..., None])  # (B, H, Lq, blk)
    dq_block, dk, dv = _grads_from_probabilities(p, d_out, q, k_block, v_block, delta, scale)
    return dq + dq_block, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, starts))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, h, d)[:, :length]
  return dq, unblock(dk), unblock(dv)


_blockwise.defvjp(_fwd, _bwd)


def merge_partial(first, second):
  """Two `partial_attention` results over disjoint key sets -> the result over their union."""
  (out_a, lse_a), (out_b, lse_b) = first, second
  lse = jnp.logaddexp(lse_a, lse_b)
  weight = lambda x: jnp.moveaxis(jnp.exp(x - lse), 1, 2)[..., None]  # (B, Lq, H, 1)
  return out_a * weight(lse_a) + out_b * weight(lse_b), lse


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v by the Pallas TPU flash-attention kernel
  (`jax.experimental.pallas.ops.tpu.flash_attention`), for q, k, v of shape (B, L, heads,
  head_dim). The kernel works on blocks of 128 queries and keys (its statistics are stored in
  128-lane tiles), so L must be a multiple of 128. Sharded activations need
  `sharding.shard_mapped` around it."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

  length, head_dim = q.shape[1], q.shape[-1]
  if length % PALLAS_BLOCK:
    raise ValueError(
        f"model.attention='pallas_tpu' works on blocks of {PALLAS_BLOCK} tokens, but this stack "
        f"has {length} tokens: use model.attention='blockwise'"
    )
  sizes = tpu_flash.BlockSizes(
      **{
          f.name: PALLAS_BLOCK
          for f in dataclasses.fields(tpu_flash.BlockSizes)
          if f.name != 'block_b'
      },
      block_b=1,
  )
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's (B, heads, L, head_dim)
  out = tpu_flash.flash_attention(
      heads_first(q),
      heads_first(k),
      heads_first(v),
      sm_scale=1.0 / math.sqrt(head_dim),
      block_sizes=sizes,
  )
  return heads_first(out)


SPLASH_BLOCKS = (512, 256, 128)


def splash_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v by the Pallas TPU splash-attention kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`), for q, k, v of shape (B, L, heads,
  head_dim), with a full (non-causal) mask. Blocks of the largest of 512 / 256 / 128 tokens that
  divides L (L must be a multiple of 128). Sharded activations need `sharding.shard_mapped`."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  _, length, heads, head_dim = q.shape
  if length % PALLAS_BLOCK:
    raise ValueError(
        f"model.attention='splash_tpu' works on blocks of {PALLAS_BLOCK} tokens, but this stack "
        f"has {length} tokens: use model.attention='blockwise'"
    )
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
  )
  mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(heads)])
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's (heads, L, head_dim) per clip
  # The kernel takes the softmax scale folded into the queries.
  scaled = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
  out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v))
  return heads_first(out)


# model.attention's implementations as single-device kernels on (B, L, heads, head_dim).
KERNELS = {
    'dense': dense_attention,
    'blockwise': blockwise_attention,
    'pallas': pallas_tpu_attention,
    'splash': splash_tpu_attention,
    'cudnn': functools.partial(jax.nn.dot_product_attention, implementation='cudnn'),
}
