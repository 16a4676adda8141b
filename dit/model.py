"""DiT (Peebles & Xie, 2023): a class-conditional diffusion transformer over ViTok latents.

    latents (B, t, h, w, c) -> patches (1 x p x p latent tokens) -> linear c*p*p -> width
    timestep -> sinusoid (256) -> MLP -> width;   class -> embedding (num_classes + a null class)
    cond = silu(t_emb + y_emb)
    depth x adaLN-Zero block(tokens, cond) -> adaLN final layer -> linear -> out channels per patch

Every block starts as the identity: the modulation that scales and gates each residual branch
is zero-initialised, and so is the final projection, so the untrained network outputs zeros.

Options for long video (NUWA-XL, W.A.L.T, ExVideo):
  frame_mask  known latent frames: the input gains one channel, 1 on the latent frames whose values
              are given clean (the diffusion code puts them in place of the noisy ones), 0 on those
              to generate; one model then generates, continues, infills and interpolates.
  strides     the frame stride of the clip (keyframes far apart, or consecutive frames), embedded
              like the class and added to the conditioning vector.
  frame_positions
              a learned per-latent-frame embedding (zero-initialised, so it starts as a no-op),
              added to every token of the frame: with the stride embedding, the parameters
              ExVideo-style post-tuning trains to extend the model to longer clips.
The token grid is the input's: a clip longer than the trained one gets positions past the trained
range (sin-cos and RoPE are both functions of the frame index; a learned table must be as long
as the clip).

Recipes (`DiTConfig.recipe`):
  'vitok'    what ViTok used downstream: gated MLP (SwiGLU, hidden int(2.67 w)), q/k/v without
             bias, 3-D RoPE over the latent (t, h, w) grid, one DiT token per latent token (p = 1),
             plus fixed sin-cos absolute positions at the input (as LightningDiT keeps them).
  'classic'  the original DiT: GELU-tanh MLP of ratio 4, q/k/v with bias, fixed sin-cos positions,
             patch embedding (p = 2 for the paper's models).

Sizes (width / blocks / heads) are the DiT paper's S, B, L, XL and this project's CPU sizes,
named by the family and the width so that nobody takes them for ViTok sizes: variants read
`DiT-<size>/<p>`, e.g. 'DiT-L/1', 'DiT-XL/2', 'DiT-cpu128/1'. Model code only: no hosts, no
checkpoints, no objective (see dit/diffusion.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dit import mate
from vitok.core import config_checks
from vitok.core.sharding import constrain
from vitok.nn import context_parallel, layers

SIZES: dict[str, layers.ViTSize] = {
    'cpu64': layers.ViTSize(width=64, depth=2, heads=2),
    'cpu128': layers.ViTSize(width=128, depth=4, heads=4),
    'cpu256': layers.ViTSize(width=256, depth=4, heads=8),  # as the tokenizer's cpu256
    'S': layers.ViTSize(width=384, depth=12, heads=6),
    'B': layers.ViTSize(width=768, depth=12, heads=12),
    'L': layers.ViTSize(width=1024, depth=24, heads=16),
    'XL': layers.ViTSize(width=1152, depth=28, heads=16),
}
FREQUENCY_DIM = 256  # sinusoidal timestep features before the timestep MLP

_VARIANT_RE = re.compile(r'^DiT-(?P<size>\w+)/(?P<p>\d+)$')

MODEL_FIELDS = {
    'model.recipe': config_checks.OneOf(('vitok', 'classic')),
    'model.dtype': config_checks.OneOf(tuple(layers.COMPUTE_DTYPES)),
    'model.remat': config_checks.OneOf(tuple(layers.REMAT_POLICIES)),
    'model.attention': config_checks.OneOf(layers.ATTENTION_CHOICES),
    'model.context_attention': config_checks.OneOf(context_parallel.SCHEMES),
    'model.rope_theta': config_checks.POSITIVE,
    'model.mixer': config_checks.OneOf(('attention', 'mate')),
    'model.ssd_chunk': config_checks.AT_LEAST_1,
    'model.ssd_state': config_checks.AT_LEAST_1,
}


def parse_variant(variant: str) -> tuple[layers.ViTSize, int]:
  """'DiT-L/1' -> (the L size, patch 1)."""
  m = _VARIANT_RE.match(str(variant))
  if not m:
    raise config_checks.ConfigError(
        f'model.variant={variant!r} is malformed: expected "DiT-<size>/<patch>" such as '
        f'"DiT-L/1" or "DiT-XL/2"; sizes {", ".join(SIZES)}'
    )
  if m['size'] not in SIZES:
    raise config_checks.ConfigError(
        f'model.variant={variant!r}: unknown DiT size {m["size"]!r}; known: {", ".join(SIZES)}'
    )
  if int(m['p']) < 1:
    raise config_checks.ConfigError(f'model.variant={variant!r}: the patch size must be >= 1')
  return SIZES[m['size']], int(m['p'])


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Everything that determines the network."""

  variant: str = 'DiT-L/1'
  recipe: str = 'vitok'  # 'vitok' | 'classic'
  grid: tuple[int, int, int] = (4, 16, 16)  # latent (t, h, w)
  channels: int = 16  # latent channels c
  learn_sigma: bool = True  # output 2c channels: noise and the variance interpolation
  num_classes: int = 101
  rope_theta: float = 10000.0
  frame_mask: bool = False  # a known-frames mask channel at the input (see the module doc)
  strides: tuple[int, ...] = ()  # the frame strides it is told (empty: no stride conditioning)
  frame_positions: int = 0  # length of the learned per-frame embedding table (0: none)
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat: str = 'none'
  scan: bool = False  # blocks as one lax.scan over stacked parameters (see layers.make_blocks)
  attention: str = 'xla'
  context_attention: str = 'all_to_all'  # across a 'context' mesh axis: 'all_to_all' | 'ring'
  # The token mixer of every block: 'attention' (the DiT's) or 'mate' (LinGen's MATE,
  # dit/mate.py: a bidirectional Mamba2 scan + temporal Swin windows, linear in the tokens)
  # with the SSD's chunk and state size, the (t, h, w) window and the review tokens.
  mixer: str = 'attention'
  ssd_chunk: int = 64
  ssd_state: int = 64
  window: tuple[int, int, int] = (8, 4, 4)
  review_tokens: bool = True

  @property
  def rope(self) -> bool:
    return self.recipe == 'vitok'

  def __post_init__(self):
    _, p = parse_variant(self.variant)
    config_checks.check_fields({'model': dataclasses.asdict(self)}, MODEL_FIELDS)
    layers.check_attention(self.attention, self.dtype)
    if any(s < 1 for s in self.strides) or len(set(self.strides)) != len(self.strides):
      raise config_checks.ConfigError(
          f'model.strides={list(self.strides)} must be distinct positive frame strides'
      )
    if self.frame_positions < 0:
      raise config_checks.ConfigError(
          f'model.frame_positions={self.frame_positions} must be >= 0 (0: no learned table)'
      )
    if len(self.window) != 3 or min(self.window) < 1:
      raise config_checks.ConfigError(
          f'model.window={list(self.window)} must be three positive sizes (t, h, w) in tokens'
      )
    t, h, w = self.grid
    if h % p or w % p:
      raise config_checks.ConfigError(
          f'model.variant={self.variant!r}: the patch size {p} does not divide the latent grid '
          f'{h}x{w}'
      )

  @property
  def size(self) -> layers.ViTSize:
    return parse_variant(self.variant)[0]

  @property
  def patch(self) -> int:
    return parse_variant(self.variant)[1]

  @property
  def in_channels(self) -> int:
    return self.channels + (1 if self.frame_mask else 0)

  @property
  def out_channels(self) -> int:
    return 2 * self.channels if self.learn_sigma else self.channels

  @property
  def token_grid(self) -> tuple[int, int, int]:
    t, h, w = self.grid
    return t, h // self.patch, w // self.patch

  @property
  def tokens(self) -> int:
    return math.prod(self.token_grid)

  @property
  def mlp_hidden(self) -> int:
    width = self.size.width
    return 4 * width if self.recipe == 'classic' else layers.mlp_hidden(width)


def timestep_features(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 10000.0):
  """(B,) timesteps (any real scale; the objectives pass 0..1000) -> (B, dim) [cos | sin]
  features at geometrically spaced frequencies (DiT's TimestepEmbedder)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_positions(grid: tuple[int, int, int], width: int) -> np.ndarray:
  """Fixed sin-cos position embeddings (L, width) for tokens on a (t, h, w) grid in raster
  order: width/2 features per spatial axis (h, w), as the original 2-D DiT, plus the time index
  added on the same features when t > 1 (for t = 1 this is exactly DiT's embedding)."""
  t, h, w = grid
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

  def embed(pos):
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (n, width / 2)

  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing='ij')
  spatial = np.concatenate([embed(hh.reshape(-1)), embed(ww.reshape(-1))], axis=1)
  if t > 1:
    spatial = spatial + np.concatenate([embed(tt.reshape(-1))] * 2, axis=1)
  return spatial.astype(np.float32)


def _zeros(axes):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes, eager_sharding=False)


def _plain_norm(width: int, dtype) -> nnx.LayerNorm:
  """LayerNorm without scale or bias (adaLN supplies them), eps 1e-6 as in DiT."""
  return nnx.LayerNorm(
      width, epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, rngs=nnx.Rngs(0)
  )


def _modulation(width: int, parts: int, rngs) -> nnx.Einsum:
  """silu(cond) -> `parts` width-vectors (shift / scale / gate), zero-initialised.

  Always float32, whatever the compute dtype: it is one row per clip (no cost), and the gradient
  of each shift / scale / gate is a sum over every token of the clip, which in float32 is one
  fast reduction where in bfloat16 XLA:CPU builds a slow windowed tree of partial sums (measured:
  7% of a bfloat16 DiT-S/2 step). `modulate` and the gated residuals round back to x's dtype."""
  return nnx.Einsum(
      'bd,dkw->bkw',
      (width, parts, width),
      (parts, width),
      dtype=jnp.float32,
      kernel_init=_zeros(('embed', None, None)),
      bias_init=_zeros((None, None)),
      rngs=rngs,
  )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return (x * (1.0 + scale[:, None]) + shift[:, None]).astype(x.dtype)


def gated(x: jax.Array, gate: jax.Array, branch: jax.Array) -> jax.Array:
  """x + gate * branch, the residual kept in x's dtype (gate is float32; see _modulation)."""
  return x + (gate[:, None] * branch).astype(x.dtype)


class DiTBlock(nnx.Module):
  """adaLN-Zero block: x + gate * branch(modulate(norm(x), shift, scale)), twice."""

  def __init__(self, cfg: DiTConfig, *, dtype, rngs: nnx.Rngs):
    width, heads = cfg.size.width, cfg.size.heads
    classic = cfg.recipe == 'classic'
    self.norm1 = _plain_norm(width, dtype)
    if cfg.mixer == 'mate':
      self.mate = mate.MATE(
          width,
          heads,
          state=cfg.ssd_state,
          chunk=cfg.ssd_chunk,
          window=cfg.window,
          review=cfg.review_tokens,
          qkv_bias=classic,
          dtype=dtype,
          rngs=rngs,
      )
    else:
      self.attn = layers.Attention(
          width,
          heads,
          attention=cfg.attention,
          context=cfg.context_attention,
          qkv_bias=classic,
          dtype=dtype,
          rngs=rngs,
      )
    self.norm2 = _plain_norm(width, dtype)
    self.mlp = (
        layers.MLP(width, cfg.mlp_hidden, dtype=dtype, rngs=rngs)
        if classic
        else layers.GatedMLP(width, cfg.mlp_hidden, 'swiglu', dtype=dtype, rngs=rngs)
    )
    self.modulation = _modulation(width, 6, rngs)

  def __call__(self, x: jax.Array, cond: jax.Array, angles, *, grid=None, layer=0) -> jax.Array:
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.unstack(
        self.modulation(jax.nn.silu(cond)), axis=1
    )
    h = modulate(self.norm1(x), shift1, scale1)
    mixed = self.mate(h, angles, grid, layer) if hasattr(self, 'mate') else self.attn(h, angles)
    x = gated(x, gate1, mixed)
    x = gated(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))
    return constrain(x, layers.TOKENS)


class DiT(nnx.Module):
  """The network: `model(latents, t, labels)` -> (B, t, h, w, out_channels), float32.

  `t` is the timestep on a 0..1000 scale (DDPM's integer steps, or 1000 x a flow time);
  labels are ints in [0, num_classes], `num_classes` being the null class of classifier-free
  guidance."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    size, p = cfg.size, cfg.patch
    width = size.width
    dtype = layers.COMPUTE_DTYPES[cfg.dtype]
    normal = lambda axes: nnx.with_partitioning(
        nnx.initializers.normal(0.02), axes, eager_sharding=False
    )
    self.patch_embed = layers.dense(
        cfg.in_channels * p * p, width, ('latent', 'embed'), dtype=dtype, rngs=rngs
    )
    self.t_embed1 = nnx.Linear(
        FREQUENCY_DIM,
        width,
        kernel_init=normal((None, 'embed')),
        bias_init=_zeros(('embed',)),
        dtype=dtype,
        rngs=rngs,
    )
    self.t_embed2 = nnx.Linear(
        width,
        width,
        kernel_init=normal(('embed', None)),
        bias_init=_zeros((None,)),
        dtype=dtype,
        rngs=rngs,
    )
    self.y_embed = nnx.Embed(
        cfg.num_classes + 1, width, embedding_init=normal((None, 'embed')), rngs=rngs
    )
    if cfg.strides:
      # Zero-initialised: added to a trained model, stride conditioning starts as a no-op.
      self.stride_embed = nnx.Embed(
          len(cfg.strides), width, embedding_init=_zeros((None, 'embed')), rngs=rngs
      )
    if cfg.frame_positions:
      self.frame_embed = nnx.Embed(
          cfg.frame_positions, width, embedding_init=_zeros((None, 'embed')), rngs=rngs
      )
    self.blocks = layers.make_blocks(
        lambda r: DiTBlock(cfg, dtype=dtype, rngs=r), size.depth, cfg.scan, rngs
    )
    self.final_norm = _plain_norm(width, dtype)
    self.final_modulation = _modulation(width, 2, rngs)
    self.final = layers.Dense(
        width,
        p * p * cfg.out_channels,
        dtype=dtype,
        kernel_init=_zeros(('embed', 'latent')),
        bias_init=_zeros(('latent',)),
        rngs=rngs,
    )

  def __call__(
      self,
      latents: jax.Array,
      t: jax.Array,
      labels: jax.Array,
      known: jax.Array | None = None,
      stride: jax.Array | None = None,
  ) -> jax.Array:
    """latents (B, t, h, w, c) of any t; `known` (B, t): the latent frames given clean (with
    `frame_mask`; None: none); `stride` (B,): each clip's frame stride, one of `strides`."""
    cfg, p = self.cfg, self.cfg.patch
    b, frames, height, width, _ = latents.shape
    grid = (frames, height // p, width // p)
    if cfg.frame_mask:
      known = jnp.zeros((b, frames)) if known is None else known
      mask = jnp.broadcast_to(known[:, :, None, None, None], (b, frames, height, width, 1))
      latents = jnp.concatenate([latents, mask.astype(latents.dtype)], axis=-1)
    elif known is not None:
      raise ValueError('known frames given to a DiT without model.frame_mask')
    tokens = rearrange(latents, 'b t (h p) (w k) c -> b (t h w) (p k c)', p=p, k=p)
    x = self.patch_embed(tokens)
    # Absolute positions for both recipes: RoPE alone tells attention only relative offsets, and
    # a DiT must place content (e.g. a class's pattern) at absolute positions of the grid; without
    # them a small DiT could not even overfit one latent per class (measured: sampling error 1.4
    # vs 0.7 with them, in units of the latents' std, after 400 steps).
    x = x + jnp.asarray(sincos_positions(grid, cfg.size.width), x.dtype)
    if cfg.frame_positions:
      if frames > cfg.frame_positions:
        raise ValueError(
            f'a clip of {frames} latent frames is longer than the learned frame table '
            f'(model.frame_positions={cfg.frame_positions})'
        )
      per_frame = jnp.repeat(self.frame_embed(jnp.arange(frames)), grid[1] * grid[2], axis=0)
      x = x + per_frame.astype(x.dtype)[None]
    angles = None
    if cfg.rope:
      head_dim = cfg.size.width // cfg.size.heads
      angles = layers.rope_angles(grid, head_dim, '3d', cfg.rope_theta)
    x = constrain(x, layers.TOKENS)
    t_emb = self.t_embed2(jax.nn.silu(self.t_embed1(timestep_features(t))))
    cond = t_emb + self.y_embed(labels)
    if cfg.strides:
      if stride is None:
        raise ValueError(f"a DiT with model.strides={list(cfg.strides)} needs each clip's stride")
      index = jnp.argmax(stride[:, None] == jnp.asarray(cfg.strides)[None], axis=1)
      cond = cond + self.stride_embed(index)
    x = layers.apply_blocks(
        self.blocks, x, cond, angles, scan=cfg.scan, remat=cfg.remat, indexed=True, grid=grid
    )
    shift, scale = jnp.unstack(self.final_modulation(jax.nn.silu(cond)), axis=1)
    out = self.final(modulate(self.final_norm(x), shift, scale)).astype(jnp.float32)
    return rearrange(
        out, 'b (t h w) (p k c) -> b t (h p) (w k) c', t=grid[0], h=grid[1], w=grid[2], p=p, k=p
    )


# ----------------------------------------------------------------------------------------------
# Sizes and costs, from abstract shapes only.
# ----------------------------------------------------------------------------------------------


def count_params(cfg: DiTConfig) -> int:
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def forward_macs(cfg: DiTConfig) -> int:
  """Multiply-accumulates of one forward pass on one clip's latents (the DiT paper's "Gflops"
  count one multiply-add as one flop): patch embedding, per block q/k/v, output projection, MLP,
  the two attention products (or the MATE mixer's count) and the adaLN modulation, the final
  layer and the timestep MLP."""
  width, depth = cfg.size.width, cfg.size.depth
  tokens, p = cfg.tokens, cfg.patch
  mlp = (2 if cfg.recipe == 'classic' else 3) * width * cfg.mlp_hidden
  if cfg.mixer == 'mate':
    mixer = mate.macs_per_block(
        width,
        cfg.size.heads,
        cfg.token_grid,
        state=cfg.ssd_state,
        chunk=cfg.ssd_chunk,
        window=cfg.window,
        review=cfg.review_tokens,
    )
  else:
    mixer = tokens * 4 * width * width + 2 * tokens * tokens * width
  per_block = tokens * mlp + mixer + 6 * width * width
  embed = tokens * cfg.in_channels * p * p * width + FREQUENCY_DIM * width + width * width
  final = 2 * width * width + tokens * width * p * p * cfg.out_channels
  return embed + depth * per_block + final
