"""Moving handwritten digits: small, labelled, real-handwriting videos.

Each video shows one scikit-learn handwritten digit (8x8 scans of real
handwriting, 1797 images, classes 0..9) upscaled to about a third of the
canvas, moving with a random constant velocity and bouncing off the canvas
edges: white on black, 3 identical channels. The label is the digit class.

Everything is a pure function of (split, index, seed), so a data set can be
regenerated bit-for-bit. Train and test draw from disjoint digit images
(fixed random partition of the 1797 scans), so test videos show handwriting
the model never saw.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NUM_CLASSES = 10
# Fraction of the digit scans reserved for the test split.
TEST_IMAGE_FRACTION = 0.2
_SPLIT_IDS = {'train': 0, 'test': 1}
# The generation seed of the stored data set (builders.MovingDigitsConfig.seed).
DEFAULT_SEED = 0


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """All sklearn digits: images uint8 (N, 8, 8) in [0, 255], labels int (N,)."""
  from sklearn.datasets import load_digits  # local: sklearn is slow to import

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def split_image_indices(num_images: int, split: str) -> np.ndarray:
  """Indices of the digit scans usable by `split` (train/test are disjoint)."""
  # Fixed seed: the partition must not depend on the video-generation seed,
  # otherwise two data sets with different seeds could leak test digits.
  order = np.random.default_rng(1234).permutation(num_images)
  n_test = int(round(num_images * TEST_IMAGE_FRACTION))
  chosen = order[:n_test] if split == 'test' else order[n_test:]
  return np.sort(chosen)


def render_moving_digit(
    digit: np.ndarray, num_frames: int, canvas: int, rng: np.random.Generator
) -> np.ndarray:
  """One bouncing-digit video.

  Args:
    digit: uint8 (h, w) grayscale glyph, white on black.
    num_frames: T.
    canvas: output height = width.
    rng: source of the start position and velocity.

  Returns:
    np.uint8 (T, canvas, canvas, 3).
  """
  size = max(2, round(canvas / 3))
  glyph = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))
  limit = canvas - size  # top-left coordinate range [0, limit]
  pos = rng.uniform(0, limit, size=2)
  # Speed between canvas/32 and canvas/16 pixels per frame (2..4 px at 64):
  # clearly visible motion that still stays trackable between frames.
  angle = rng.uniform(0, 2 * np.pi)
  speed = rng.uniform(canvas / 32, canvas / 16)
  vel = speed * np.array([np.sin(angle), np.cos(angle)])
  video = np.zeros((num_frames, canvas, canvas), np.uint8)
  for t in range(num_frames):
    y, x = np.round(pos).astype(int)
    video[t, y : y + size, x : x + size] = glyph
    pos = pos + vel
    # Bounce: reflect the position back inside [0, limit] and flip velocity.
    for axis in range(2):
      if pos[axis] < 0:
        pos[axis], vel[axis] = -pos[axis], -vel[axis]
      elif pos[axis] > limit:
        pos[axis], vel[axis] = 2 * limit - pos[axis], -vel[axis]
  return np.repeat(video[..., None], 3, axis=-1)


def moving_digit_videos(split: str, num_videos: int, num_frames: int, canvas: int, seed: int):
  """Yields (index, video uint8 (T, canvas, canvas, 3), label int, image_index).

  Deterministic: video i of a split depends only on (seed, split, i).
  """
  images, labels = digit_images()
  pool = split_image_indices(len(images), split)
  for i in range(num_videos):
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
    image_index = int(pool[rng.integers(len(pool))])
    video = render_moving_digit(images[image_index], num_frames, canvas, rng)
    yield i, video, int(labels[image_index]), image_index
