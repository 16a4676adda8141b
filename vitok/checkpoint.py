"""Orbax checkpoints of a TrainState (and the data iterator) in `WORKDIR/checkpoints/<step>/`.

Layout of one checkpoint (an Orbax Composite):

    WORKDIR/checkpoints/<step>/state/     the TrainState (StandardSave: sharded arrays, OCDBT)
    WORKDIR/checkpoints/<step>/data/      optional: the grain iterator position, one JSON file per
                                          process (`process_<i>-of-<n>.json`)
    WORKDIR/checkpoints/<step>/metrics/   optional: the metrics the save was ranked by (keep-best)

Atomic finalisation: Orbax writes every save into `<step>.orbax-checkpoint-tmp-<n>/` and renames it
to `<step>/` only once all items of all processes are on disk (and the commit succeeded). A save
killed half-way therefore leaves only the temporary directory behind, which `latest_step()` never
lists (and a later `Checkpointer` ignores), so an interrupted or broken save never replaces or
shadows the last good checkpoint. Old checkpoints are deleted by retention only after the new one
has been committed; if the commit raises, nothing is deleted.

Saves are asynchronous: `save()` returns once the arrays are copied off the device (the grain
iterator state is captured synchronously, at the call) and the files are written by a background
thread while training continues. `wait()` blocks until it is durable; `close()` waits and closes.
All processes must call `save`/`restore` in a multi-host run; Orbax coordinates them.

Retention: the last `keep` checkpoints plus the best `keep_best` among the checkpoints saved with
`metrics[best_metric]` (a finite number), `best_mode` 'max' or 'min'. Checkpoints saved without
such metrics are governed by keep-last only.

Restores always go against an abstract target (`abstract_like`): a pytree of `jax.ShapeDtypeStruct`
carrying the *target* shardings, never the layout recorded in the checkpoint, so a run saved on 8
devices restores onto 1 device or onto another mesh. `restore_params` reads only the (EMA)
parameters of a checkpoint (an Orbax partial restore; no optimizer structure needed), and
`export_params` / `load_params` write / read a standalone params-only checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_STATE = 'state'
_DATA = 'data'


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored into the requested state."""


class _NoMetricsWarningFilter(logging.Filter):
  """Drops Orbax's per-save "did not provide metrics" warning: saves without metrics are normal
  here (they are ranked by keep-last only), but the manager needs `best_fn` to store metrics."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in str(record.msg)


logging.getLogger('absl').addFilter(_NoMetricsWarningFilter())


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that treats an unreadable metrics file (a corrupt checkpoint) as "saved
  without metrics" instead of failing to open the whole directory; restoring that checkpoint then
  reports the corruption (CheckpointError) if its state is broken too."""

  def _get_metrics(self, step: int):
    try:
      return super()._get_metrics(step)
    except Exception as e:  # pylint: disable=broad-except
      logging.getLogger(__name__).warning(
          'ignoring the unreadable metrics of checkpoint step %s in %s: %s: %s', step,
          self.directory, type(e).__name__, e)
      return None


def _check_target(abstract: Any, what: str) -> None:
  """Every leaf of a restore target must carry its target sharding: without one Orbax would fall
  back to the sharding recorded in the checkpoint (wrong on another device count) or, in a
  partial restore, silently return a host array of the *saved* shape."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(
          f'{what}: leaf {jax.tree_util.keystr(path)} ({type(leaf).__name__}) has no target '
          f'sharding; build the target with abstract_like(tree, shardings).')


def _numeric(value: Any) -> float | None:
  """`value` as a finite float, or None (missing, non-numeric, NaN or inf)."""
  try:
    value = float(np.asarray(value).item()) if np.ndim(value) == 0 else None
  except (TypeError, ValueError):
    return None
  return value if value is not None and math.isfinite(value) else None


def _json_metrics(metrics: dict) -> dict:
  """JSON-serialisable copy of `metrics` (numpy / jax scalars -> Python); other values dropped."""
  out = {}
  for key, value in metrics.items():
    if isinstance(value, (bool, int, float, str)):
      out[str(key)] = value
    elif np.ndim(value) == 0 and hasattr(value, 'item'):
      out[str(key)] = np.asarray(value).item()
  return out


class Checkpointer:
  """Saves and restores TrainStates in `WORKDIR/checkpoints` (see the module docstring).

  After `restore(..., data_iterator=it)`, `last_restore_had_data` tells whether `it` was restored
  (True) or left untouched because the checkpoint holds no iterator state readable by this
  process (False: saved without an iterator, or by a different process count).
  """

  def __init__(self, workdir: str, keep: int = 3, keep_best: int = 0,
               best_metric: str = 'psnr', best_mode: str = 'max', create: bool = True):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.join(_absolute(workdir), 'checkpoints')
    self.best_metric, self.best_mode = best_metric, best_mode
    self.last_restore_had_data = False
    self._pending_step: int | None = None
    self._metrics: dict[int, dict | None] = {}   # step -> ranked metrics (read once from disk)
    worst = -math.inf if best_mode == 'max' else math.inf

    def score(metrics) -> float:
      value = _numeric(metrics.get(best_metric)) if isinstance(metrics, dict) else None
      return worst if value is None else value

    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    if keep_best > 0:
      # BestN keeps the last n after an ascending sort: the largest for 'max', smallest for 'min'.
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=score, reverse=best_mode == 'min', n=int(keep_best),
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # best_fn makes the manager write each save's metrics (and read them back on start-up).
        best_fn=score, best_mode=best_mode)
    try:
      self._manager = _Manager(self.directory, options=options)
    except Exception as e:  # e.g. an unreadable metrics file of an existing checkpoint
      raise CheckpointError(f'could not open the checkpoints in {self.directory}: '
                            f'{type(e).__name__}: {e}') from e

  # --- Listing -----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending (an asynchronous save still being written by
    this process is not listed until it is committed)."""
    steps = sorted(self._manager.all_steps())
    if (self._pending_step is not None and self._pending_step in steps
        and self._manager.is_saving_in_progress()):
      steps.remove(self._pending_step)
    return steps

  def latest_step(self) -> int | None:
    """The latest complete checkpoint, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The best complete checkpoint by `metrics[best_metric]` (`best_mode`), among those saved
    with that metric; None when there is none."""
    best, best_value = None, None
    for step in self.all_steps():
      if step not in self._metrics:
        self._metrics[step] = self._manager.metrics(step)
      metrics = self._metrics[step]
      value = _numeric(metrics.get(self.best_metric)) if isinstance(metrics, dict) else None
      if value is None:
        continue
      if best_value is None or (value > best_value if self.best_mode == 'max'
                                else value < best_value):
        best, best_value = step, value
    return best

  # --- Saving ------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_iterator: Any = None,
           metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` (and of `data_iterator`'s position, captured now).

    `metrics` (e.g. the evaluation result) ranks the checkpoint for keep-best; it is recorded only
    when it holds a finite `metrics[best_metric]`. A step that already exists is an error."""
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    ranked = None
    if metrics is not None and _numeric(metrics.get(self.best_metric)) is not None:
      ranked = _json_metrics(metrics)
    step = int(step)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=True)
    self._pending_step = step
    self._metrics[step] = ranked

  # --- Restoring ---------------------------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    self._manager.wait_until_finished()   # a restore of a step being written sees it complete
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f'no checkpoint found in {self.directory}')
    return step

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _error(self, step: int, e: Exception, what: str = 'checkpoint') -> CheckpointError:
    return CheckpointError(
        f'could not restore {what} step {step} from {self._step_dir(step)}: '
        f'{type(e).__name__}: {e}. It may be corrupt or written by a different model config; '
        f'move it aside to resume from an earlier step ({self.all_steps()} present).')

  def _has_data(self, step: int) -> bool:
    """Whether checkpoint `step` holds an iterator state for this process (grain names the file
    after the process index and count)."""
    index, count = jax.process_index(), jax.process_count()
    return (epath.Path(self._step_dir(step)) / _DATA / f'process_{index}-of-{count}.json').exists()

  def restore(self, abstract_state: Any, step: int | None = None,
              data_iterator: Any = None) -> Any:
    """Restores `step` (default: the latest) into the structure of `abstract_state`, a pytree of
    `jax.ShapeDtypeStruct` carrying the target shardings (see `abstract_like`).

    With `data_iterator`, also restores its position in place when the checkpoint holds one for
    this process (`self.last_restore_had_data` says whether it did; an unreadable or mismatched
    iterator state, e.g. from another `data.num_workers`, is logged and reported as not restored);
    the iterator is touched only after the state restored. Raises CheckpointError naming the step
    and path when the state cannot be restored."""
    self.last_restore_had_data = False
    _check_target(abstract_state, 'restore target')
    step = self._resolve_step(step)
    try:
      state = self._manager.restore(
          step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}))
      state = state[_STATE]
    except Exception as e:  # Orbax raises many types; the user needs the path and the cause.
      raise self._error(step, e) from e
    if data_iterator is not None and self._has_data(step):
      try:
        self._manager.restore(
            step, args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(
                data_iterator)}))
      except Exception as e:  # e.g. saved with another data.num_workers: not a reason to stop
        logging.getLogger(__name__).warning(
            'could not restore the data iterator of checkpoint step %d (%s: %s); the caller '
            're-positions the input stream from the step', step, type(e).__name__, e)
        return state
      self.last_restore_had_data = True
    return state

  def restore_params(self, abstract_params: Any, step: int | None = None,
                     ema: bool = False) -> Any:
    """Restores only `params` (or `ema_params` when `ema`) of checkpoint `step` (default: the
    latest) into `abstract_params` (ShapeDtypeStructs with the target shardings, e.g.
    `abstract_like(nnx.state(model, nnx.Param), shardings)`). The optimizer state is neither read
    nor needed. Raises CheckpointError (also when `ema` and the checkpoint has no EMA)."""
    _check_target(abstract_params, 'restore_params target')
    step = self._resolve_step(step)
    key = 'ema_params' if ema else 'params'
    path = epath.Path(self._step_dir(step)) / _STATE
    handler = ocp.PyTreeCheckpointHandler()
    try:
      saved = handler.metadata(path).tree
    except Exception as e:
      raise self._error(step, e) from e
    finally:
      handler.close()
    if not (isinstance(saved, dict) and saved.get(key)):
      what = 'EMA parameters (the run had EMA off)' if ema else 'parameters'
      raise CheckpointError(f'checkpoint step {step} in {self._step_dir(step)} holds no {what}.')
    try:
      return _restore_subtree(path, key, abstract_params)
    except Exception as e:
      raise self._error(step, e, f'{key} of checkpoint') from e

  # --- Lifetime ----------------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is committed; raises if it failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _absolute(path: str) -> str:
  """`path` made absolute (local paths); URLs such as gs://bucket/dir are kept as they are."""
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


def _restore_with(handler, path: epath.Path, args) -> Any:
  checkpointer = ocp.Checkpointer(handler)
  try:
    return checkpointer.restore(path, args=args)
  finally:
    checkpointer.close()


def _restore_subtree(path: epath.Path, key: str, abstract: Any) -> Any:
  """Partial restore of `tree[key]` from the PyTree checkpoint at `path` into `abstract`: the other
  leaves are skipped (`partial_restore=True`), so their structure need not be known."""
  target = {key: abstract}
  restored = _restore_with(ocp.PyTreeCheckpointHandler(), path, ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return restored[key]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """A restore target for `tree`: a pytree of `jax.ShapeDtypeStruct`.

  Each leaf carries `shardings`' leaf (a tree of `jax.sharding.Sharding` with `tree`'s structure,
  or one Sharding for every leaf) when given, else the leaf's own sharding (arrays already placed
  on the target mesh, e.g. a freshly initialised state)."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        tree)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def export_params(params: Any, directory: str) -> None:
  """Writes `params` alone as a standalone Orbax checkpoint in `directory`, synchronously. An
  existing export there is removed first (the new one is written to a temporary directory and
  renamed into place when complete). Read it back with `load_params`. All processes call this in
  a multi-host run."""
  directory = epath.Path(_absolute(directory))
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    checkpointer.save(directory, args=ocp.args.StandardSave(params), force=True)
  finally:
    checkpointer.close()


def load_params(directory: str, abstract_params: Any) -> Any:
  """Restores a params tree written by `export_params` into `abstract_params` (ShapeDtypeStructs
  with the target shardings). Raises CheckpointError naming the directory."""
  _check_target(abstract_params, 'load_params target')
  directory = _absolute(directory)
  try:
    return _restore_with(ocp.StandardCheckpointHandler(), epath.Path(directory),
                         ocp.args.StandardRestore(abstract_params))
  except Exception as e:
    raise CheckpointError(f'could not load parameters from {directory}: '
                          f'{type(e).__name__}: {e}') from e
