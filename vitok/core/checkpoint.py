"""Orbax checkpoints of a TrainState (and the data iterator) in `WORKDIR/checkpoints/<step>/`.

Layout of one checkpoint (an Orbax Composite):

    WORKDIR/checkpoints/<step>/state/     the TrainState (StandardSave: sharded arrays, OCDBT)
    WORKDIR/checkpoints/<step>/data/      optional: the grain iterator position, one JSON file per
                                          process (`process_<i>-of-<n>.json`)
    WORKDIR/checkpoints/<step>/metrics/   optional: the metrics the save was ranked by (keep-best)
    WORKDIR/checkpoints/<step>/manifest/  every array's path, shape, dtype and digest (manifest.py)

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

Restoring tells a config mismatch from damage (see manifest.py). A checkpoint whose arrays have
other shapes than the restore target raises CheckpointMismatch naming them: it is intact, the
config is not the run's. A checkpoint that cannot be read, or whose restored arrays do not match
their digests, is damaged: without an explicit step, `restore` / `restore_params` then fall back to
the newest checkpoint that restores, log each skipped step and why, and list them in `skipped`;
`quarantine` moves damaged checkpoints out of the rotation (never deleting them). All processes of
a multi-host run take the same decision for every step.

Restores always go against an abstract target (`abstract_like`): a pytree of `jax.ShapeDtypeStruct`
carrying the *target* shardings, never the layout recorded in the checkpoint, so a run saved on 8
devices restores onto 1 device or onto another mesh. `restore_params` reads only the (EMA)
parameters of a checkpoint (an Orbax partial restore; no optimizer structure needed), and
`export_params` / `load_params` write / read a standalone params-only checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import sys
import traceback
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vitok.core import manifest

_STATE = 'state'
_DATA = 'data'
_MANIFEST = 'manifest'
DAMAGED_DIR = 'damaged_checkpoints'  # beside `checkpoints/`: where `quarantine` moves them

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint can be restored into the requested state (the message says why)."""


class CheckpointDamaged(CheckpointError):
  """A checkpoint's files cannot be read, or its arrays changed after they were written."""

  def __init__(self, directory: str, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f'checkpoint step {step} in {directory} is damaged: {reason}')


class CheckpointMismatch(CheckpointError):
  """A checkpoint is intact but holds other arrays than the requested state (another config)."""

  def __init__(self, directory: str, step: int, differences: list[str]):
    self.step, self.differences = step, differences
    # The parameters first: the EMA and optimizer moments repeat their differences.
    first = sorted(differences, key=lambda d: not d.startswith('params/'))
    shown = '; '.join(first[:4]) + (
        f'; ... ({len(differences)} in all)' if len(differences) > 4 else ''
    )
    super().__init__(
        f'checkpoint step {step} in {directory} holds other arrays than this config '
        f'builds: {shown}'
    )


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
      log.warning(
          'ignoring the unreadable metrics of checkpoint step %s in %s: %s: %s',
          step,
          self.directory,
          type(e).__name__,
          e,
      )
      return None


def _check_target(abstract: Any, what: str) -> None:
  """Every leaf of a restore target must carry its target sharding: without one Orbax would fall
  back to the sharding recorded in the checkpoint (wrong on another device count) or, in a
  partial restore, silently return a host array of the *saved* shape."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(
          f'{what}: leaf {jax.tree_util.keystr(path)} ({type(leaf).__name__}) has no target '
          f'sharding; build the target with abstract_like(tree, shardings).'
      )


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

  After a restore, `restored_step` is the step it read and `skipped` the damaged steps it passed
  over, with why. After `restore(..., data_iterator=it)`, `last_restore_had_data` tells whether
  `it` was restored (True) or left untouched because the checkpoint holds no iterator state
  readable by this process (False: saved without an iterator, or by a different process count).
  """

  def __init__(
      self,
      workdir: str,
      keep: int = 3,
      keep_best: int = 0,
      best_metric: str = 'psnr',
      best_mode: str = 'max',
      create: bool = True,
  ):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.join(_absolute(workdir), 'checkpoints')
    self.best_metric, self.best_mode = best_metric, best_mode
    self.last_restore_had_data = False
    self.restored_step: int | None = None  # the step the last restore read
    self.skipped: list[tuple[int, str]] = []  # damaged steps it skipped, newest first
    self._pending_step: int | None = None
    self._metrics: dict[int, dict | None] = {}  # step -> ranked metrics (read once from disk)
    worst = -math.inf if best_mode == 'max' else math.inf

    def score(metrics) -> float:
      value = _numeric(metrics.get(best_metric)) if isinstance(metrics, dict) else None
      return worst if value is None else value

    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    if keep_best > 0:
      # BestN keeps the last n after an ascending sort: the largest for 'max', smallest for 'min'.
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=score,
              reverse=best_mode == 'min',
              n=int(keep_best),
              keep_checkpoints_without_metrics=False,
          )
      )
    options = ocp.CheckpointManagerOptions(
        create=create,
        enable_async_checkpointing=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # best_fn makes the manager write each save's metrics (and read them back on start-up).
        best_fn=score,
        best_mode=best_mode,
    )
    try:
      self._manager = _Manager(self.directory, options=options)
    except Exception as e:  # e.g. an unreadable metrics file of an existing checkpoint
      raise CheckpointError(
          f'could not open the checkpoints in {self.directory}: {type(e).__name__}: {e}'
      ) from e

  # --- Listing -----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending (an asynchronous save still being written by
    this process is not listed until it is committed)."""
    steps = sorted(self._manager.all_steps())
    if (
        self._pending_step is not None
        and self._pending_step in steps
        and self._manager.is_saving_in_progress()
    ):
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
      if best_value is None or (
          value > best_value if self.best_mode == 'max' else value < best_value
      ):
        best, best_value = step, value
    return best

  # --- Saving ------------------------------------------------------------------------------------

  def save(
      self, step: int, state: Any, data_iterator: Any = None, metrics: dict | None = None
  ) -> None:
    """Starts an asynchronous save of `state` (and of `data_iterator`'s position, captured now).

    `metrics` (e.g. the evaluation result) ranks the checkpoint for keep-best; it is recorded only
    when it holds a finite `metrics[best_metric]`. A step that already exists is an error."""
    items = {
        _STATE: ocp.args.StandardSave(state),
        _MANIFEST: ocp.args.JsonSave(manifest.make(state)),
    }
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

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _has_data(self, step: int) -> bool:
    """Whether checkpoint `step` holds an iterator state for this process (grain names the file
    after the process index and count)."""
    index, count = jax.process_index(), jax.process_count()
    return (epath.Path(self._step_dir(step)) / _DATA / f'process_{index}-of-{count}.json').exists()

  def _recorded(self, step: int, prefix: str) -> dict | None:
    """The manifest entries of `step` under `prefix`, or None for a checkpoint written before
    manifests existed. Raises manifest.Damaged (or Orbax's error) when it cannot be read."""
    if not (epath.Path(self._step_dir(step)) / _MANIFEST).exists():
      return None
    saved = self._manager.restore(
        step, args=ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()})
    )[_MANIFEST]
    return manifest.entries(saved, prefix)

  def _restore_step(self, step: int, abstract: Any, prefix: str, read) -> Any:
    """`read()` of checkpoint `step` into `abstract` (the manifest entries under `prefix`), checked
    against the manifest. Raises CheckpointMismatch or CheckpointDamaged; every process of a
    multi-host run raises the same."""
    recorded, result, outcome = None, None, (_OK, '')
    try:
      recorded = self._recorded(step, prefix)
      differences = manifest.compare(recorded, abstract) if recorded is not None else []
      if differences:
        outcome = (_MISMATCH, differences)
      else:
        with _quiet_async_errors():
          result = read()
    except Exception as e:  # pylint: disable=broad-except  # Orbax and TensorStore raise many types
      outcome = (_DAMAGED, _describe(e))
    code, detail = _agree(*outcome)
    if code == _MISMATCH:
      raise CheckpointMismatch(self.directory, step, detail)
    if code == _DAMAGED:
      raise CheckpointDamaged(self.directory, step, detail)
    if recorded is None:
      log.warning(
          'checkpoint step %d in %s has no manifest (written by an older version): its '
          'arrays were restored without verifying them',
          step,
          self.directory,
      )
      return result
    try:
      manifest.verify(recorded, result)  # a collective: every process gets here
    except manifest.Damaged as e:
      raise CheckpointDamaged(self.directory, step, str(e)) from None
    return result

  def _restore_newest(self, step: int | None, restore_one) -> Any:
    """`restore_one(step)`; without a step, that of the newest checkpoint that is not damaged,
    logging every damaged one it skips. A mismatch is never skipped (all checkpoints of a run hold
    the same arrays, so an older one would not match either)."""
    self._manager.wait_until_finished()  # a restore of a step being written sees it complete
    self.skipped, self.restored_step = [], None
    present = self.all_steps()
    if not present:
      raise CheckpointError(f'no checkpoint found in {self.directory}')
    if step is not None and int(step) not in present:
      raise CheckpointError(
          f'no checkpoint step {step} in {self.directory}; present: '
          f'{", ".join(map(str, present))}'
      )
    candidates = [int(step)] if step is not None else present[::-1]
    for candidate in candidates:
      try:
        result = restore_one(candidate)
      except CheckpointDamaged as e:
        if step is not None:
          raise
        self.skipped.append((candidate, e.reason))
        log.warning('SKIPPED %s; trying the previous checkpoint', e)
        continue
      self.restored_step = candidate
      if self.skipped:
        log.warning(
            'restored checkpoint step %d of %s instead of the damaged step(s) %s',
            candidate,
            self.directory,
            ', '.join(str(s) for s, _ in self.skipped),
        )
      return result
    raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored: '
        + '; '.join(f'step {s}: {reason}' for s, reason in self.skipped)
    )

  def restore(self, abstract_state: Any, step: int | None = None, data_iterator: Any = None) -> Any:
    """Restores `step` (default: the newest checkpoint that is not damaged) into the structure of
    `abstract_state`, a pytree of `jax.ShapeDtypeStruct` carrying the target shardings (see
    `abstract_like`).

    With `data_iterator`, also restores its position in place when the checkpoint holds one for
    this process (`self.last_restore_had_data` says whether it did; an unreadable or mismatched
    iterator state, e.g. from another `data.num_workers`, is logged and reported as not restored);
    the iterator is touched only after the state restored. Raises CheckpointMismatch when the
    checkpoint holds other arrays, CheckpointDamaged (an explicit `step`) or CheckpointError (no
    checkpoint restores)."""
    self.last_restore_had_data = False
    _check_target(abstract_state, 'restore target')
    read = lambda step: self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
    )[_STATE]
    state = self._restore_newest(
        step, lambda s: self._restore_step(s, abstract_state, '', lambda: read(s))
    )
    step = self.restored_step
    if data_iterator is not None and self._has_data(step):
      try:
        self._manager.restore(
            step,
            args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(data_iterator)}),
        )
      except Exception as e:  # e.g. saved with another data.num_workers: not a reason to stop
        log.warning(
            'could not restore the data iterator of checkpoint step %d (%s: %s); the '
            'caller re-positions the input stream from the step',
            step,
            type(e).__name__,
            e,
        )
        return state
      self.last_restore_had_data = True
    return state

  def restore_params(self, abstract_params: Any, step: int | None = None, ema: bool = False) -> Any:
    """Restores only `params` (or `ema_params` when `ema`) of checkpoint `step` (default: the
    newest that is not damaged) into `abstract_params` (ShapeDtypeStructs with the target
    shardings, e.g. `abstract_like(nnx.state(model, nnx.Param), shardings)`). The optimizer state
    is neither read nor needed. Raises like `restore`; CheckpointMismatch also when `ema` and the
    checkpoint has no EMA."""
    _check_target(abstract_params, 'restore_params target')
    key = 'ema_params' if ema else 'params'

    def restore_one(step):
      path = epath.Path(self._step_dir(step)) / _STATE
      if not _holds(path, key):
        what = 'EMA parameters (the run had EMA off)' if ema else 'parameters'
        raise CheckpointMismatch(self.directory, step, [f'{key}: absent; it holds no {what}'])
      return self._restore_step(
          step, abstract_params, f'{key}/', lambda: _restore_subtree(path, key, abstract_params)
      )

    return self._restore_newest(step, restore_one)

  def quarantine(self, steps) -> list[str]:
    """Moves the damaged checkpoints `steps` to WORKDIR/damaged_checkpoints/<step> (never deletes
    them: they stay for inspection), out of the rotation: retention cannot delete them and the
    run can write those steps again. Every process calls it; process 0 moves. Returns the new
    paths (as seen by process 0)."""
    root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    moved = []
    for step in steps:
      target, n = os.path.join(root, str(step)), 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(root, f'{step}-{n}')
      if jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        os.rename(self._step_dir(step), target)
      moved.append(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('vitok: damaged checkpoints moved')
    self._manager.reload()
    return moved

  # --- Lifetime ----------------------------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is committed; raises if it failed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


_OK, _DAMAGED, _MISMATCH = 0, 1, 2


def _agree(code: int, detail: Any) -> tuple[int, Any]:
  """The outcome every process of a multi-host run acts on: the worst of all processes' (a
  checkpoint one process cannot read is damaged for all of them)."""
  if jax.process_count() == 1:
    return code, detail
  worst = int(np.max(multihost_utils.process_allgather(np.array([code], np.int32))))
  if worst != code:
    detail = (
        'another process of this job could not read it'
        if worst == _DAMAGED
        else ['another process of this job found other arrays']
    )
  return worst, detail


def _describe(error: Exception) -> str:
  """One line: the root cause's type and the first line of its message (Orbax wraps TensorStore's
  error, e.g. 'OUT_OF_RANGE: ... Requested byte range [0, 73892) is not valid for value of size
  37066', in a generic one that dumps the array's spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  line = (lines[0] if lines else '').split(' [tensorstore_spec')[0]
  return line if isinstance(error, manifest.Damaged) else f'{type(error).__name__}: {line}'[:400]


def _drop_late_read_reports() -> None:
  """A TensorStore read that fails leaves work behind that reports later, from TensorStore's and
  Orbax's threads, at any time after the restore returned and its error was handled:
  - callbacks that try to wake Orbax's event loop after it closed, each reported as an unraisable
    RuntimeError('Event loop is closed'), hundreds per damaged checkpoint;
  - reads of the other arrays that failed after the first, whose tasks asyncio reports as 'Task
    exception was never retrieved' with a traceback when they are garbage collected (under load,
    after the restore's own collection; at the latest when the interpreter exits).
  They say nothing the restore error did not: from then on, drop those reports, and only those
  (the second kind only where the failed coroutine is Orbax's)."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_late_read_reports', False):
    return

  def hook(unraisable):
    if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'
    ):
      previous(unraisable)

  hook.drops_late_read_reports = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_unretrieved_orbax_errors_dropped)


def _unretrieved_orbax_errors_dropped(record: logging.LogRecord) -> bool:
  """A logging filter: False (dropped, logged at debug level here) for asyncio's report of an
  Orbax read task whose error nobody retrieved; True for every other record."""
  message = str(record.msg)
  if 'exception was never retrieved' not in message or not record.exc_info:
    return True
  frames = traceback.extract_tb(record.exc_info[2])
  if not any(f'{os.sep}orbax{os.sep}' in frame.filename for frame in frames):
    return True
  log.debug('ignored: %s', record.exc_info[1])
  return False


@contextlib.contextmanager
def _quiet_async_errors():
  """Reading a damaged checkpoint leaves TensorStore / Orbax coroutines and futures whose errors
  Python reports as tracebacks ('Exception ignored in ...', 'Future exception was never
  retrieved') after the error itself was raised and handled. Collect them while the restore runs
  and log those reports at debug level only."""
  _drop_late_read_reports()
  hooks = sys.unraisablehook, sys.excepthook
  asyncio_log = logging.getLogger('asyncio')
  level = asyncio_log.level
  sys.unraisablehook = lambda unraisable: log.debug('ignored: %s', unraisable.exc_value)
  sys.excepthook = lambda kind, value, tb: log.debug('ignored: %s', value)
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()  # the abandoned coroutines report now, not later
    sys.unraisablehook, sys.excepthook = hooks
    asyncio_log.setLevel(level)


def _holds(path: epath.Path, key: str) -> bool:
  """Whether the PyTree checkpoint at `path` has a non-empty top-level `key` (an unreadable one
  answers True: the restore then reports the damage)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with _quiet_async_errors():
      saved = handler.metadata(path).tree
  except Exception:  # pylint: disable=broad-except
    return True
  finally:
    handler.close()
  return bool(isinstance(saved, dict) and saved.get(key))


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
  restored = _restore_with(
      ocp.PyTreeCheckpointHandler(),
      path,
      ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
      ),
  )
  return restored[key]


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


def export_params(params: Any, directory: str) -> None:
  """Writes `params` alone, with their manifest, as a standalone Orbax checkpoint in `directory`
  (items `params/` and `manifest/`), synchronously. An existing export there is replaced (the new
  one is written to a temporary directory and renamed into place when complete). Read it back
  with `load_params`. All processes call this in a multi-host run."""
  directory = epath.Path(_absolute(directory))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    checkpointer.save(
        directory,
        args=ocp.args.Composite(
            **{
                'params': ocp.args.StandardSave(params),
                _MANIFEST: ocp.args.JsonSave(manifest.make(params)),
            }
        ),
        force=True,
    )
  finally:
    checkpointer.close()


def load_params(directory: str, abstract_params: Any) -> Any:
  """Restores a params tree written by `export_params` into `abstract_params` (ShapeDtypeStructs
  with the target shardings) and verifies it against its manifest. Raises CheckpointError naming
  the directory (other arrays than `abstract_params`, or damage)."""
  _check_target(abstract_params, 'load_params target')
  directory = _absolute(directory)
  if not (epath.Path(directory) / _MANIFEST).exists():  # an export without a manifest
    log.warning(
        '%s has no manifest (exported by an older version): its parameters are loaded '
        'without verifying them',
        directory,
    )
    read = lambda: _restore_with(
        ocp.StandardCheckpointHandler(),
        epath.Path(directory),
        ocp.args.StandardRestore(abstract_params),
    )
    recorded = None
  else:
    try:
      saved = _restore_with(
          ocp.CompositeCheckpointHandler(),
          epath.Path(directory),
          ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()}),
      )[_MANIFEST]
      recorded = manifest.entries(saved)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'the parameters in {directory} are damaged: {_describe(e)}') from e
    differences = manifest.compare(recorded, abstract_params)
    if differences:
      raise CheckpointError(
          f'the parameters in {directory} are not those of this config: '
          + '; '.join(differences[:4])
      )
    read = lambda: _restore_with(
        ocp.CompositeCheckpointHandler(),
        epath.Path(directory),
        ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)),
    )['params']
  try:
    with _quiet_async_errors():
      params = read()
    if recorded is not None:
      manifest.verify(recorded, params)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'could not load parameters from {directory}: {_describe(e)}') from e
  return params
