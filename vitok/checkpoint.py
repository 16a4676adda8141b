"""Orbax checkpoints of a TrainState in `WORKDIR/checkpoints/<step>/`.

Orbax writes each save into a temporary directory and renames it only once every file is on disk,
so an interrupted save never replaces (or shadows) the last good checkpoint: `latest_step()` lists
finalized checkpoints only. Restores go against an abstract target (shapes/dtypes, and later the
target shardings), never against whatever layout was recorded in the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored into the requested state."""


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, create: bool = True):
    self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=create))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts an (asynchronous) save; training continues while it is written."""
    self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: the latest) into the structure of `abstract_state`, a pytree of
    `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`). Raises CheckpointError naming the path."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint found in {self.directory}')
    path = os.path.join(self.directory, str(step))
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # Orbax raises many types; the user needs the path and the cause.
      raise CheckpointError(
          f'could not restore checkpoint step {step} from {path}: {type(e).__name__}: {e}. '
          f'It may be corrupt or written by a different model config; move it aside to resume '
          f'from an earlier step ({self.all_steps()} present).') from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStruct tree (with shardings) matching `tree`, a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)
