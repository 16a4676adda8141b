"""A checkpoint's manifest: every array's path, shape, dtype and a digest of its bits.

Written with each checkpoint and checked at restore, it makes two failures tell themselves apart:

* the checkpoint holds other arrays than the config asks for (another model size, EMA on/off):
  the shapes differ from the restore target's (`compare`), a config mismatch;
* the checkpoint's bytes changed on disk (a flipped bit, an overwritten or truncated file that
  still decodes): the restored values do not give the recorded digest (`verify`), damage. Orbax
  stores array data zstd-compressed without a checksum, so such damage would otherwise restore
  silently with wrong values.

The digest of an array x with n elements is sum_i bits(x_i) * w_i mod 2^32 over its row-major
elements, with bits() the element's bit pattern as uint32 and distinct odd weights
w_i = 2 * (i * 0x9E3779B1 mod 2^31) + 1. Integer addition is exact and order-free, so the digest
is computed on the devices, in one pass, and is the same for any sharding and device count: a
state saved on 256 chips verifies when restored on one. An odd weight is invertible mod 2^32, so
any change of a single element always changes the digest; more changes go unnoticed with
probability 2^-32. Cost: one read of the state; measured in the README (Resume section).

The manifest carries a SHA-256 of its own entries, so damage to the manifest itself is damage too,
never mistaken for a config mismatch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

FORMAT = 'vitok-manifest-1'
_GOLDEN = 0x9E3779B1


def leaf_path(path) -> str:
  """'params/encoder/blocks/0/attn/qkv/kernel' for a jax key path (nnx's trailing '.value' and
  the attribute/dict/index syntax dropped)."""
  names = []
  for key in path:
    name = getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))
    names.append(str(name))
  if names and names[-1] == 'value':
    names.pop()
  return '/'.join(names)


def named_leaves(tree) -> list[tuple[str, Any]]:
  return [(leaf_path(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _bits(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (8-byte elements as two words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for axis in reversed(range(bits.ndim)):
    index += lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  weight = ((index * jnp.uint32(_GOLDEN)) << 1) | jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _digests(leaves: list) -> jax.Array:
  return (
      jnp.stack([_digest(jnp.asarray(x)) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)
  )


def digests(tree) -> list[int]:
  """The digest of every leaf of `tree` (arrays on any devices, sharded any way; host arrays), in
  `named_leaves` order. Every process of a multi-host run must call it (collectives)."""
  leaves = [leaf for _, leaf in named_leaves(tree)]
  groups = {}  # one computation per set of devices the arrays live on (usually one mesh)
  for i, leaf in enumerate(leaves):
    devices = leaf.sharding.device_set if isinstance(leaf, jax.Array) else set()
    groups.setdefault(frozenset(d.id for d in devices), []).append(i)
  out = [0] * len(leaves)
  for indices in groups.values():
    values = _digests([leaves[i] for i in indices])
    if not values.is_fully_addressable:
      values = multihost_utils.process_allgather(values, tiled=True)
    for i, value in zip(indices, np.asarray(values)):
      out[i] = int(value)
  return out


def _checksum(arrays: list) -> str:
  return hashlib.sha256(json.dumps(arrays, sort_keys=True).encode()).hexdigest()


def make(tree) -> dict:
  """The manifest of `tree` (a JSON-serialisable dict)."""
  arrays = [
      [name, list(np.shape(leaf)), str(np.dtype(leaf.dtype)), digest]
      for (name, leaf), digest in zip(named_leaves(tree), digests(tree))
  ]
  return {'format': FORMAT, 'arrays': arrays, 'checksum': _checksum(arrays)}


class Damaged(ValueError):
  """The manifest or the arrays it describes are not what was written."""


def entries(manifest: Any, prefix: str = '') -> dict[str, tuple[tuple, str, int]]:
  """{path: (shape, dtype, digest)} of the manifest's arrays under `prefix` ('params/'; paths are
  returned without it). Raises Damaged if the manifest is not intact."""
  if not (
      isinstance(manifest, dict)
      and manifest.get('format') == FORMAT
      and isinstance(manifest.get('arrays'), list)
      and manifest.get('checksum') == _checksum(manifest['arrays'])
  ):
    raise Damaged('its manifest is damaged (format or checksum)')
  return {
      name[len(prefix) :]: (tuple(shape), dtype, digest)
      for name, shape, dtype, digest in manifest['arrays']
      if name.startswith(prefix)
  }


def compare(recorded: dict, target) -> list[str]:
  """What differs between the recorded arrays and the abstract `target` tree (shapes and dtypes):
  ['decoder/to_pixels/kernel: saved (128, 384) float32, requested (128, 192) float32', ...]."""
  wanted = {
      name: (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for name, leaf in named_leaves(target)
  }
  differences = []
  for name in sorted(set(recorded) | set(wanted)):
    saved = recorded[name][:2] if name in recorded else None
    if saved == wanted.get(name):
      continue
    describe = lambda sd: 'absent' if sd is None else f'{sd[0]} {sd[1]}'
    differences.append(f'{name}: saved {describe(saved)}, requested {describe(wanted.get(name))}')
  return differences


def verify(recorded: dict, restored) -> None:
  """Raises Damaged naming the first array of `restored` whose digest is not the recorded one."""
  for (name, _), digest in zip(named_leaves(restored), digests(restored)):
    if digest != recorded[name][2]:
      raise Damaged(
          f'array {name} does not match the digest written at save '
          f'({digest:#010x} != {recorded[name][2]:#010x}): its bytes changed on disk'
      )
