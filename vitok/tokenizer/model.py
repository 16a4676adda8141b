"""ViTok: a ViT autoencoder that maps a clip to a continuous latent grid and back.

    video (B, T, H, W, 3) in [-1, 1]
      -> tubelets (q, p, p) -> linear embed -> ViT encoder -> linear to 2c = (mean, log-variance)
      -> z = mean (+ sigma * eps in training)                         latents (B, T/q, H/p, W/p, c)
      -> linear c -> width -> ViT decoder -> linear to q*p*p*3 pixels -> un-patchify -> (B, T, H, W, 3)

The latent holds E = (T/q)(H/p)(W/p) * c floats per clip; E is what predicts reconstruction quality.
Encoder and decoder are sized independently: variant strings read `<Enc>-<Dec>/<q>x<p>`, e.g.
'S-B/4x8' (small encoder, base decoder, 4-frame by 8x8-pixel tubelets) or 'S-B/16' for images.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from vitok.core import config_checks
from vitok.nn import context_parallel, layers

# ViTok's encoder / decoder sizes: the paper's S, B, L (Table 1; head dims 64, 64, 72, the last
# divisible by 3 for axial RoPE) plus this project's CPU sizes, named by their width so that
# nobody takes them for ViT-Ti or for a DiT size. They keep the paper's block recipe and serve
# the unit tests and the 2-core demos.
SIZES: dict[str, layers.ViTSize] = {
    'cpu128': layers.ViTSize(width=128, depth=4, heads=4),
    'cpu256': layers.ViTSize(width=256, depth=4, heads=8),
    'S': layers.ViTSize(width=768, depth=6, heads=12),
    'B': layers.ViTSize(width=768, depth=12, heads=12),
    'L': layers.ViTSize(width=1152, depth=24, heads=16),
}
RENAMED_SIZES = {'Ti': 'cpu128', 'STi': 'cpu256'}  # names before the DiT shared the project


@dataclasses.dataclass(frozen=True)
class Variant:
  encoder: str
  decoder: str
  q: int  # temporal tubelet size
  p: int  # spatial tubelet size


_VARIANT_RE = re.compile(r'^(?P<enc>[A-Za-z]\w*)-(?P<dec>[A-Za-z]\w*)/(?:(?P<q>\d+)x)?(?P<p>\d+)$')


def parse_variant(variant: str) -> Variant:
  """'S-B/4x8' -> Variant('S', 'B', q=4, p=8); 'S-L/16' -> q=1, p=16."""
  m = _VARIANT_RE.match(str(variant))
  if not m:
    raise ValueError(
        f'model.variant={variant!r} is malformed: expected "<Enc>-<Dec>/<q>x<p>" '
        f'such as "S-B/4x8", or "<Enc>-<Dec>/<p>" for images such as "S-B/16"'
    )
  for role in ('enc', 'dec'):
    if m[role] in RENAMED_SIZES:
      raise ValueError(
          f'model.variant={variant!r}: the {role}oder size {m[role]!r} is now called '
          f'{RENAMED_SIZES[m[role]]!r} (a CPU size, not ViT-Ti)'
      )
    if m[role] not in SIZES:
      raise ValueError(
          f'model.variant={variant!r}: unknown {role}oder size {m[role]!r}; '
          f'known sizes: {", ".join(SIZES)}'
      )
  q, p = int(m['q'] or 1), int(m['p'])
  if q < 1 or p < 1:
    raise ValueError(f'model.variant={variant!r}: tubelet sizes must be positive')
  return Variant(m['enc'], m['dec'], q, p)


# Ranges and choices of the model fields (checked by vitok.core.config_checks, like every field).
MODEL_FIELDS = {
    'model.channels': config_checks.AT_LEAST_1,
    'model.rope_theta': config_checks.POSITIVE,
    'model.mlp': config_checks.OneOf(tuple(layers.GATED_ACTIVATIONS)),
    'model.rope': config_checks.OneOf(('3d', '1d')),
    'model.dtype': config_checks.OneOf(tuple(layers.COMPUTE_DTYPES)),
    'model.remat': config_checks.OneOf(tuple(layers.REMAT_POLICIES)),
    'model.attention': config_checks.OneOf(layers.ATTENTION_CHOICES),
    'model.context_attention': config_checks.OneOf(context_parallel.SCHEMES),
    'model.logvar_min': config_checks.Range(),
    'model.logvar_max': config_checks.Range(),
}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Everything that determines the network (a typed view of `config.model`)."""

  variant: str = 'S-B/4x8'
  channels: int = 16  # c: latent channels per token
  mlp: str = 'swiglu'  # 'swiglu' | 'geglu'
  rope: str = '3d'  # '3d' axial over (t, h, w) | '1d' raster index
  rope_theta: float = 10000.0
  logvar_min: float = -30.0
  logvar_max: float = 20.0
  dtype: str = 'float32'  # compute dtype; parameters are always float32
  remat: str = 'none'  # 'none' | 'full' | 'save_matmuls' (per block)
  scan: bool = False  # each ViT's blocks as one lax.scan over stacked parameters
  # 'xla' | 'cudnn' (NVIDIA GPUs) | 'blockwise' (any) | 'pallas_tpu' | 'splash_tpu' (TPUs)
  attention: str = 'xla'
  # Attention across a 'context' mesh axis: 'all_to_all' | 'ring' (vitok/nn/context_parallel.py)
  context_attention: str = 'all_to_all'

  @classmethod
  def from_config(cls, model_cfg) -> 'TokenizerConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(model_cfg).items() if k in fields})

  def __post_init__(self):
    parse_variant(self.variant)
    config_checks.check_fields({'model': dataclasses.asdict(self)}, MODEL_FIELDS)
    if not self.logvar_min < self.logvar_max:
      raise config_checks.ConfigError(
          f'model.logvar_min={self.logvar_min} must be below model.logvar_max={self.logvar_max}'
      )
    layers.check_attention(self.attention, self.dtype)

  def check_backend(self, backend: str) -> None:
    """Start-up check of the choices that depend on the hardware."""
    layers.check_attention(self.attention, self.dtype, backend)

  @property
  def parsed(self) -> Variant:
    return parse_variant(self.variant)

  def latent_grid(self, frames: int, res: int) -> tuple[int, int, int]:
    """(t, h, w) token grid of a frames x res x res clip; raises naming the bad setting."""
    v = self.parsed
    if frames % v.q:
      raise ValueError(
          f'data.frames={frames} is not divisible by the temporal tubelet size '
          f'q={v.q} of model.variant={self.variant!r}'
      )
    if res % v.p:
      raise ValueError(
          f'data.res={res} is not divisible by the spatial tubelet size '
          f'p={v.p} of model.variant={self.variant!r}'
      )
    return frames // v.q, res // v.p, res // v.p


class ViTok(nnx.Module):
  """The tokenizer. See the module docstring for the data flow; shapes below use
  B batch, T frames, H x W pixels, (t, h, w) = (T/q, H/p, W/p) token grid, c latent channels."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    v = cfg.parsed
    self.q, self.p = v.q, v.p
    enc, dec = SIZES[v.encoder], SIZES[v.decoder]
    dtype = layers.COMPUTE_DTYPES[cfg.dtype]
    tubelet = v.q * v.p * v.p * 3
    # Kernel = stride = (q, p, p): a 3-D convolution that is exactly one linear map per tubelet.
    vit = dict(remat=cfg.remat, scan=cfg.scan, attention=cfg.attention,
               context=cfg.context_attention, dtype=dtype, rngs=rngs)  # fmt: skip
    self.patch_embed = layers.dense(
        tubelet, enc.width, ('tubelet', 'embed'), dtype=dtype, rngs=rngs
    )
    self.encoder = layers.ViT(enc, cfg.mlp, **vit)
    self.to_moments = layers.dense(
        enc.width, 2 * cfg.channels, ('embed', 'latent'), dtype=dtype, rngs=rngs
    )
    self.from_latent = layers.dense(
        cfg.channels, dec.width, ('latent', 'embed'), dtype=dtype, rngs=rngs
    )
    self.decoder = layers.ViT(dec, cfg.mlp, **vit)
    self.to_pixels = layers.dense(dec.width, tubelet, ('embed', 'tubelet'), dtype=dtype, rngs=rngs)

  def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video (B, T, H, W, 3) float in [-1, 1] -> (mean, logvar), each float32 (B, t, h, w, c)."""
    b, T, H, W, _ = video.shape
    grid = (T // self.q, H // self.p, W // self.p)
    tubelets = rearrange(
        video, 'b (t q) (h p) (w k) c -> b (t h w) (q p k c)', q=self.q, p=self.p, k=self.p
    )
    x = self.patch_embed(tubelets)
    x = self.encoder(x, rope_for(self.cfg, grid, self.encoder.size))
    mean, logvar = jnp.split(self.to_moments(x).astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, self.cfg.logvar_min, self.cfg.logvar_max)
    to_grid = lambda a: a.reshape(b, *grid, self.cfg.channels)
    return to_grid(mean), to_grid(logvar)

  def encode(self, video: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Latents (B, t, h, w, c) float32: the posterior mean, or a sample when `key` is given."""
    mean, logvar = self.encode_moments(video)
    return mean if key is None else sample(mean, logvar, key)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latents (B, t, h, w, c) -> video (B, t*q, h*p, w*p, 3) float32, nominally in [-1, 1]
    (no output squashing, as in the paper)."""
    return self.tokens_to_video(self.to_pixels(self.decode_features(z)), z.shape[1:4])

  def decode_features(self, z: jax.Array) -> jax.Array:
    """Latents (B, t, h, w, c) -> the decoder's output tokens (B, t*h*w, width), before the
    final `to_pixels` projection (stage 2's adaptive GAN weight differentiates through it)."""
    b, t, h, w, _ = z.shape
    x = self.from_latent(z.reshape(b, t * h * w, -1))
    return self.decoder(x, rope_for(self.cfg, (t, h, w), self.decoder.size))

  def tokens_to_video(self, pixels: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Per-token tubelet pixels (B, t*h*w, q*p*p*3) -> video (B, t*q, h*p, w*p, 3) float32."""
    t, h, w = grid
    pixels = pixels.astype(jnp.float32)
    return rearrange(
        pixels,
        'b (t h w) (q p k c) -> b (t q) (h p) (w k) c',
        t=t,
        h=h,
        w=w,
        q=self.q,
        p=self.p,
        k=self.p,
    )

  def __call__(self, video: jax.Array, key: jax.Array | None = None):
    """Full autoencoder pass: returns (reconstruction, mean, logvar). Samples z when `key` is
    given (training), uses the mean otherwise (evaluation)."""
    mean, logvar = self.encode_moments(video)
    z = mean if key is None else sample(mean, logvar, key)
    return self.decode(z), mean, logvar


def rope_for(cfg: TokenizerConfig, grid, size: layers.ViTSize) -> jax.Array:
  """RoPE angles for a ViT stack of `size` on a (t, h, w) token grid."""
  return layers.rope_angles(grid, size.width // size.heads, cfg.rope, cfg.rope_theta)


def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """Reparameterised sample z = mean + sigma * eps."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, sigma^2) || N(0, 1)) as a per-element mean over tokens x channels: (B,)."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).mean(axis=-1)


# ----------------------------------------------------------------------------------------------
# Sizes and costs, from abstract shapes only (no weights are allocated).
# ----------------------------------------------------------------------------------------------


def count_params(cfg: TokenizerConfig) -> dict[str, int]:
  """Encoder-side, decoder-side and total parameter counts via `nnx.eval_shape`.

  The encoder side is patch embedding + encoder ViT + the projection to (mean, logvar); the decoder
  side is the projection from c + decoder ViT + the pixel head (the paper's split)."""
  abstract = nnx.eval_shape(lambda: ViTok(cfg, rngs=nnx.Rngs(0)))
  size = lambda module: sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
  enc = size(abstract.patch_embed) + size(abstract.encoder) + size(abstract.to_moments)
  dec = size(abstract.from_latent) + size(abstract.decoder) + size(abstract.to_pixels)
  return {'encoder': enc, 'decoder': dec, 'total': enc + dec}


def forward_macs(cfg: TokenizerConfig, frames: int, res: int) -> dict[str, int]:
  """Multiply-accumulates of encode + decode of one clip (the paper's "GFLOPs" x 1e9)."""
  v = cfg.parsed
  t, h, w = cfg.latent_grid(frames, res)
  tokens = t * h * w
  tubelet = v.q * v.p * v.p * 3
  enc, dec = SIZES[v.encoder], SIZES[v.decoder]
  enc_macs = (
      tokens * tubelet * enc.width
      + layers.vit_macs(enc, tokens)
      + tokens * enc.width * 2 * cfg.channels
  )
  dec_macs = (
      tokens * cfg.channels * dec.width
      + layers.vit_macs(dec, tokens)
      + tokens * dec.width * tubelet
  )
  return {'encoder': enc_macs, 'decoder': dec_macs, 'total': enc_macs + dec_macs}
