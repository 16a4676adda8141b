"""Reading and writing pytrees with Orbax, as checkpoints (checkpoint.py) and exports (export.py)
both do: restore targets that carry their shardings, partial restores of one subtree, and the one
line that names why a read failed."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vitok.core import manifest, orbax_quirks


def check_target(abstract: Any, what: str) -> None:
  """Every leaf of a restore target must carry its target sharding: without one Orbax would fall
  back to the sharding recorded in the checkpoint (wrong on another device count) or, in a
  partial restore, silently return a host array of the *saved* shape."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(
          f'{what}: leaf {jax.tree_util.keystr(path)} ({type(leaf).__name__}) has no target '
          f'sharding; build the target with abstract_like(tree, shardings).'
      )


def describe(error: Exception) -> str:
  """One line: the root cause's type and the first line of its message (Orbax wraps TensorStore's
  error, e.g. 'OUT_OF_RANGE: ... Requested byte range [0, 73892) is not valid for value of size
  37066', in a generic one that dumps the array's spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  line = (lines[0] if lines else '').split(' [tensorstore_spec')[0]
  return line if isinstance(error, manifest.Damaged) else f'{type(error).__name__}: {line}'[:400]


def holds(path: epath.Path, key: str) -> bool:
  """Whether the PyTree checkpoint at `path` has a non-empty top-level `key` (an unreadable one
  answers True: the restore then reports the damage)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with orbax_quirks.quiet_async_errors():
      saved = handler.metadata(path).tree
  except Exception:  # pylint: disable=broad-except
    return True
  finally:
    handler.close()
  return bool(isinstance(saved, dict) and saved.get(key))


def absolute(path: str) -> str:
  """`path` made absolute (local paths); URLs such as gs://bucket/dir are kept as they are."""
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


def restore_with(handler, path: epath.Path, args) -> Any:
  checkpointer = ocp.Checkpointer(handler)
  try:
    return checkpointer.restore(path, args=args)
  finally:
    checkpointer.close()


def restore_subtree(path: epath.Path, keys: tuple[str, ...], abstract: Any) -> Any:
  """Partial restore of `tree[keys[0]][keys[1]]...` from the PyTree checkpoint at `path` into
  `abstract`: the other leaves are skipped (`partial_restore=True`), so their structure need not be
  known."""
  target = abstract
  for key in reversed(keys):
    target = {key: target}
  restored = restore_with(
      ocp.PyTreeCheckpointHandler(),
      path,
      ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
      ),
  )
  for key in keys:
    restored = restored[key]
  return restored


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """A restore target for `tree`: a pytree of `jax.ShapeDtypeStruct`.

  Each leaf carries `shardings`' leaf (a tree of `jax.sharding.Sharding` with `tree`'s structure,
  or one Sharding for every leaf) when given, else the leaf's own sharding (arrays already placed
  on the target mesh, e.g. a freshly initialised state)."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        tree,
    )
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
