"""Frechet distances between feature distributions (FVD with I3D, FID with Inception), computed in
float64.

    FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

`tr((S_1 S_2)^(1/2))` is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
`S_1^(1/2) S_2 S_1^(1/2)` (similar to S_1 S_2), so it is computed with two symmetric eigen-
decompositions instead of a general matrix square root; tests check it against scipy's `sqrtm`.

Statistics are accumulated in float64 over batches (`FeatureStatistics`), so the features of a
split never have to be held at once, and can be saved to / loaded from an .npz file (the real-data
statistics of a protocol are computed once and cached next to the dataset).

FVD's protocol here (`fvd_features`): clips in [-1, 1] are resized to 224 x 224 (bilinear, jax.image
.resize) and, when shorter than the `min_frames` I3D needs, lengthened by repeating every frame
(nearest neighbour in time) to at least that length; the features are I3D's 400 Kinetics logits.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from vitok.evals import i3d

__all__ = ['frechet_distance', 'FeatureStatistics', 'fvd_features', 'fvd_frames']


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class FeatureStatistics:
  """Running mean and covariance (float64, unbiased like numpy.cov) of feature vectors."""

  def __init__(self, dim: int):
    self.count = 0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, features, mask=None) -> None:
    """Adds the rows of `features` (N, dim) whose `mask` is true (default: all)."""
    features = np.asarray(features, np.float64)
    if mask is not None:
      features = features[np.asarray(mask, bool)]
    self.count += features.shape[0]
    self.sum += features.sum(axis=0)
    self.outer += features.T @ features

  @property
  def mean(self) -> np.ndarray:
    return self.sum / self.count

  @property
  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f'a covariance needs at least 2 feature vectors, got {self.count}')
    mean = self.mean
    return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def distance(self, other: 'FeatureStatistics') -> float:
    return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)

  def save(self, path: str) -> None:
    """Writes the statistics atomically to `path` (.npz)."""
    tmp = f'{path}.tmp-{os.getpid()}.npz'
    np.savez(tmp, count=self.count, sum=self.sum, outer=self.outer)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> 'FeatureStatistics':
    with np.load(path, allow_pickle=False) as data:
      stats = cls(data['sum'].shape[0])
      stats.count, stats.sum, stats.outer = int(data['count']), data['sum'], data['outer']
    return stats


def fvd_frames(frames: int) -> int:
  """The clip length I3D sees for clips of `frames` frames: `frames` repeated an integer number of
  times, enough for I3D's temporal strides."""
  return frames * math.ceil(i3d.MIN_FRAMES / frames)


@jax.jit
def fvd_features(weights, video: jax.Array) -> jax.Array:
  """(B, T, H, W, 3) clips in [-1, 1] -> (B, 400) I3D features by the protocol above."""
  b, t, h, w, c = video.shape
  repeat = fvd_frames(t) // t
  if repeat > 1:
    video = jnp.repeat(video, repeat, axis=1)
  video = jax.image.resize(
      video.astype(jnp.float32), (b, video.shape[1], i3d.INPUT_SIZE, i3d.INPUT_SIZE, c), 'bilinear'
  )
  return i3d.logits(weights, jnp.clip(video, -1.0, 1.0))
