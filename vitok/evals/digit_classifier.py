"""An independent judge of moving-digit clips: which digit does a clip show?

Class-conditional generation is measured by asking a classifier that never saw a generated or
reconstructed clip. This one is trained on real frames of the moving-digits train split only
(`vitok/data/moving_digits.py`: the same generator and seed as the tfds data set), so its accuracy
on real held-out clips is the ceiling any generator can be compared with.

Each frame is reduced to the digit itself: a window of the glyph's size (a third of the canvas)
centred on the intensity-weighted centre of the bright pixels, resized to 16 x 16. A support-vector
classifier (scikit-learn, RBF kernel) scores every frame; a clip's class is the one with the highest
mean score over its frames. On 8 x 64 x 64 clips it recognises 98% of the real test clips.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from vitok.data import moving_digits

CROP = 16  # side of the resized digit window, pixels
THRESHOLD = 0.25  # brightness (in [0, 1]) below which a pixel does not pull the window


def _grey(videos: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) -> float32 frames (N, H, W) in [0, 1] (the digits are white on black)."""
  frames = np.asarray(videos).astype(np.float32).mean(axis=-1) / 255.0
  return frames.reshape(-1, *frames.shape[-2:])


def _centres(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The intensity-weighted centre (y, x) of the bright pixels of each grey frame (N, H, W)."""
  weight = np.clip(frames - THRESHOLD, 0.0, None)
  mass = weight.sum(axis=(1, 2)) + 1e-6
  grid_y = np.arange(frames.shape[1], dtype=np.float32)
  grid_x = np.arange(frames.shape[2], dtype=np.float32)
  y = (weight.sum(axis=2) * grid_y).sum(axis=1) / mass
  x = (weight.sum(axis=1) * grid_x).sum(axis=1) / mass
  return y, x


def centroids(videos: np.ndarray) -> np.ndarray:
  """uint8 clips (N, T, H, W, 3) -> (N, T, 2): each frame's digit position, the intensity-weighted
  centre (y, x) of its bright pixels, in pixels."""
  videos = np.asarray(videos)
  y, x = _centres(_grey(videos))
  return np.stack([y, x], axis=-1).reshape(*videos.shape[:2], 2)


def digit_windows(videos: np.ndarray) -> np.ndarray:
  """uint8 clips (N, T, H, W, 3) -> float32 (N * T, CROP * CROP): per frame, the glyph-sized
  window around the bright pixels' centre, resized to CROP x CROP, in [0, 1]."""
  frames = _grey(videos)
  side = frames.shape[-1]
  window = max(2, round(side / 3))
  centre_y, centre_x = _centres(frames)
  top = np.clip(np.round(centre_y - window / 2), 0, side - window).astype(int)
  left = np.clip(np.round(centre_x - window / 2), 0, side - window).astype(int)
  out = np.empty((len(frames), CROP * CROP), np.float32)
  for i, (frame, y, x) in enumerate(zip(frames, top, left)):
    crop = Image.fromarray(frame[y : y + window, x : x + window])
    out[i] = np.asarray(crop.resize((CROP, CROP), Image.Resampling.BILINEAR)).ravel()
  return out


def real_clips(split: str, count: int, frames: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` clips of a moving-digits split (uint8 (N, T, H, W, 3)) and their labels,
  exactly as the tfds data set stores them (default generation seed)."""
  seed = moving_digits.DEFAULT_SEED
  clips, labels = [], []
  for _, video, label, _ in moving_digits.moving_digit_videos(split, count, frames, canvas, seed):
    clips.append(video)
    labels.append(label)
  return np.stack(clips), np.asarray(labels, np.int32)


class DigitClassifier:
  """A frame classifier of moving digits trained on `num_train` real train-split clips."""

  def __init__(self, frames: int, canvas: int, num_train: int = 1000):
    from sklearn.svm import SVC  # local: scikit-learn is slow to import

    clips, labels = real_clips('train', num_train, frames, canvas)
    self.frames, self.canvas = frames, canvas
    self._svc = SVC(kernel='rbf', C=10.0, decision_function_shape='ovr')
    self._svc.fit(digit_windows(clips), np.repeat(labels, frames))

  def scores(self, videos: np.ndarray) -> np.ndarray:
    """uint8 clips (N, T, H, W, 3) -> (N, 10) per-class scores, the mean over frames."""
    videos = np.asarray(videos)
    per_frame = self._svc.decision_function(digit_windows(videos))
    return per_frame.reshape(len(videos), -1, moving_digits.NUM_CLASSES).mean(axis=1)

  def frame_predictions(self, videos: np.ndarray) -> np.ndarray:
    """uint8 clips (N, T, H, W, 3) -> (N, T): the class of every frame on its own."""
    videos = np.asarray(videos)
    return self._svc.predict(digit_windows(videos)).reshape(videos.shape[:2])

  def predict(self, videos: np.ndarray) -> np.ndarray:
    return np.argmax(self.scores(videos), axis=1)

  def accuracy(self, videos: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(self.predict(videos) == np.asarray(labels)))


@functools.lru_cache(maxsize=2)
def trained(frames: int, canvas: int) -> DigitClassifier:
  """The classifier for clips of `frames` x `canvas` x `canvas`, trained once per process (~5 s)."""
  return DigitClassifier(frames, canvas)
