"""Transformer building blocks shared by the ViTok encoder and decoder and the DiT.

Everything here works on token sequences `x: (B, L, width)` laid out in raster order over a
`(t, h, w)` grid, so that rotary position embeddings can be computed from the grid alone.

Block recipe (paper, Sec. 3): pre-LayerNorm, attention with no bias on q/k/v and a bias on the
output projection, gated MLP with hidden size int(2.67 * width) and biases, no dropout, and a final
LayerNorm after the last block.

Sharding: every parameter carries logical axis names ('embed', 'mlp', 'heads', ...) through
`nnx.with_partitioning`, and activations are pinned at block boundaries with `sharding.constrain`;
the config's rules map both to mesh axes (see `vitok.core.sharding`). On one device both are inert.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.core.config_checks import ConfigError
from vitok.core.sharding import constrain, shard_mapped
from vitok.nn import attention as attention_lib
from vitok.nn import context_parallel, matmul


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """Width / number of blocks / attention heads of one ViT stack."""

  width: int
  depth: int
  heads: int


MLP_RATIO = 2.67
# model.dtype: what the networks compute in (parameters and optimizer state stay float32).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def mlp_hidden(width: int) -> int:
  return int(MLP_RATIO * width)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings.
# ----------------------------------------------------------------------------------------------


def _axis_pairs(num_pairs: int, num_axes: int) -> list[int]:
  """Splits the head's rotary pairs over the axes as evenly as possible (remainder goes to t)."""
  base = num_pairs // num_axes
  pairs = [base] * num_axes
  pairs[0] += num_pairs - base * num_axes
  return pairs


def rope_angles(
    grid: tuple[int, int, int], head_dim: int, kind: str = '3d', theta: float = 10000.0
) -> jax.Array:
  """Rotation angles `(L, head_dim // 2)` for tokens on a `(t, h, w)` grid in raster order.

  kind='3d': axial RoPE. The head_dim/2 rotary pairs are split between the t, h and w axes and
    each group rotates with that axis' integer coordinate, so attention logits depend only on the
    3-D offset between two tokens.
  kind='1d': one position per token, its raster index (what the released image code used).
  """
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head dimension, got {head_dim}')
  num_pairs = head_dim // 2
  t, h, w = grid
  if kind == '1d':
    positions = jnp.arange(t * h * w, dtype=jnp.float32)[:, None]  # (L, 1)
    freqs = theta ** (-jnp.arange(num_pairs, dtype=jnp.float32) / num_pairs)
    return positions * freqs[None, :]
  if kind != '3d':
    raise ValueError(f"model.rope must be '3d' or '1d', got {kind!r}")
  coords = (
      jnp.stack(jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing='ij'), axis=-1)
      .reshape(-1, 3)
      .astype(jnp.float32)
  )  # (L, 3)
  angles = []
  for axis, n in enumerate(_axis_pairs(num_pairs, 3)):
    freqs = theta ** (-jnp.arange(n, dtype=jnp.float32) / max(n, 1))
    angles.append(coords[:, axis : axis + 1] * freqs[None, :])
  return jnp.concatenate(angles, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates consecutive feature pairs of `x: (B, L, heads, head_dim)` by `angles: (L, head_dim/2)`."""
  x_pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Parameters with logical axes.
# ----------------------------------------------------------------------------------------------


class _LowPrecisionMatmul:
  """The low-precision path of Dense and FusedDense: in bfloat16 (or float16) compute, the matmul
  is bf16 x bf16 -> f32 with a float32 bias and one rounding, forward and backward
  (vitok/nn/matmul.py); float32 compute is the flax layer's own."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if not matmul.is_low_precision(self.dtype):
      return super().__call__(x)
    bias = self.bias[...] if self.bias is not None else None
    kernel = self.kernel[...].astype(self.dtype)
    return matmul.low_precision_dense(x.astype(self.dtype), kernel, bias)


class Dense(_LowPrecisionMatmul, nnx.Linear):
  """nnx.Linear (same parameters, same float32 results) with the low-precision path."""


class FusedDense(_LowPrecisionMatmul, nnx.Einsum):
  """nnx.Einsum of the form '...d,dab->...ab' (see fused_dense) with the low-precision path."""


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    dtype,
    rngs: nnx.Rngs,
) -> Dense:
  """Dense (LeCun-normal kernel, zero bias) whose kernel carries logical `axes` and whose
  bias carries the output axis. eager_sharding=False: the train step's jit places parameters by
  their names (born sharded via out_shardings), so creating a model needs no mesh context."""
  kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)
  bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False)
  return Dense(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
  )


def fused_dense(
    in_features: int,
    out_shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    use_bias: bool,
    dtype,
    rngs: nnx.Rngs,
) -> FusedDense:
  """Several projections of the same input in one matmul, with the kernel kept as
  (in, parts, ...) instead of (in, parts * ...): e.g. q/k/v as (width, 3, heads, head_dim). A
  'model' axis then splits heads (or MLP units) *within* each part, so every device holds its own
  heads' q, k and v and the attention needs no re-shuffle. The values equal those of the 2-D
  kernel an nnx.Linear would draw (same key, same element order, fan-in = in_features)."""
  out_dims = tuple(range(1, 1 + len(out_shape)))
  letters = 'abcefgh'[: len(out_shape)]
  kernel_init = nnx.with_partitioning(
      nnx.initializers.lecun_normal(in_axis=0, out_axis=out_dims), axes, eager_sharding=False
  )
  bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=False)
  return FusedDense(
      f'...d,d{letters}->...{letters}',
      (in_features, *out_shape),
      out_shape if use_bias else None,
      dtype=dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
  )


def layer_norm(width: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm whose scale and bias carry the logical axis 'norm' (replicated by default)."""
  names = ('norm',)
  return nnx.LayerNorm(
      width,
      dtype=dtype,
      rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), names, eager_sharding=False),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names, eager_sharding=False),
  )


# Activation layouts at the points where the partitioner should not have to guess.
TOKENS = ('batch', 'act_length', 'act_embed')
HEADS = ('batch', 'act_length', 'act_heads', None)
HIDDEN = ('batch', 'act_length', 'act_mlp')

# Rematerialisation: which activations of a block the backward pass keeps instead of recomputing.
REMAT_POLICIES = {
    'none': None,  # keep everything
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    'save_matmuls': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}

# model.attention -> the implementation: 'xla' (the whole score matrix, vitok/nn/attention.py's
# dense_attention, any backend), 'cudnn' (jax.nn.dot_product_attention's fused cuDNN kernel,
# NVIDIA GPUs), 'blockwise' (flash-style in plain JAX, any backend: never holds the L x L scores)
# 'pallas_tpu' (the Pallas TPU flash-attention kernel) and 'splash_tpu' (the Pallas TPU
# splash-attention kernel).
ATTENTION_IMPLS = {
    'xla': 'dense',
    'cudnn': 'cudnn',
    'blockwise': 'blockwise',
    'pallas_tpu': 'pallas',
    'splash_tpu': 'splash',
}
# What a config may ask for: an implementation, or 'auto' (the task picks one for the hardware
# and the token count: vitok/core/hardware.py:auto_attention).
ATTENTION_CHOICES = (*ATTENTION_IMPLS, 'auto')


def check_attention(attention: str, dtype: str, backend: str | None = None) -> None:
  """Start-up checks of model.attention (both families): what the kernel computes in, and (given
  the run's `backend`) where it runs ('auto' is checked once the task has resolved it)."""
  if attention == 'cudnn' and dtype != 'bfloat16':
    raise ConfigError(
        "model.attention='cudnn' needs model.dtype='bfloat16' "
        f'(got {dtype!r}): the cuDNN kernel has no float32 path'
    )
  needs = {
      'cudnn': ('gpu', 'an NVIDIA GPU'),
      'pallas_tpu': ('tpu', 'a TPU'),
      'splash_tpu': ('tpu', 'a TPU'),
  }.get(attention)
  if backend is not None and needs and backend != needs[0]:
    raise ConfigError(
        f"model.attention={attention!r} needs {needs[1]}; this run's backend is {backend!r} "
        f"(use model.attention='xla' or 'blockwise')"
    )


# The gate's activation of the gated MLP: SwiGLU (the paper's) or GeGLU.
GATED_ACTIVATIONS = {'swiglu': jax.nn.silu, 'geglu': jax.nn.gelu}


# ----------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------


class Attention(nnx.Module):
  """Multi-head self-attention: q/k/v fused into one matmul (without bias unless `qkv_bias`, as
  the original DiT has it), output projection with bias; RoPE when angles are given."""

  def __init__(
      self,
      width: int,
      heads: int,
      *,
      attention: str = 'xla',
      context: str = 'all_to_all',
      qkv_bias: bool = False,
      dtype,
      rngs: nnx.Rngs,
  ):
    if width % heads:
      raise ValueError(f'width {width} is not divisible by heads {heads}')
    if attention not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention must be one of {list(ATTENTION_IMPLS)}, got {attention!r}')
    self.heads = heads
    self.implementation = ATTENTION_IMPLS[attention]
    self.context = context  # model.context_attention: the scheme across a context axis
    # q/k/v fused into one (width, 3, heads, head_dim) projection; see fused_dense.
    self.qkv = fused_dense(
        width,
        (3, heads, width // heads),
        ('embed', None, 'heads', None),
        use_bias=qkv_bias,
        dtype=dtype,
        rngs=rngs,
    )
    self.out = dense(width, width, ('heads', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, angles: jax.Array | None) -> jax.Array:
    b, l, d = x.shape
    qkv = self.qkv(x)  # (B, L, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if angles is not None:
      with jax.named_scope('rope'):  # the scopes name ops in profiles (core/profile.py)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
    q, k, v = (constrain(a, HEADS) for a in (q, k, v))
    kernel = attention_lib.KERNELS[self.implementation]  # on (B, L, heads, head_dim)
    with jax.named_scope('attention_core'):
      # Tokens split over a context axis: all-to-all or ring around this device's kernel.
      y = context_parallel.attention(q, k, v, kernel, self.context)
      if y is None and self.implementation in ('pallas', 'splash'):  # Pallas calls: per shard
        y = shard_mapped(kernel, HEADS, q, k, v)
      elif y is None:
        y = kernel(q, k, v)
    return self.out(y.reshape(b, l, d))


class GatedMLP(nnx.Module):
  """act(x W_gate + b) * (x W_up + b), then W_down + b. SwiGLU (silu) or GELU-gated."""

  def __init__(self, width: int, hidden: int, kind: str = 'swiglu', *, dtype, rngs: nnx.Rngs):
    self.act = GATED_ACTIVATIONS[kind]
    # Gate and up projections fused into one (width, 2, hidden) matmul (same parameters as two
    # Linears); see fused_dense.
    self.gate_up = fused_dense(
        width, (2, hidden), ('embed', None, 'mlp'), use_bias=True, dtype=dtype, rngs=rngs
    )
    self.down = dense(hidden, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate_up = self.gate_up(x)  # (B, L, 2, hidden)
    hidden = self.act(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return self.down(constrain(hidden, HIDDEN))


class MLP(nnx.Module):
  """The classic transformer MLP: W_up + b, GELU (tanh approximation, as ViT and DiT), W_down + b."""

  def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.up = dense(width, hidden, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.down = dense(hidden, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(constrain(jax.nn.gelu(self.up(x), approximate=True), HIDDEN))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, width: int, heads: int, mlp: str, *, attention: str = 'xla',
               context: str = 'all_to_all', dtype, rngs: nnx.Rngs):  # fmt: skip
    self.norm1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(
        width, heads, attention=attention, context=context, dtype=dtype, rngs=rngs
    )
    self.norm2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = GatedMLP(width, mlp_hidden(width), mlp, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), angles)
    return constrain(x + self.mlp(self.norm2(x)), TOKENS)


def make_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, scan: bool, rngs):
  """`depth` blocks made by `make_block(rngs)`: a list, or with `scan` one block whose parameters
  carry a leading 'layers' axis of size `depth` (each block initialised from its own keys), which
  `apply_blocks` runs as one `lax.scan`, so the compiled program holds one block whatever the
  depth. The two layouts hold the same arrays (stacked or not) but checkpoint differently."""
  if not scan:
    return nnx.List([make_block(rngs) for _ in range(depth)])

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def stacked(rngs):
    return make_block(rngs)

  return stacked(rngs)


def apply_blocks(blocks, x, *args, scan: bool, remat: str, indexed: bool = False, **static):
  """`x` through every block of `make_blocks` in order as `block(x, *args, **static)` (`static`:
  Python values such as shapes), plus `layer=i` when `indexed` (traced inside the scan); with a
  `remat` policy the backward pass recomputes, block by block, what the policy does not save.
  The blocks run as pure functions of their split state (`jax.checkpoint`, `lax.scan`), not
  through nnx's transforms: those refuse a module built at another trace level than the one
  they run at, as in a sampler's loop, which calls a model merged outside it."""
  if not scan:
    for i, block in enumerate(blocks):
      graphdef, state = nnx.split(block)
      extra = dict(static, layer=i) if indexed else static
      x = _pure_block(graphdef, remat, scan, extra)(state, x, *args)
    return x
  graphdef, state = nnx.split(blocks)  # every array with a leading 'layers' axis
  depth = jax.tree.leaves(state)[0].shape[0]
  run = _pure_block(graphdef, remat, scan, static, indexed)

  def step(h, layer):  # (this layer's state, its index)
    return run(layer[0], h, *args, *([layer[1]] if indexed else [])), None

  x, _ = jax.lax.scan(step, x, (state, jnp.arange(depth)))
  return x


def _pure_block(graphdef, remat: str, scan: bool, static: dict, indexed: bool = False):
  """state, x, *args (and the layer index last when `indexed`) -> the block applied to x."""

  def run(state, h, *a):
    if indexed:
      *a, layer = a
      return nnx.merge(graphdef, state)(h, *a, layer=layer, **static)
    return nnx.merge(graphdef, state)(h, *a, **static)

  if remat == 'none':
    return run
  # Inside a scan the loop boundary already keeps XLA from merging recomputation away.
  return jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=not scan)


class ViT(nnx.Module):
  """A stack of blocks plus the final LayerNorm. Tokens in, tokens out: (B, L, width)."""

  def __init__(
      self,
      size: ViTSize,
      mlp: str = 'swiglu',
      *,
      remat: str = 'none',
      scan: bool = False,
      attention: str = 'xla',
      context: str = 'all_to_all',
      dtype,
      rngs: nnx.Rngs,
  ):
    if remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat must be one of {list(REMAT_POLICIES)}, got {remat!r}')
    self.size = size
    self.remat = remat
    self.scan = scan
    block = dict(attention=attention, context=context, dtype=dtype)
    self.blocks = make_blocks(
        lambda r: Block(size.width, size.heads, mlp, **block, rngs=r), size.depth, scan, rngs
    )
    self.norm = layer_norm(size.width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
    x = constrain(x, TOKENS)
    x = apply_blocks(self.blocks, x, angles, scan=self.scan, remat=self.remat)
    return self.norm(x)


def vit_macs(size: ViTSize, tokens: int) -> int:
  """Multiply-accumulates of one forward pass of a ViT stack over `tokens` tokens: the matmuls
  (q/k/v, output projection, gated MLP) and the two attention products (q k^T and attn v), which
  is how the paper's "GFLOPs" column is computed."""
  d, hidden = size.width, mlp_hidden(size.width)
  per_token = 3 * d * d + d * d + 2 * d * hidden + hidden * d
  attention = 2 * tokens * tokens * d
  return size.depth * (tokens * per_token + attention)
