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

The trivial codec (:func:`baseline_codec`) answers "is the tokenizer better than just
storing a down-sampled clip with the same number of floats?": it average-pools the clip by
``st`` in time and ``s`` in space and linearly interpolates back. A learned tokenizer whose
latent has ``budget_floats`` floats per clip should beat it.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "psnr", "ssim", "pool_and_resize", "baseline_factors", "baseline_floats",
    "baseline_psnr_per_pair", "baseline_codec", "baseline_psnr", "masked_mean",
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
    per_frame = dm_pix.ssim(_to_unit(x).reshape(b * t, h, w, c),
                            _to_unit(y).reshape(b * t, h, w, c),
                            max_val=1.0, filter_size=SSIM_FILTER_SIZE)
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


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def baseline_floats(T: int, H: int, W: int, st: int, s: int, channels: int = 3) -> int:
    """Floats stored per clip by the trivial codec with factors (st, s)."""
    return (T // st) * (H // s) * (W // s) * channels


def baseline_factors(T: int, H: int, W: int, budget_floats: int) -> List[Tuple[int, int]]:
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
    pairs = [(st, s) for st in _divisors(T) for s in _divisors(g)
             if baseline_floats(T, H, W, st, s) <= budget_floats]
    if not pairs:
        smallest = baseline_floats(T, H, W, T, g)
        raise ValueError(
            f"no trivial-codec factors fit budget_floats={budget_floats} for a "
            f"{T}x{H}x{W}x3 clip: the coarsest pooling (st={T}, s={g}) needs {smallest} floats")
    pairs.sort(key=lambda p: (-baseline_floats(T, H, W, *p), p))
    return pairs


def baseline_psnr_per_pair(video: jax.Array, factors: Iterable[Tuple[int, int]]
                           ) -> Dict[Tuple[int, int], jax.Array]:
    """Per-clip PSNR of the trivial codec for each (st, s) pair.

    For the evaluator: accumulate these over a split (with the padding mask), then report the
    pair with the highest split-mean PSNR, so a single pair is used for the whole split.

    Args:
      video: (B, T, H, W, 3) in [-1, 1].
      factors: (st, s) pairs, typically ``baseline_factors(T, H, W, budget)``.

    Returns:
      {(st, s): (B,) float32 PSNR}.
    """
    return {(st, s): psnr(video, pool_and_resize(video, st, s)) for st, s in factors}


def baseline_codec(video: jax.Array, budget_floats: int) -> Tuple[jax.Array, dict]:
    """Best trivial-codec reconstruction of a batch within a per-clip float budget.

    Tries every admissible (st, s) (see :func:`baseline_factors`) and keeps the one with
    the highest batch-mean PSNR (ties: fewer floats). The choice is per batch; for a
    split-level number use :func:`baseline_psnr_per_pair` and pick one pair for the split.

    Args:
      video: (B, T, H, W, 3) float video in [-1, 1].
      budget_floats: max floats stored per clip; never exceeded.

    Returns:
      (reconstruction (B, T, H, W, 3) same dtype as ``video``,
       info = {'time_factor': st, 'space_factor': s, 'floats': floats per clip}).

    Raises:
      ValueError: if no pair fits in the budget.
    """
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected (B, T, H, W, 3) video, got shape {video.shape}")
    _, t, h, w, _ = video.shape
    pairs = baseline_factors(t, h, w, budget_floats)
    scores = baseline_psnr_per_pair(video, pairs)

    def rank(p):  # higher mean PSNR first, then fewer floats (pairs list is deterministic).
        return (float(jnp.mean(scores[p])), -baseline_floats(t, h, w, *p))

    st, s = max(pairs, key=rank)
    info = {"time_factor": st, "space_factor": s, "floats": baseline_floats(t, h, w, st, s)}
    return pool_and_resize(video, st, s), info


def baseline_psnr(video: jax.Array, budget_floats: int) -> Tuple[jax.Array, dict]:
    """(B,) PSNR of :func:`baseline_codec`'s reconstruction, and its info dict."""
    recon, info = baseline_codec(video, budget_floats)
    return psnr(video, recon), info


# --------------------------------------------------------------------------------------
# Averaging over a split with padded batches.
# --------------------------------------------------------------------------------------

def masked_mean(values, mask) -> float:
    """sum(values * mask) / sum(mask), ignoring whatever the padded entries hold.

    Uses ``where`` rather than a product so that padded entries that are inf / NaN (e.g. the
    PSNR of an all-zero padding clip against itself) do not poison the sum (inf * 0 = NaN).

    Args:
      values: (B,) per-clip metric.
      mask: (B,) bool, True for real clips.

    Returns:
      Python float (NaN if the mask is all False).
    """
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} must have the same shape")
    n = mask.sum()
    return float(np.where(mask, values, 0.0).sum() / n) if n else float("nan")


class MetricAccumulator:
    """Accumulates masked per-clip metrics over batches (host side, float64 sums).

    >>> acc = MetricAccumulator()
    >>> acc.update({"psnr": psnr_b, "ssim": ssim_b}, mask)   # each (B,), mask (B,) bool
    >>> acc.result()                                         # {"psnr": mean, "ssim": mean}
    """

    def __init__(self) -> None:
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}

    def update(self, metrics: Mapping[str, jax.Array], mask: Optional[jax.Array] = None) -> None:
        """Adds a batch. ``mask`` (B,) bool marks real clips; ``None`` means all real."""
        for name, values in metrics.items():
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            m = np.ones(v.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
            if v.shape != m.shape:
                raise ValueError(f"{name}: values {v.shape} and mask {m.shape} differ")
            self._sums[name] = self._sums.get(name, 0.0) + float(np.where(m, v, 0.0).sum())
            self._counts[name] = self._counts.get(name, 0) + int(m.sum())

    def result(self) -> Dict[str, float]:
        """{name: mean over all real clips seen} (NaN for a name with no real clip)."""
        return {k: (self._sums[k] / self._counts[k] if self._counts[k] else float("nan"))
                for k in self._sums}

    def count(self, name: str) -> int:
        """Number of real clips accumulated for ``name``."""
        return self._counts.get(name, 0)
