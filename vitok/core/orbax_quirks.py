"""Process-wide workarounds for Orbax's and TensorStore's behaviour, in one place, each with the
versions it was written against (orbax-checkpoint 0.12.8, tensorstore 0.1.86, absl-py 2.5.1).
tests/test_orbax_quirks.py checks that the upstream behaviour the first two work around is still
there (a failure there means a workaround can go); the third's reports come only under CPU load,
so its test (tests/test_checkpoint_unit.py) checks the filter, not Orbax.

- NoMetricsWarningFilter: a CheckpointManager with `best_fn` warns at every save made without
  metrics; saves without metrics are normal here (ranked by keep-last only).
- TolerantManager: a CheckpointManager fails to open a directory in which one checkpoint's
  metrics file is unreadable; here that checkpoint counts as saved without metrics (a restore of
  it reports the damage, if its state is damaged too).
- drop_late_read_reports / quiet_async_errors: a failed TensorStore read reports again, later,
  from other threads (unraisable 'Event loop is closed' errors, asyncio's 'Task exception was
  never retrieved'), after the restore raised and its error was handled.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import traceback

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoMetricsWarningFilter(logging.Filter):
  """Drops Orbax's per-save "did not provide metrics" warning: saves without metrics are normal
  here (they are ranked by keep-last only), but the manager needs `best_fn` to store metrics."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in str(record.msg)


def drop_the_no_metrics_warning() -> None:
  """Installs NoMetricsWarningFilter on absl's logger, once (a Checkpointer does, when made)."""
  absl_log = logging.getLogger('absl')
  if not any(isinstance(f, NoMetricsWarningFilter) for f in absl_log.filters):
    absl_log.addFilter(NoMetricsWarningFilter())


class TolerantManager(ocp.CheckpointManager):
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


def drop_late_read_reports() -> None:
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
  logging.getLogger('asyncio').addFilter(unretrieved_orbax_errors_dropped)


def unretrieved_orbax_errors_dropped(record: logging.LogRecord) -> bool:
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
def quiet_async_errors():
  """Reading a damaged checkpoint leaves TensorStore / Orbax coroutines and futures whose errors
  Python reports as tracebacks ('Exception ignored in ...', 'Future exception was never
  retrieved') after the error itself was raised and handled. Collect them while the restore runs
  and log those reports at debug level only."""
  drop_late_read_reports()
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
