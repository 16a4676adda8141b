"""Reading and writing videos and images as uint8 numpy arrays.

Every array here is channels-last RGB `np.uint8`:
  * a video is (T, H, W, 3),
  * an image is (H, W, 3), or (1, H, W, 3) when read as a one-frame video.

Decoding uses PyAV (FFmpeg bundled in the wheel, so no system ffmpeg is
needed); resizing uses PIL. scikit-video's own reader (`skvideo.io`) is never
used: it shells out to an ffmpeg binary that is usually absent.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class VideoDecodeError(Exception):
  """A video or image file could not be decoded.

  Attributes:
    path: the file that failed.
    reason: a short human-readable cause (kept separately so the dataset
      builders can record it in the dataset metadata).
  """

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f'Cannot decode {self.path}: {reason}')


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(new_height, new_width) with the shorter side == short_side, aspect kept."""
  scale = short_side / min(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(image: Image.Image, short_side: int | None) -> np.ndarray:
  """PIL image -> (H, W, 3) uint8, shorter side resized to `short_side`."""
  if short_side is not None and min(image.height, image.width) != short_side:
    new_h, new_w = resized_size(image.height, image.width, short_side)
    # PIL's BILINEAR widens its kernel when shrinking, so downscaling averages
    # over the source pixels (area-like) instead of aliasing.
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  return np.asarray(image.convert('RGB'), dtype=np.uint8)


def read_video(path, max_frames: int | None = None, short_side: int | None = None) -> np.ndarray:
  """Decodes the first video stream of `path`.

  Args:
    path: any container FFmpeg reads (mp4, avi, mov, mkv, webm, ...).
    max_frames: stop after this many frames (None: the whole video).
    short_side: if given, every frame is resized (PIL bilinear, aspect kept)
      so that its shorter side equals this many pixels.

  Returns:
    np.uint8 array (T, H, W, 3), RGB.

  Raises:
    VideoDecodeError: the file is missing, not a video, corrupt, or yields no
      frame at all.
  """
  frames = []
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoDecodeError(path, 'no video stream')
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'  # frame-parallel decoding: much faster
      for frame in container.decode(stream):
        frames.append(_resize(frame.to_image(), short_side))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except VideoDecodeError:
    raise
  except (av.FFmpegError, OSError, ValueError, EOFError) as e:
    # FFmpeg errors (InvalidDataError, ...) subclass ValueError/OSError; a
    # truncated file can also surface as EOFError. All mean "unreadable".
    raise VideoDecodeError(path, f'{type(e).__name__}: {e}') from e
  if not frames:
    raise VideoDecodeError(path, 'no frames decoded')
  return np.stack(frames)


def read_image(path, short_side: int | None = None) -> np.ndarray:
  """Reads an image file as a one-frame video: np.uint8 (1, H, W, 3), RGB.

  Grayscale / palette / RGBA images are converted to RGB (alpha dropped).
  Raises VideoDecodeError if PIL cannot read the file.
  """
  try:
    with Image.open(path) as image:
      image.load()  # PIL is lazy: force the decode inside the try
      return _resize(image.convert('RGB'), short_side)[None]
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise VideoDecodeError(path, f'{type(e).__name__}: {e}') from e


def write_mp4(path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
  """Writes (T, H, W, 3) uint8 frames as an H.264 (libx264, yuv420p) mp4.

  yuv420p (what browsers and players expect) needs even sizes, so odd heights
  or widths are padded with one black row/column at the bottom/right.
  `crf` is x264's quality knob (0 lossless .. 51 worst; 18 ~ visually clean). Lossy encodes
  are not reproducible bit for bit (x264's decisions vary between writes of the same frames);
  lossless ones decode to the same pixels every time.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
        'write_mp4 expects uint8 frames of shape (T, H, W, 3), '
        f'got {frames.dtype} {frames.shape}'
    )
  _, height, width, _ = frames.shape
  pad_h, pad_w = height % 2, width % 2
  if pad_h or pad_w:
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=Fraction(fps).limit_denominator())
    stream.width, stream.height = width + pad_w, height + pad_h
    stream.pix_fmt = 'yuv420p'
    stream.options = {'crf': str(crf)}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode())  # flush the encoder's buffered frames


def write_png(path, image: np.ndarray) -> None:
  """Writes an (H, W, 3) uint8 RGB image as PNG."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f'write_png expects a uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}'
    )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path, format='PNG')
