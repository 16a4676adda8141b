"""Mamba2's state-space layer (Dao & Gu 2024, "Transformers are SSMs") as chunked matmuls, in plain
JAX: every backend XLA compiles for, forward and backward by autodiff.

The recurrence, per head, over a sequence of tokens l = 1..L (state h: head_dim x state):

    h_l = exp(dt_l * A) h_{l-1} + dt_l x_l B_l^T          y_l = h_l C_l

with A < 0 one scalar per head (the SSD restriction that makes it a matmul), dt_l > 0 the
token's step, B_l, C_l its input and output projections (shared by the heads of a group) and
x_l its values. Unrolled, y = M x with M[l, s] = C_l . B_s exp(sum_{s<k<=l} dt_k A) dt_s for
s <= l: a causal attention whose mask decays. `ssd` computes it chunk by chunk:

  1. inside each chunk of `chunk` tokens, that masked matmul (quadratic in the chunk only);
  2. each chunk's final state if it started from zero (a matmul);
  3. the states carried from chunk to chunk: a linear recurrence over L / chunk chunks, run as
     `lax.associative_scan` (work linear in the number of chunks, depth logarithmic);
  4. each token's read-out of the state it entered its chunk with (a matmul).

So the cost is linear in L, and almost all of it runs on matrix units. The decays are computed in
float32 from differences of cumulative sums inside a chunk, masked before the exponential so that
no infinity reaches a gradient. A sequence that is not a multiple of the chunk is padded with
dt = 0 (no decay, no input), which changes nothing for the real tokens.

`bidirectional_ssd` runs one direction forward and the other over the reversed sequence, and sums
them: every token sees every other, as self-attention does, at linear cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

F32 = jnp.float32


def _pad(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _heads_of_groups(x: jax.Array, heads: int) -> jax.Array:
  """(..., groups, n) -> (..., heads, n): each group's projection shared by heads / groups heads."""
  return jnp.repeat(x, heads // x.shape[-2], axis=-2)


def ssd(
    x: jax.Array,
    dt: jax.Array,
    a: jax.Array,
    b: jax.Array,
    c: jax.Array,
    chunk: int,
) -> jax.Array:
  """The causal scan, chunked. x (B, L, heads, P), dt (B, L, heads) > 0, a (heads,) < 0,
  b and c (B, L, groups, N) with groups dividing heads -> y (B, L, heads, P) in x's dtype.

  Computed in float32: the decays are exponentials of sums, and a state summed over thousands of
  tokens in bfloat16 would lose the early ones."""
  batch, length, heads, _ = x.shape
  if chunk < 1:
    raise ValueError(f'the SSD chunk must be >= 1, got {chunk}')
  if heads % b.shape[-2]:
    raise ValueError(f'{b.shape[-2]} groups of B/C do not divide {heads} heads')
  padded = -(-length // chunk) * chunk
  xs = _pad(x.astype(F32), padded)
  dts = _pad(dt.astype(F32), padded)
  bs = _heads_of_groups(_pad(b.astype(F32), padded), heads)
  cs = _heads_of_groups(_pad(c.astype(F32), padded), heads)

  split = lambda t: rearrange(t, 'b (n l) ... -> b n l ...', l=chunk)
  xs, dts, bs, cs = split(xs), split(dts), split(bs), split(cs)
  log_decay = dts * a.astype(F32)  # (B, n, l, heads): log of each token's decay, <= 0
  cumulative = jnp.cumsum(log_decay, axis=2)  # inclusive, within the chunk
  inputs = xs * dts[..., None]  # dt_s x_s

  # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s.
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  gaps = cumulative[:, :, :, None, :] - cumulative[:, :, None, :, :]  # (B, n, l, s, heads)
  decay = jnp.exp(jnp.where(causal[None, None, :, :, None], gaps, -jnp.inf))
  scores = jnp.einsum('bnlhk,bnshk->bnlsh', cs, bs) * decay
  y = jnp.einsum('bnlsh,bnshp->bnlhp', scores, inputs)

  # 2. Each chunk's own final state: sum_s exp(cum_last - cum_s) dt_s x_s B_s^T.
  to_end = jnp.exp(cumulative[:, :, -1:, :] - cumulative)  # (B, n, l, heads)
  states = jnp.einsum('bnlhk,bnlh,bnlhp->bnhpk', bs, to_end, inputs)

  # 3. Carried across chunks: S_n = exp(sum of chunk n's log-decays) S_{n-1} + states_n.
  chunk_decay = jnp.exp(cumulative[:, :, -1, :])  # (B, n, heads)

  def combine(earlier, later):
    (d1, s1), (d2, s2) = earlier, later
    return d1 * d2, d2[..., None, None] * s1 + s2

  _, carried = jax.lax.associative_scan(combine, (chunk_decay, states), axis=1)
  entering = jnp.concatenate([jnp.zeros_like(carried[:, :1]), carried[:, :-1]], axis=1)

  # 4. Each token reads the state its chunk started from, decayed to it: exp(cum_l) C_l S.
  y = y + jnp.einsum('bnlhk,bnhpk,bnlh->bnlhp', cs, entering, jnp.exp(cumulative))
  return rearrange(y, 'b n l h p -> b (n l) h p')[:, :length].astype(x.dtype)


def bidirectional_ssd(forward: tuple, backward: tuple, chunk: int) -> jax.Array:
  """Two scans over the same tokens, one each way, summed. `forward` and `backward` are each
  `(x, dt, a, b, c)` as `ssd` takes them, in token order; the backward one runs over the
  reversed sequence and its output is reversed back."""
  flip = lambda t: jnp.flip(t, axis=1)
  x, dt, a, b, c = backward
  return ssd(*forward, chunk) + flip(ssd(flip(x), flip(dt), a, flip(b), flip(c), chunk))
