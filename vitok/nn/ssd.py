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

`two_scans` runs two scans in one call, as a bidirectional layer needs (forward and over the
reversed sequence; dit/mate.py): every token then sees every other, as with self-attention, at
linear cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

F32 = jnp.float32


def _pad(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


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
  groups = b.shape[-2]
  if chunk < 1:
    raise ValueError(f'the SSD chunk must be >= 1, got {chunk}')
  if heads % groups:
    raise ValueError(f'{groups} groups of B/C do not divide {heads} heads')
  padded = -(-length // chunk) * chunk
  # Layout: (batch, chunk n, group g, head of the group r, token l, ...), so that every product
  # below is a matmul over the last two axes with the batch-like axes leading (what XLA runs
  # fastest), and C B^T is computed once per group rather than once per head.
  heads_first = lambda t: rearrange(
      _pad(t.astype(F32), padded), 'b (n l) (g r) ... -> b n g r l ...', l=chunk, g=groups
  )
  xs, dts = heads_first(x), heads_first(dt)  # (b, n, g, r, l, P), (b, n, g, r, l)
  bs, cs = (
      rearrange(_pad(t.astype(F32), padded), 'b (n l) g k -> b n g l k', l=chunk) for t in (b, c)
  )
  log_decay = dts * a.astype(F32).reshape(groups, -1)[..., None]  # <= 0
  cumulative = jnp.cumsum(log_decay, axis=-1)  # inclusive, within the chunk
  inputs = xs * dts[..., None]  # dt_s x_s

  # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s.
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  gaps = cumulative[..., :, None] - cumulative[..., None, :]  # (b, n, g, r, l, s)
  decay = jnp.exp(jnp.where(causal, gaps, -jnp.inf))
  scores = jnp.einsum('bnglk,bngsk->bngls', cs, bs)[:, :, :, None] * decay
  y = jnp.einsum('bngrls,bngrsp->bngrlp', scores, inputs)

  # 2. Each chunk's own final state: sum_s exp(cum_last - cum_s) dt_s x_s B_s^T.
  to_end = jnp.exp(cumulative[..., -1:] - cumulative)  # (b, n, g, r, l)
  states = jnp.einsum('bngrlp,bnglk->bngrpk', inputs * to_end[..., None], bs)

  # 3. Carried across chunks: S_n = exp(sum of chunk n's log-decays) S_{n-1} + states_n.
  chunk_decay = jnp.exp(cumulative[..., -1])  # (b, n, g, r)

  def combine(earlier, later):
    (d1, s1), (d2, s2) = earlier, later
    return d1 * d2, d2[..., None, None] * s1 + s2

  _, carried = jax.lax.associative_scan(combine, (chunk_decay, states), axis=1)
  entering = jnp.concatenate([jnp.zeros_like(carried[:, :1]), carried[:, :-1]], axis=1)

  # 4. Each token reads the state its chunk started from, decayed to it: exp(cum_l) C_l S.
  read = jnp.einsum('bnglk,bngrpk->bngrlp', cs, entering)
  y = y + read * jnp.exp(cumulative)[..., None]
  y = rearrange(y, 'b n g r l p -> b (n l) (g r) p')
  return y[:, :length].astype(x.dtype)


def two_scans(first: tuple, second: tuple, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Two independent scans of equal length, each `(x, dt, a, b, c)` as `ssd` takes them and each
  in the order it reads its tokens, computed as one: their heads side by side, each scan's B and
  C as its own groups. A bidirectional layer passes its forward and its reversed sequence; one
  call of twice the heads runs fewer, larger products than two calls."""
  (x1, dt1, a1, b1, c1), (x2, dt2, a2, b2, c2) = first, second
  side_by_side = lambda u, v: jnp.concatenate([u, v], axis=2)  # heads, or groups for B and C
  y = ssd(
      side_by_side(x1, x2),
      side_by_side(dt1, dt2),
      jnp.concatenate([a1, a2]),
      side_by_side(b1, b2),
      side_by_side(c1, c2),
      chunk,
  )
  heads = x1.shape[2]
  return y[:, :, :heads], y[:, :, heads:]
