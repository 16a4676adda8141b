"""Reconstruction metrics (PSNR, SSIM), the trivial-codec honesty baseline, and split averaging.

Conventions:

* videos are (B, T, H, W, 3) float arrays in [-1, 1]; images are T = 1;
* metrics are returned per clip, shape (B,), float32;
* PSNR / SSIM follow the usual image convention: both clips are clipped to [-1, 1] (a
  no-op for the target, it removes out-of-range reconstruction values the decoder may
  produce) and rescaled to [0, 1], i.e. data range 1. Equivalently, on [-1, 1] data
  ``PSNR = 10 * log10(4 / MSE)`` (data range 2).
* per-clip PSNR is the PSNR of the clip's *whole* MSE (all frames and pixels pooled), not the
  mean of per-frame PSNRs (which over-weights easy frames). Identical clips give +inf.
* per-clip SSIM is the mean of per-frame SSIM (dm-pix defaults: 11x11 Gaussian window,
  sigma 1.5, k1 = 0.01, k2 = 0.03, averaged over RGB channels), so frames need H, W >= 11.

The trivial codec (:func:`pool_and_resize` at a pair from :func:`baseline_factors`, the split's
pair chosen by :func:`best_baseline_pair`) answers "is the tokenizer better than just
storing a down-sampled clip with the same number of floats?": it average-pools the clip by
``st`` in time and ``s`` in space and linearly interpolates back. A learned tokenizer whose
latent has ``budget_floats`` floats per clip should beat it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "psnr",
    "ssim",
    "pool_and_resize",
    "baseline_factors",
    "baseline_floats",
    "best_baseline_pair",
    "MetricAccumulator",
]

SSIM_FILTER_SIZE = 11


def _check_videos(x: jax.Array, y: jax.Array) -> None:
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 5 or x.shape[-1] != 3:
    raise ValueError(f"expected (B, T, H, W, 3) videos, got shape {x.shape}")


def _to_unit(v: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1] float32, clipping out-of-range values first."""
  return (jnp.clip(v.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5


@jax.jit
def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-clip PSNR in dB.

  Args:
    x, y: (B, T, H, W, 3) videos in [-1, 1] (target and reconstruction, symmetric).

  Returns:
    (B,) float32 ``-10 log10(MSE)`` of the [0, 1]-rescaled clips, MSE over all frames,
    pixels and channels of a clip (+inf for identical clips).
  """
  _check_videos(x, y)
  b, t, h, w, c = x.shape
  # dm_pix.psnr averages over the last three axes: stacking the frames along H makes that
  # the MSE of the whole clip.
  return dm_pix.psnr(_to_unit(x).reshape(b, t * h, w, c), _to_unit(y).reshape(b, t * h, w, c))


@jax.jit
def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-clip SSIM: mean over frames of dm-pix SSIM (data range 1, after [-1,1] -> [0,1]).

  Args:
    x, y: (B, T, H, W, 3) videos in [-1, 1], H, W >= 11.

  Returns:
    (B,) float32, 1 for identical clips, < 1 otherwise.
  """
  _check_videos(x, y)
  b, t, h, w, c = x.shape
  if min(h, w) < SSIM_FILTER_SIZE:
    raise ValueError(f"SSIM needs H, W >= {SSIM_FILTER_SIZE}, got {h}x{w}")
  per_frame = dm_pix.ssim(
      _to_unit(x).reshape(b * t, h, w, c),
      _to_unit(y).reshape(b * t, h, w, c),
      max_val=1.0,
      filter_size=SSIM_FILTER_SIZE,
  )
  return per_frame.reshape(b, t).mean(axis=1)


# --------------------------------------------------------------------------------------
# Trivial codec baseline.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("st", "s"))
def pool_and_resize(video: jax.Array, st: int, s: int) -> jax.Array:
  """Average-pools by ``st`` in time and ``s`` in H and W, then resizes back (trilinear).

  Args:
    video: (B, T, H, W, C) float array; ``st`` must divide T and ``s`` divide H and W.
    st, s: static integer pooling factors >= 1.

  Returns:
    (B, T, H, W, C) reconstruction, same dtype as ``video``. The pooled tensor holds
    (T/st) * (H/s) * (W/s) * C floats per clip: that is what the "codec" stores.
  """
  b, t, h, w, c = video.shape
  if st < 1 or s < 1 or t % st or h % s or w % s:
    raise ValueError(f"factors (st={st}, s={s}) must be >= 1 and divide T={t}, H={h}, W={w}")
  if st == 1 and s == 1:
    return video  # nothing stored away: exact.
  pooled = video.astype(jnp.float32).reshape(b, t // st, st, h // s, s, w // s, s, c)
  pooled = pooled.mean(axis=(2, 4, 6))
  # 'linear' on a 5-D array interpolates every axis whose size changes (here T, H, W:
  # trilinear, half-pixel centres, edges clamped); B and C keep their size -> untouched.
  # No antialiasing issue: this is pure up-sampling.
  recon = jax.image.resize(pooled, (b, t, h, w, c), method="linear")
  return recon.astype(video.dtype)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def baseline_floats(T: int, H: int, W: int, st: int, s: int, channels: int = 3) -> int:
  """Floats stored per clip by the trivial codec with factors (st, s)."""
  return (T // st) * (H // s) * (W // s) * channels


def baseline_factors(T: int, H: int, W: int, budget_floats: int) -> list[tuple[int, int]]:
  """All admissible (st, s) pairs for a per-clip float budget.

  ``st`` ranges over divisors of T, ``s`` over divisors of gcd(H, W) (same factor for H
  and W), keeping those with ``(T/st) * (H/s) * (W/s) * 3 <= budget_floats``.

  Args:
    T, H, W: clip shape.
    budget_floats: floats per clip the codec may store (e.g. a tokenizer's
      ``num_tokens * latent_dim``).

  Returns:
    Non-empty list of (st, s), sorted by decreasing float count (most detailed first).

  Raises:
    ValueError: if even the coarsest pair (st = T, s = gcd(H, W)) exceeds the budget.
  """
  g = math.gcd(H, W)
  pairs = [
      (st, s)
      for st in _divisors(T)
      for s in _divisors(g)
      if baseline_floats(T, H, W, st, s) <= budget_floats
  ]
  if not pairs:
    smallest = baseline_floats(T, H, W, T, g)
    raise ValueError(
        f"no trivial-codec factors fit budget_floats={budget_floats} for a "
        f"{T}x{H}x{W}x3 clip: the coarsest pooling (st={T}, s={g}) needs {smallest} floats"
    )
  pairs.sort(key=lambda p: (-baseline_floats(T, H, W, *p), p))
  return pairs


def best_baseline_pair(
    mean_psnr: Mapping[tuple[int, int], float], T: int, H: int, W: int
) -> tuple[int, int]:
  """The (st, s) pair the baseline codec uses for a split: the highest split-mean PSNR, ties
  going to fewer floats. `mean_psnr` maps every admissible pair (see :func:`baseline_factors`)
  to its split-mean PSNR; one pair serves the whole split."""
  return max(mean_psnr, key=lambda p: (mean_psnr[p], -baseline_floats(T, H, W, *p)))


# --------------------------------------------------------------------------------------
# Averaging over a split with padded batches.
# --------------------------------------------------------------------------------------


class MetricAccumulator:
  """Accumulates masked per-clip metrics over batches (host side, float64 sums).

  >>> acc = MetricAccumulator()
  >>> acc.update({"psnr": psnr_b, "ssim": ssim_b}, mask)   # each (B,), mask (B,) bool
  >>> acc.result()                                         # {"psnr": mean, "ssim": mean}
  """

  def __init__(self) -> None:
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def update(self, metrics: Mapping[str, jax.Array], mask: jax.Array | None = None) -> None:
    """Adds a batch. ``mask`` (B,) bool marks real clips; ``None`` means all real."""
    for name, values in metrics.items():
      v = np.asarray(values, dtype=np.float64).reshape(-1)
      m = np.ones(v.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
      if v.shape != m.shape:
        raise ValueError(f"{name}: values {v.shape} and mask {m.shape} differ")
      self._sums[name] = self._sums.get(name, 0.0) + float(np.where(m, v, 0.0).sum())
      self._counts[name] = self._counts.get(name, 0) + int(m.sum())

  def result(self) -> dict[str, float]:
    """{name: mean over all real clips seen} (NaN for a name with no real clip)."""
    return {
        k: (self._sums[k] / self._counts[k] if self._counts[k] else float("nan"))
        for k in self._sums
    }

  def count(self, name: str) -> int:
    """Number of real clips accumulated for ``name``."""
    return self._counts.get(name, 0)
