r"""Reconstruct a video of any length and size with a trained tokenizer, in overlapping tiles of the
size it was trained on (vitok/tokenizer/tiling.py), and measure the seams.

    python -m launch.reconstruct --tokenizer=/tmp/vitok-demo --video=in.mp4 --out=out.mp4
    python -m launch.reconstruct --tokenizer=DIR --video=in.mp4 --out=out.mp4 --overlap_frames=0

--tokenizer is an export of `launch.export` or a tokenizer training workdir. The output has exactly
the input's frame count and size (after --short_side, when given). Frames stream through: memory
depends on the tile and frame size, not on the number of frames.

The last line printed is JSON: PSNR (of the mean squared error over the frames it covers), SSIM
and LPIPS (VGG16) over every frame, and the same restricted to the frames at temporal tile
boundaries (the frames two tiles share; without overlap, the last frame of a tile and the first
of the next) and to the interior frames; the temporal flicker, the mean absolute error of the
frame-to-frame differences (in [0, 1] pixel units), across boundaries and inside tiles; wall time
and peak resident memory.
"""

import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from launch import common
from vitok.data import pixels, video_io
from vitok.evals import lpips as lpips_lib
from vitok.evals import metrics
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import tiling

_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer export or training workdir.')
_VIDEO = flags.DEFINE_string('video', None, 'Input video (any file PyAV reads), any length.')
_OUT = flags.DEFINE_string('out', None, 'Output mp4, at exactly the input size.')
_OVERLAP_FRAMES = flags.DEFINE_integer(
    'overlap_frames', -1, 'Frames neighbouring tiles share (-1: a quarter of the tile).'
)
_OVERLAP_PIXELS = flags.DEFINE_integer(
    'overlap_pixels', -1, 'Pixels neighbouring tiles share (-1: a quarter of the tile).'
)
_SHORT_SIDE = flags.DEFINE_integer(
    'short_side', 0, 'Resize frames so the shorter side has this many pixels (0: as they are).'
)
_LPIPS = flags.DEFINE_bool('lpips', True, 'Also measure LPIPS (VGG16) per frame.')


def make_codec(frozen: frozen_tokenizer.FrozenTokenizer):
  """Tiles uint8 (n, F, R, R, 3) -> reconstructions float32 in about [-1, 1], through the
  posterior mean. Compiled once: every batch of a video has the same shape."""

  @jax.jit
  def code(params, tiles):
    model = nnx.merge(frozen.graphdef, params)
    return model.decode(model.encode(pixels.to_unit_range(tiles)))

  return lambda tiles: np.asarray(code(frozen.params, tiles))


@jax.jit
def _frame_errors(real, recon):
  """Per frame of (n, H, W, 3) in [-1, 1]: the mean squared error in [0, 1] units."""
  return jnp.mean(jnp.square((real - recon) / 2), axis=(1, 2, 3))


class FrameMetrics:
  """Per-frame squared error, SSIM, LPIPS and flicker, computed in chunks of one shape."""

  def __init__(self, height: int, width: int, with_lpips: bool, chunk: int = 8):
    self.chunk = chunk
    self.with_ssim = min(height, width) >= metrics.SSIM_FILTER_SIZE
    self.lpips_params = None
    if with_lpips and min(height, width) >= lpips_lib.MIN_LPIPS_SIZE['vgg16']:
      self.lpips_params = lpips_lib.load_lpips_params('vgg16')
    self.pending, self.rows = [], []
    self.previous = None  # the last (real, reconstructed) frames, for the flicker

  def add(self, real: np.ndarray, recon: np.ndarray) -> None:
    """real uint8 (H, W, 3); recon float32 in about [-1, 1]."""
    real = real.astype(np.float32) / 127.5 - 1
    recon = np.clip(recon, -1, 1)
    flicker = np.nan
    if self.previous is not None:
      real_change, recon_change = real - self.previous[0], recon - self.previous[1]
      flicker = float(np.abs(recon_change - real_change).mean() / 2)
    self.previous = (real, recon)
    self.pending.append((real, recon, flicker))
    if len(self.pending) == self.chunk:
      self._flush()

  def _flush(self) -> None:
    count = len(self.pending)
    if not count:
      return
    real = np.stack([p[0] for p in self.pending])
    recon = np.stack([p[1] for p in self.pending])
    if count < self.chunk:  # pad the last chunk: one shape, one compile
      pad = ((0, self.chunk - count), (0, 0), (0, 0), (0, 0))
      real, recon = np.pad(real, pad), np.pad(recon, pad)
    unknown = np.full(self.chunk, np.nan)
    squared = np.asarray(_frame_errors(real, recon))
    ssim = np.asarray(metrics.ssim(real[:, None], recon[:, None])) if self.with_ssim else unknown
    lp = unknown
    if self.lpips_params is not None:
      lp = np.asarray(lpips_lib.lpips(self.lpips_params, real, recon))
    for i in range(count):
      self.rows.append((squared[i], ssim[i], lp[i], self.pending[i][2]))
    self.pending = []

  def summary(self, boundary: np.ndarray) -> dict:
    """Every figure over all frames, boundary frames and interior frames (see the module doc)."""
    self._flush()
    squared, ssim, lp, flicker = map(np.asarray, zip(*self.rows))
    has_previous = np.arange(len(boundary)) > 0
    crossing = boundary | np.roll(boundary, 1)  # the change t-1 -> t touches a boundary frame
    result = {}
    for suffix, frames, changes in (
        ('', np.ones_like(boundary), has_previous),
        ('_boundary', boundary, crossing & has_previous),
        ('_interior', ~boundary, ~crossing & has_previous),
    ):
      if not frames.any():
        continue
      result[f'psnr{suffix}'] = float(-10 * np.log10(max(squared[frames].mean(), 1e-20)))
      if self.with_ssim:
        result[f'ssim{suffix}'] = float(ssim[frames].mean())
      if self.lpips_params is not None:
        result[f'lpips{suffix}'] = float(lp[frames].mean())
      if changes.any():
        result[f'flicker{suffix}'] = float(flicker[changes].mean())
    return result


def _overlap(flag, size: int) -> int:
  return size // 4 if flag.value < 0 else flag.value


def main(argv):
  del argv
  common.quiet_library_logs()
  started = time.perf_counter()
  short_side = _SHORT_SIDE.value or None
  try:
    T, H, W, fps = video_io.probe(_VIDEO.value)
  except video_io.VideoDecodeError as e:
    common.fail(f'bad flag --video: {e}')
  if short_side:
    H, W = video_io.resized_size(H, W, short_side)
  frozen = frozen_tokenizer.open_tokenizer(_TOKENIZER.value)
  F, R = int(frozen.config.data.frames), int(frozen.config.data.res)
  overlap = (_overlap(_OVERLAP_FRAMES, F), _overlap(_OVERLAP_PIXELS, R))
  try:
    plan = tiling.TilePlan.make((T, H, W), (F, R, R), (overlap[0], overlap[1], overlap[1]))
  except ValueError as e:
    common.fail(f'bad flag --overlap_frames / --overlap_pixels: {e}')
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  codec = make_codec(frozen)
  measure = FrameMetrics(H, W, _LPIPS.value)
  real_frames = video_io.iter_frames(_VIDEO.value, short_side)
  recon_frames = tiling.reconstruct_frames(
      plan, video_io.iter_frames(_VIDEO.value, short_side), codec
  )
  with video_io.Mp4Writer(_OUT.value, fps=fps, exact_size=True) as writer:
    for real, recon in zip(real_frames, recon_frames):
      writer.write(np.asarray(pixels.to_uint8(recon)))
      measure.add(real, recon)
  boundary = plan.boundary_frames()
  result = {
      'video': _VIDEO.value,
      'out': _OUT.value,
      'tokenizer': frozen.source,
      'frames': T,
      'height': H,
      'width': W,
      'tile': list(plan.tile),
      'overlap': list(plan.overlap),
      'tiles': plan.num_tiles,
      'boundary_frames': int(boundary.sum()),
      **measure.summary(boundary),
      'seconds': round(time.perf_counter() - started, 2),
      'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }
  print(f'wrote {_OUT.value}')
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['tokenizer', 'video', 'out'])
  common.run(main)
