"""Stopping a training run cleanly: SIGTERM (preemption, scancel, `kill`) and SIGINT (Ctrl-C) both
mean "save the current step and stop".

Single process: a handler records the signal and the loop checks `reached(step)` after every step,
then saves and returns. An evaluation can take minutes, longer than a preemption grace period, so
inside `interruptible()` the handler raises `EvaluationInterrupted` instead: the evaluation is
abandoned and the step saved. After a first Ctrl-C a second one raises KeyboardInterrupt at once
(stop without waiting for the save; the last complete checkpoint stays as it was).

Multi-process: JAX's coordination service owns SIGTERM and `reached_preemption_sync_point` makes
every process save the same step, whichever process got the signal. Ctrl-C is forwarded to it as a
SIGTERM to this process, so it takes the same path. Evaluations are not interrupted there (the
other processes may be inside the same collective): the step is saved after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODES = {'SIGTERM': 143, 'SIGINT': 130}  # 128 + the signal number: "stopped early, resume me"


class EvaluationInterrupted(Exception):
  """A stop signal arrived during an evaluation (see `StopSignals.interruptible`)."""


class StopSignals:
  """Installs the handlers (main thread only); `close()` restores the previous ones."""

  def __init__(self):
    self.received: str | None = None  # 'SIGTERM' or 'SIGINT', once one reached this process
    self._multi_process = jax.process_count() > 1
    self._in_evaluation = False
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return
    handled = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
    for number in handled:
      self._previous[number] = signal.signal(number, self._on_signal)

  def _on_signal(self, number, frame):
    del frame
    name = signal.Signals(number).name
    self.received = self.received or name
    if number == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
      if self._multi_process:
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notice: one agreed step
    if self._in_evaluation:
      raise EvaluationInterrupted(name)

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Every process calls it after every step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  @contextlib.contextmanager
  def interruptible(self):
    """A stop signal inside this block raises EvaluationInterrupted (single process only)."""
    self._in_evaluation = not self._multi_process
    try:
      if self._in_evaluation and self.received:
        raise EvaluationInterrupted(self.received)
      yield
    finally:
      self._in_evaluation = False

  def close(self) -> None:
    for number, previous in self._previous.items():
      signal.signal(number, previous)
    self._previous = {}
