"""LinGen's MATE token mixer (Wang et al., CVPR 2025): a DiT block's self-attention replaced by two
branches on the same tokens, whose outputs are summed, at a cost linear in the number of tokens.

  MA-branch  bidirectional Mamba2 (vitok/nn/ssd.py) over the tokens in a scan order that rotates
             from block to block (Rotary Major Scan), preceded in each direction by review tokens.
  TE-branch  TEmporal Swin Attention: full attention inside windows of (t, h, w) tokens that are
             long in time, shifted by half a window every other block.

Rotary Major Scan. A scan sees its neighbours in the order it reads them; in a raster (t, h, w)
order, tokens adjacent along w are adjacent in the scan, but along t they are h * w apart. Block i
reads the grid in the order ORDERS[i % 3] = thw, hwt, wth: the axes rotate, so each of t, h and w
is the fastest-varying (minor) axis in one of every three blocks, and every pair of neighbours is
adjacent in some block's scan. Both directions of the bidirectional scan read the same order.

Review tokens. A forward scan reaches token l knowing only tokens before it. Before the tokens,
each direction first reads one review token per latent frame (the mean of that frame's tokens, in
time order), so every token is read with a summary of the whole clip already in the state. They
pass through the same projections and are dropped at the output.

Temporal Swin windows. Windows of `window` = (t, h, w) tokens (by default 8 latent frames by a
4 x 4 patch: long in time, local in space, each axis clipped to the grid), so adjacent and
medium-range frames attend to each other directly, which a scan of a long video cannot guarantee.
Every other block the window grid is shifted by half a window along each axis it tiles (Swin);
where it does not tile evenly the grid is padded and the padding masked out as keys, instead of
Swin's cyclic roll, so no token attends across the clip's edge. 3-D RoPE (the block's angles,
those of each token's place on the whole grid) keeps relative positions inside windows.

Choices the paper's text available here does not settle are ours, said where they are made: the
per-frame mean as the review token, the three cyclic axis orders, separate parameters for the two
scan directions with shared input and output projections (as Vision Mamba), the window shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok.core.sharding import constrain
from vitok.nn import layers, ssd

ORDERS = ('thw', 'hwt', 'wth')  # Rotary Major Scan: block i reads the grid in ORDERS[i % 3]
EXPAND = 2  # the Mamba2 inner width: EXPAND x the model width, split into the model's heads
CONV = 4  # the causal depthwise convolution before the scan (Mamba2's d_conv)


def scan_order(grid: tuple[int, int, int], order: str) -> np.ndarray:
  """The raster (t, h, w) index of each token in `order`'s reading: a permutation of range(L)."""
  index = np.arange(math.prod(grid)).reshape(grid)
  return np.transpose(index, ['thw'.index(a) for a in order]).reshape(-1)


def _reorder(x: jax.Array, grid, order: str, inverse: bool = False) -> jax.Array:
  """(B, L, D) tokens from raster order into `order` (or back): a transpose of the grid."""
  b, _, d = x.shape
  axes = ['thw'.index(a) for a in order]
  if inverse:
    shape = [grid[a] for a in axes]
    back = [order.index(a) for a in 'thw']
    return x.reshape(b, *shape, d).transpose(0, *(1 + a for a in back), 4).reshape(b, -1, d)
  return x.reshape(b, *grid, d).transpose(0, *(1 + a for a in axes), 4).reshape(b, -1, d)


def window_shape(grid, window) -> tuple[int, int, int]:
  return tuple(min(g, w) for g, w in zip(grid, window))


def window_layout(grid, window, shifted: bool):
  """Where the windows fall: per axis (front padding, padded length), for the grid tiled by
  `window` (clipped to the grid), shifted by half a window where `shifted` and the axis has more
  than one window."""
  window = window_shape(grid, window)
  layout = []
  for g, w in zip(grid, window):
    front = w // 2 if shifted and w < g else 0
    layout.append((front, -(-(front + g) // w) * w))
  return window, layout


def window_tokens(grid, window, shifted: bool) -> np.ndarray:
  """(windows, tokens per window) raster indices of the tokens in each window, -1 for padding."""
  window, layout = window_layout(grid, window, shifted)
  index = np.full([n for _, n in layout], -1)
  inner = tuple(slice(f, f + g) for (f, _), g in zip(layout, grid))
  index[inner] = np.arange(math.prod(grid)).reshape(grid)
  (nt, nh, nw), (wt, wh, ww) = [n for _, n in layout], window
  index = index.reshape(nt // wt, wt, nh // wh, wh, nw // ww, ww).transpose(0, 2, 4, 1, 3, 5)
  return index.reshape(-1, wt * wh * ww)


def _depthwise_causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x (B, L, ...) convolved along L with kernel (K, ...), each channel alone, token l seeing
  tokens l - K + 1 .. l (Mamba2's short convolution; in scan order)."""
  k = kernel.shape[0]
  padded = jnp.pad(x, ((0, 0), (k - 1, 0)) + ((0, 0),) * (x.ndim - 2))
  out = sum(padded[:, i : i + x.shape[1]] * kernel[i].astype(x.dtype) for i in range(k))
  return out + bias.astype(x.dtype)


def _param(init, shape, axes, rngs):
  init = nnx.with_partitioning(init, axes, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


def _uniform(low, high):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


class BidirectionalMamba(nnx.Module):
  """The MA-branch: Mamba2 (input projection, short convolution, SSD, gated RMSNorm, output
  projection) read forward and backward over the tokens in one scan order. x and the gate z are
  shared by the two directions; each has its own convolution, B, C, dt, A and skip D."""

  def __init__(self, width: int, heads: int, *, state: int, chunk: int, dtype, rngs: nnx.Rngs):
    inner = EXPAND * width
    if inner % heads:
      raise ValueError(f'the Mamba2 inner width {inner} is not divisible by {heads} heads')
    self.heads, self.head_dim, self.chunk = heads, inner // heads, chunk
    self.in_proj = layers.fused_dense(  # x and the output gate z
        width, (2, heads, self.head_dim), ('embed', None, 'heads', None), use_bias=False,
        dtype=dtype, rngs=rngs,
    )  # fmt: skip
    self.bc_proj = layers.fused_dense(  # per direction: B and C (one group, shared by the heads)
        width, (2, 2, state), ('embed', None, None, None), use_bias=False, dtype=dtype, rngs=rngs
    )
    self.dt_proj = layers.fused_dense(
        width, (2, heads), ('embed', None, 'heads'), use_bias=False, dtype=dtype, rngs=rngs
    )
    bound = 1.0 / math.sqrt(CONV)
    self.conv_x = _param(_uniform(-bound, bound), (2, CONV, heads, self.head_dim),
                         (None, None, 'heads', None), rngs)  # fmt: skip
    self.conv_x_bias = _param(nnx.initializers.zeros, (2, heads, self.head_dim),
                              (None, 'heads', None), rngs)  # fmt: skip
    self.conv_bc = _param(_uniform(-bound, bound), (2, CONV, 2, state), (None,) * 4, rngs)
    self.conv_bc_bias = _param(nnx.initializers.zeros, (2, 2, state), (None,) * 3, rngs)
    # Mamba2's initialisation: A = -U(1, 16); dt = softplus(dt_bias) log-uniform in
    # [0.001, 0.1] (dt_bias its inverse softplus); the skip D = 1.
    log_a = lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))
    self.log_a = _param(log_a, (2, heads), (None, 'heads'), rngs)

    def dt_bias(key, shape, dtype):
      dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
      return dt + jnp.log(-jnp.expm1(-dt))

    self.dt_bias = _param(dt_bias, (2, heads), (None, 'heads'), rngs)
    self.skip = _param(nnx.initializers.ones, (2, heads), (None, 'heads'), rngs)
    self.norm = nnx.RMSNorm(
        inner,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ('mlp',), eager_sharding=False),
        rngs=rngs,
    )
    self.out_proj = layers.dense(inner, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def direction_inputs(self, d: int, x, b, c, dt) -> tuple:
    """Direction d's (x, dt, a, B, C) for the SSD, from its (B, L, ...) projections in the order
    it reads them: short causal convolution, SiLU, dt = softplus(dt + bias), A = -exp(log_a)."""
    x = jax.nn.silu(_depthwise_causal_conv(x, self.conv_x[d], self.conv_x_bias[d]))
    bc = _depthwise_causal_conv(jnp.stack([b, c], 2), self.conv_bc[d], self.conv_bc_bias[d])
    bc = jax.nn.silu(bc)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[d])
    return x, dt, -jnp.exp(self.log_a[...][d]), bc[:, :, 0, None], bc[:, :, 1, None]

  def __call__(self, tokens: jax.Array, review: jax.Array | None) -> jax.Array:
    """tokens (B, L, width) in scan order; review (B, R, width) or None -> (B, L, width)."""
    r = 0 if review is None else review.shape[1]
    seq = tokens if review is None else jnp.concatenate([review, tokens], axis=1)
    xz = self.in_proj(seq)
    x, z = constrain(xz[:, :, 0], layers.HEADS), xz[:, r:, 1]
    bc, dt = self.bc_proj(seq), self.dt_proj(seq)

    def backward_order(t):  # review tokens first, then the tokens from last to first
      return jnp.concatenate([t[:, :r], jnp.flip(t[:, r:], axis=1)], axis=1)

    forward = self.direction_inputs(0, x, bc[:, :, 0, 0], bc[:, :, 0, 1], dt[:, :, 0])
    backward = self.direction_inputs(
        1, *(backward_order(t) for t in (x, bc[:, :, 1, 0], bc[:, :, 1, 1], dt[:, :, 1]))
    )
    y_forward, y_backward = ssd.two_scans(forward, backward, self.chunk)
    skip = lambda d, inputs: (self.skip[d][:, None] * inputs[0]).astype(y_forward.dtype)
    y_forward, y_backward = y_forward + skip(0, forward), y_backward + skip(1, backward)
    y = y_forward[:, r:] + jnp.flip(y_backward[:, r:], axis=1)
    y = (y * jax.nn.silu(z)).reshape(*y.shape[:2], -1)
    return self.out_proj(constrain(self.norm(y), layers.HIDDEN))


class TemporalSwinAttention(nnx.Module):
  """The TE-branch: multi-head attention inside (shifted) windows of the token grid."""

  def __init__(self, width: int, heads: int, window, *, qkv_bias: bool, dtype, rngs: nnx.Rngs):
    self.heads, self.window = heads, tuple(window)
    self.qkv = layers.fused_dense(
        width, (3, heads, width // heads), ('embed', None, 'heads', None), use_bias=qkv_bias,
        dtype=dtype, rngs=rngs,
    )  # fmt: skip
    self.out = layers.dense(width, width, ('heads', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, angles, grid, shifted: bool) -> jax.Array:
    b, l, d = x.shape
    qkv = self.qkv(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if angles is not None:
      q, k = layers.apply_rope(q, angles), layers.apply_rope(k, angles)
    window, layout = window_layout(grid, self.window, shifted)
    q, k, v = (_to_windows(t, grid, window, layout) for t in (q, k, v))  # (B, n, w, heads, hd)
    scores = jnp.einsum('bnqhd,bnkhd->bnhqk', q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d // self.heads)
    real = jnp.asarray(window_tokens(grid, self.window, shifted) >= 0)[None, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(real, scores, -1e30), axis=-1).astype(v.dtype)
    y = jnp.einsum('bnhqk,bnkhd->bnqhd', probs, v, preferred_element_type=jnp.float32)
    return self.out(_from_windows(y.astype(x.dtype), grid, window, layout).reshape(b, l, d))


def _to_windows(x: jax.Array, grid, window, layout) -> jax.Array:
  """(B, L, ...) raster tokens -> (B, windows, tokens per window, ...): the grid padded as
  `layout` says and cut into windows by reshapes and one transpose (no gather, whose gradient
  would be a scatter)."""
  b, rest = x.shape[0], x.shape[2:]
  x = x.reshape(b, *grid, *rest)
  x = jnp.pad(x, ((0, 0),) + tuple((f, n - f - g) for (f, n), g in zip(layout, grid))
              + ((0, 0),) * len(rest))  # fmt: skip
  (nt, nh, nw), (wt, wh, ww) = [n for _, n in layout], window
  x = x.reshape(b, nt // wt, wt, nh // wh, wh, nw // ww, ww, *rest)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(rest)))
  return x.reshape(b, -1, wt * wh * ww, *rest)


def _from_windows(x: jax.Array, grid, window, layout) -> jax.Array:
  """The inverse of `_to_windows`: (B, windows, tokens per window, ...) -> (B, t, h, w, ...)."""
  b, rest = x.shape[0], x.shape[3:]
  (nt, nh, nw), (wt, wh, ww) = [n for _, n in layout], window
  x = x.reshape(b, nt // wt, nh // wh, nw // ww, wt, wh, ww, *rest)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + len(rest))).reshape(b, nt, nh, nw, *rest)
  return x[:, layout[0][0] :, layout[1][0] :, layout[2][0] :][:, : grid[0], : grid[1], : grid[2]]


class MATE(nnx.Module):
  """MA-branch + TE-branch, the drop-in replacement of a DiT block's self-attention."""

  def __init__(self, width, heads, *, state, chunk, window, review, qkv_bias, dtype, rngs):
    self.review = review
    self.ma = BidirectionalMamba(width, heads, state=state, chunk=chunk, dtype=dtype, rngs=rngs)
    self.te = TemporalSwinAttention(width, heads, window, qkv_bias=qkv_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, angles, grid, layer) -> jax.Array:
    """x (B, L, width) in raster order on the token `grid`; `layer` the block's index (an int,
    or a traced int inside a scan over layers) picks its scan order and window shift."""
    b, _, d = x.shape
    review = x.reshape(b, grid[0], -1, d).mean(axis=2) if self.review else None
    branches = [lambda y, o=o: _reorder(self.ma(_reorder(y, grid, o), review), grid, o, True)
                for o in ORDERS]  # fmt: skip
    windows = [lambda y, s=s: self.te(y, angles, grid, s) for s in (False, True)]
    if isinstance(layer, int):
      return branches[layer % 3](x) + windows[layer % 2](x)
    return jax.lax.switch(layer % 3, branches, x) + jax.lax.switch(layer % 2, windows, x)


def macs_per_block(width: int, heads: int, grid, *, state, chunk, window, review) -> int:
  """Multiply-accumulates of one MATE mixer on one clip of `grid` tokens (as dit/model.py's
  forward_macs counts attention): the projections, both scans' four SSD products, the windowed
  attention's two products (padding included). Linear in the number of tokens."""
  tokens = math.prod(grid)
  scanned = tokens + (grid[0] if review else 0)
  inner = EXPAND * width
  head_dim = inner // heads
  padded = -(-scanned // chunk) * chunk
  projections = scanned * width * (2 * inner + 4 * state + 2 * heads) + tokens * inner * width
  # Per direction: C B^T and its product with x inside chunks, chunk states and their read-out.
  scan = 2 * (padded * chunk * heads * (state + head_dim) + 2 * padded * heads * head_dim * state)
  windows = window_tokens(grid, window, shifted=False)
  attention = 4 * tokens * width * width + 2 * windows.size * windows.shape[1] * width
  return projections + scan + attention
