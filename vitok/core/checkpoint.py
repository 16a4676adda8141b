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
parameters of a checkpoint (an Orbax partial restore; no optimizer structure needed). A params-only
export of a run is written and read by export.py; the workarounds for Orbax's quirks are in
orbax_quirks.py.
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
from jax.experimental import multihost_utils

from vitok.core import manifest, orbax_io, orbax_quirks
from vitok.core.orbax_io import abstract_like  # noqa: F401  (the restore targets of callers)

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
    self.directory = os.path.join(orbax_io.absolute(workdir), 'checkpoints')
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
    orbax_quirks.drop_the_no_metrics_warning()
    try:
      self._manager = orbax_quirks.TolerantManager(self.directory, options=options)
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
        with orbax_quirks.quiet_async_errors():
          result = read()
    except Exception as e:  # pylint: disable=broad-except  # Orbax and TensorStore raise many types
      outcome = (_DAMAGED, orbax_io.describe(e))
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
    orbax_io.check_target(abstract_state, 'restore target')
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

  def restore_params(
      self, abstract_params: Any, step: int | None = None, ema: bool = False, subtree: str = ''
  ) -> Any:
    """Restores only `params` (or `ema_params` when `ema`) of checkpoint `step` (default: the
    newest that is not damaged) into `abstract_params` (ShapeDtypeStructs with the target
    shardings, e.g. `abstract_like(nnx.state(model, nnx.Param), shardings)`); with `subtree`, only
    `params[subtree]` (a stage-2 run's 'tokenizer'). The optimizer state is neither read nor
    needed. Raises like `restore`; CheckpointMismatch also when `ema` and the checkpoint has no
    EMA."""
    orbax_io.check_target(abstract_params, 'restore_params target')
    key = 'ema_params' if ema else 'params'

    def restore_one(step):
      path = epath.Path(self._step_dir(step)) / _STATE
      if not orbax_io.holds(path, key):
        what = 'EMA parameters (the run had EMA off)' if ema else 'parameters'
        raise CheckpointMismatch(self.directory, step, [f'{key}: absent; it holds no {what}'])
      keys = (key, subtree) if subtree else (key,)
      read = lambda: orbax_io.restore_subtree(path, keys, abstract_params)
      return self._restore_step(step, abstract_params, '/'.join(keys) + '/', read)

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
