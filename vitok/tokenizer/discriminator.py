"""The stage-2 discriminator: a StyleGAN2-style residual network with blur-pool downsampling.

ViTok's second stage fine-tunes the decoder against this network (`vitok.tokenizer.stage2`). As in StyleGAN2
(Karras et al. 2020, "residual" discriminator), each block is two 3x3 convolutions with LeakyReLU
0.2 on the main path and a 1x1 convolution on the skip path, both downsampled by 2 with an
anti-aliasing [1, 3, 3, 1] blur (BlurPool, Zhang 2019), summed and scaled by 1/sqrt(2). Blocks
halve the resolution until it is 4x4; a 3x3 convolution, a dense layer and a dense logit follow.
(StyleGAN2's minibatch-standard-deviation layer is left out: it couples the examples of a batch,
which then depends on how the batch is split over devices.)

Two kinds, `config.disc.kind`:

* `'2d'`: every frame is judged on its own (frames folded into the batch): one logit per frame;
* `'3d'`: the clip is judged as a whole: 3x3x3 convolutions, and the blur-pool also halves time
  while more than one frame is left: one logit per clip.

Input: videos (B, T, H, W, 3) in [-1, 1]. The parameters carry no logical axes (the network is
small): they are replicated, while the batch is split over the data axes like every activation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ['DiscriminatorConfig', 'Discriminator', 'blur_pool', 'forward_macs', 'KINDS']

KINDS = ('2d', '3d')
NEGATIVE_SLOPE = 0.2
_BLUR_TAPS = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0  # binomial, sums to 1


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  kind: str = '2d'  # '2d' (per frame) | '3d' (per clip)
  channels: int = 64  # width of the first block; doubled per block up to max_channels
  max_channels: int = 512
  dtype: str = 'float32'  # compute dtype; parameters stay float32

  @classmethod
  def from_config(cls, disc_cfg) -> 'DiscriminatorConfig':
    # (config.disc.frames, the frames judged per step, is the objective's: see vitok.tokenizer.stage2.)
    return cls(**{f.name: disc_cfg[f.name] for f in dataclasses.fields(cls)})

  def levels(self, res: int) -> int:
    """Number of downsampling blocks from `res` to 4x4 (`res` must be 4 x a power of two)."""
    levels = int(round(math.log2(res / 4))) if res >= 8 else 0
    if res < 8 or 4 * 2**levels != res:
      raise ValueError(
          f'the discriminator needs a frame size of 4 x a power of two (8, 16, 32, ...), '
          f'not data.res={res}'
      )
    return levels

  def widths(self, res: int) -> list[int]:
    """Channels at the input of each block, then at the 4x4 head."""
    return [min(self.channels * 2**i, self.max_channels) for i in range(self.levels(res) + 1)]


def blur_pool(x: jax.Array, time: bool) -> jax.Array:
  """Anti-aliased downsampling by 2 of (N, [T,] H, W, C): a separable [1, 3, 3, 1] / 8 blur applied
  with stride 2 over H and W (and over T when `time`), edges replicated, so a size n becomes
  ceil(n / 2)."""
  spatial = x.ndim - 2
  axes = [time or i > 0 for i in range(spatial)] if spatial == 3 else [True, True]
  for axis, blur in zip(range(1, 1 + spatial), axes):
    if not blur:
      continue
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1 + n % 2)
    padded = jnp.pad(x, pad, mode='edge')
    last = 2 * ((n + 1) // 2 - 1)  # padded index of the last window's first tap
    taps = [jax.lax.slice_in_dim(padded, k, k + last + 1, stride=2, axis=axis) for k in range(4)]
    x = sum(w.astype(x.dtype) * t for w, t in zip(_BLUR_TAPS, taps))
  return x


class _Block(nnx.Module):
  """Residual block: (conv3, lrelu, conv3, lrelu, blur-pool) + (blur-pool, conv1), / sqrt(2)."""

  def __init__(self, cin: int, cout: int, ndim: int, time: bool, dtype, rngs: nnx.Rngs):
    conv = lambda a, b, k, **kw: nnx.Conv(
        a, b, (k,) * ndim, padding='SAME', dtype=dtype, rngs=rngs, **kw
    )
    self.time = time
    self.conv1 = conv(cin, cin, 3)
    self.conv2 = conv(cin, cout, 3)
    self.skip = conv(cin, cout, 1, use_bias=False)

  def __call__(self, x):
    h = nnx.leaky_relu(self.conv1(x), NEGATIVE_SLOPE)
    h = blur_pool(nnx.leaky_relu(self.conv2(h), NEGATIVE_SLOPE), self.time)
    return (h + self.skip(blur_pool(x, self.time))) * (1.0 / math.sqrt(2.0))


class Discriminator(nnx.Module):
  """Logits of "real" for clips (B, T, H, W, 3) in [-1, 1]: (B, T) for kind '2d', (B, 1) for '3d'."""

  def __init__(self, cfg: DiscriminatorConfig, frames: int, res: int, *, rngs: nnx.Rngs):
    if cfg.kind not in KINDS:
      raise ValueError(f'disc.kind={cfg.kind!r} is not one of {", ".join(KINDS)}')
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    widths = cfg.widths(res)
    ndim = 3 if cfg.kind == '3d' else 2
    self.ndim = ndim
    self.from_rgb = nnx.Conv(3, widths[0], (1,) * ndim, dtype=dtype, rngs=rngs)
    blocks, t = [], frames
    for cin, cout in zip(widths[:-1], widths[1:]):
      halve_time = ndim == 3 and t > 1
      blocks.append(_Block(cin, cout, ndim, halve_time, dtype, rngs))
      t = (t + 1) // 2 if halve_time else t
    self.blocks = nnx.List(blocks)
    self.out_frames = t if ndim == 3 else 1
    self.head_conv = nnx.Conv(
        widths[-1], widths[-1], (3,) * ndim, padding='SAME', dtype=dtype, rngs=rngs
    )
    self.head_dense = nnx.Linear(
        widths[-1] * 16 * self.out_frames, widths[-1], dtype=dtype, rngs=rngs
    )
    self.logit = nnx.Linear(widths[-1], 1, dtype=dtype, rngs=rngs)

  def __call__(self, video: jax.Array) -> jax.Array:
    b, T = video.shape[:2]
    x = video.reshape(b * T, *video.shape[2:]) if self.ndim == 2 else video
    x = nnx.leaky_relu(self.from_rgb(x.astype(self.cfg.dtype)), NEGATIVE_SLOPE)
    for block in self.blocks:
      x = block(x)
    x = nnx.leaky_relu(self.head_conv(x), NEGATIVE_SLOPE)
    x = nnx.leaky_relu(self.head_dense(x.reshape(x.shape[0], -1)), NEGATIVE_SLOPE)
    logits = self.logit(x).astype(jnp.float32)[:, 0]
    return logits.reshape(b, T) if self.ndim == 2 else logits.reshape(b, 1)


def forward_macs(cfg: DiscriminatorConfig, frames: int, res: int) -> int:
  """Multiply-accumulates of one forward pass over one clip (convolutions and dense layers)."""
  widths = cfg.widths(res)
  three_d = cfg.kind == '3d'
  k = 27 if three_d else 9
  t = frames if three_d else 1
  per = frames // t  # separate 2-D passes per clip
  size = res
  macs = t * size * size * 3 * widths[0]
  for cin, cout in zip(widths[:-1], widths[1:]):
    macs += t * size * size * k * cin * (cin + cout)  # the two 3x3 convolutions at full size
    t = (t + 1) // 2 if three_d and t > 1 else t
    size //= 2
    macs += t * size * size * cin * cout  # the 1x1 skip after the blur-pool
  macs += t * 16 * k * widths[-1] ** 2 + t * 16 * widths[-1] ** 2 + widths[-1]
  return int(macs * per)
