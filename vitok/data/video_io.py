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


def iter_frames(path, short_side: int | None = None):
  """The frames of the first video stream of `path`, one uint8 (H, W, 3) array at a time (for
  videos too long to hold whole), each resized as `read_video` does when `short_side` is given.
  Raises VideoDecodeError as `read_video` does."""
  count = 0
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoDecodeError(path, 'no video stream')
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      for frame in container.decode(stream):
        count += 1
        if short_side is None:
          yield frame.to_ndarray(format='rgb24')
        else:
          yield _resize(frame.to_image(), short_side)
  except VideoDecodeError:
    raise
  except (av.FFmpegError, OSError, ValueError, EOFError) as e:
    raise VideoDecodeError(path, f'{type(e).__name__}: {e}') from e
  if not count:
    raise VideoDecodeError(path, 'no frames decoded')


def probe(path) -> tuple[int, int, int, float]:
  """(frames, height, width, frames per second) of the first video stream of `path`, the frames
  counted by decoding (container headers are often wrong or absent)."""
  frames, height, width = 0, 0, 0
  for frame in iter_frames(path):
    frames, (height, width) = frames + 1, frame.shape[:2]
  with av.open(str(path)) as container:
    rate = container.streams.video[0].average_rate
  return frames, height, width, float(rate) if rate else 8.0


class Mp4Writer:
  """Writes uint8 (H, W, 3) frames one at a time as an H.264 mp4 (libx264).

  Even sizes use yuv420p, what browsers and players expect. Odd sizes, which yuv420p cannot hold,
  are padded with one black row / column at the bottom / right, or, with `exact_size=True`,
  written in yuv444p at exactly their size (players other than browsers show it).
  `crf` is x264's quality knob (0 lossless .. 51 worst; 18 ~ visually clean). Lossy encodes are
  not reproducible bit for bit (x264's decisions vary between writes of the same frames);
  lossless ones decode to the same pixels every time."""

  def __init__(self, path, fps: float = 8, crf: int = 18, exact_size: bool = False):
    self.path, self.fps, self.crf, self.exact_size = str(path), fps, crf, exact_size
    self._container = self._stream = None
    self._pad = (0, 0)

  def write(self, frame: np.ndarray) -> None:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
      raise ValueError(
          f'Mp4Writer expects uint8 frames of shape (H, W, 3), got {frame.dtype} {frame.shape}'
      )
    if self._stream is None:
      self._open(*frame.shape[:2])
    if any(self._pad):
      frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)))
    self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))

  def _open(self, height: int, width: int) -> None:
    odd = bool(height % 2 or width % 2)
    if not self.exact_size:
      self._pad = (height % 2, width % 2)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._container = av.open(self.path, mode='w')
    stream = self._container.add_stream('libx264', rate=Fraction(self.fps).limit_denominator())
    stream.width, stream.height = width + self._pad[1], height + self._pad[0]
    stream.pix_fmt = 'yuv444p' if odd and self.exact_size else 'yuv420p'
    stream.options = {'crf': str(self.crf)}
    self._stream = stream

  def close(self) -> None:
    if self._container is not None:
      self._container.mux(self._stream.encode())  # flush the encoder's buffered frames
      self._container.close()
      self._container = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_mp4(path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
  """Writes (T, H, W, 3) uint8 frames as an H.264 (libx264, yuv420p) mp4 (see Mp4Writer; odd
  sizes are padded by one black row / column)."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
        'write_mp4 expects uint8 frames of shape (T, H, W, 3), '
        f'got {frames.dtype} {frames.shape}'
    )
  with Mp4Writer(path, fps, crf) as writer:
    for frame in frames:
      writer.write(frame)


def write_png(path, image: np.ndarray) -> None:
  """Writes an (H, W, 3) uint8 RGB image as PNG."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f'write_png expects a uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}'
    )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path, format='PNG')
