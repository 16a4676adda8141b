r"""Runs a sweep of tokenizer runs (and the DiTs chained on them) one after another, writes its
commands for a cluster instead, or collects what has finished into a table and plots.

    python -m launch.sweep --config=configs/sweeps/vitok_sizes.py:demo --workdir=/tmp/sweep
    python -m launch.sweep --config=configs/sweeps/vitok_sizes.py:demo --workdir=DIR --emit=slurm
    python -m launch.sweep --config=configs/sweeps/vitok_sizes.py:demo --workdir=DIR --collect

Every member is a normal run of the launch commands (see vitok/sweeps/sweep.py) in DIR/<name>/,
each command's output in DIR/<name>/<step>.log and the member's progress in
DIR/<name>/status.json. A rerun skips finished members and finished steps and resumes an
interrupted run from its checkpoint; a member that fails is recorded with its error and the sweep
goes on (a rerun tries it again). Ctrl-C (or SIGTERM) is passed to the running command, which
saves its step; the sweep then stops and the same command resumes it.

--emit writes the commands instead of running them: `commands` (DIR/commands.sh, one line per
member), `slurm` (DIR/sweep.sbatch, a job array with one task per member) or `tpu`
(DIR/tpu_commands.sh, one gcloud line per member for a TPU VM). --collect (also done at the end of
a run) reads whatever has finished, wherever it ran, into DIR/results.csv, DIR/results.md and
DIR/plots/*.png.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from absl import flags

from launch import common, sweep_emit
from vitok.sweeps import report as sweep_report
from vitok.sweeps import sweep

_EMIT = flags.DEFINE_enum(
    'emit', None, sweep_emit.FORMATS, 'Write the launch commands instead of running them.'
)
_COLLECT = flags.DEFINE_bool(
    'collect', False, 'Only collect the finished runs into the results table and plots.'
)

STOPPED_EXIT_CODES = (130, 143)  # a launch command that saved its step on SIGINT / SIGTERM


class Stop:
  """SIGINT / SIGTERM to the sweep: passed on to the running command (started in its own session,
  so a terminal's Ctrl-C reaches it once, through here), and no further command is started."""

  def __init__(self):
    self.received: int | None = None
    self.child: subprocess.Popen | None = None
    self._previous = {n: signal.signal(n, self._on_signal) for n in (signal.SIGINT, signal.SIGTERM)}

  def close(self) -> None:
    """Restores the handlers that were there before."""
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  def _on_signal(self, number, frame):
    del frame
    self.received = number
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(number)


def _write_status(path: str, status: dict) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(status, f, indent=1)
  os.replace(tmp, path)


def _last_lines(path: str, count: int = 3) -> str:
  with open(path, errors='replace') as f:
    lines = [line.strip() for line in f.read().replace('\r', '\n').splitlines() if line.strip()]
  return ' | '.join(lines[-count:])


def run_member(sweep_config, member: sweep.Member, directory: str, stop: Stop) -> str:
  """Runs the member's steps that have not finished; returns its state: 'done', 'failed' or
  'stopped'."""
  root = os.path.join(directory, member.name)
  os.makedirs(root, exist_ok=True)
  status_path = os.path.join(root, 'status.json')
  status = sweep_report.read_status(status_path)
  status.update(name=member.name, fields=member.fields, state='running', error=None)
  status.setdefault('steps_done', [])
  status.setdefault('seconds', {})
  for step in sweep.steps(sweep_config, member, directory):
    if step.name in status['steps_done']:
      continue
    if stop.received:
      return 'stopped'
    log = os.path.join(root, f'{step.name}.log')
    print(f'  {step.name}: {step.command()}  (log: {log})', flush=True)
    started = time.perf_counter()
    with open(log, 'a') as out:
      stop.child = subprocess.Popen(
          [sweep.python(), *step.args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
      )
      code = stop.child.wait()
      stop.child = None
    seconds = round(time.perf_counter() - started, 1)
    if code == 0:
      status['steps_done'].append(step.name)
      status['seconds'][step.name] = status['seconds'].get(step.name, 0) + seconds
      _write_status(status_path, status)
      print(f'  {step.name}: done in {seconds:.0f} s', flush=True)
      continue
    if stop.received or code in STOPPED_EXIT_CODES:
      status['state'] = 'stopped'
      _write_status(status_path, status)
      return 'stopped'
    status.update(state='failed', error=f'{step.name} exited with {code}: {_last_lines(log)}')
    _write_status(status_path, status)
    print(f'  FAILED: {status["error"]}', flush=True)
    return 'failed'
  status['state'] = 'done'
  _write_status(status_path, status)
  return 'done'


def describe(config) -> dict:
  """Sizes and costs of a member's model (what `launch.plan` prints)."""
  return common.make_task(config).describe()


def check_members(sweep_config, members: list[sweep.Member]) -> None:
  """Every member's config is built and validated before anything runs: a bad one is one line
  naming the member and the field."""
  for member in members:
    try:
      common.make_task(sweep.member_config(sweep_config, member))
    except ValueError as e:  # ConfigError is a ValueError
      common.fail(f'bad sweep {common.config_argument()}: member {member.name}: {e}')
    if sweep_config.get('dit'):  # fully checked once its latents exist, by launch.train
      try:
        sweep.member_dit_config(sweep_config, member)
      except ValueError as e:
        common.fail(f'bad sweep {common.config_argument()}: dit={sweep_config.dit!r}: {e}')
    elif sweep.dit_fields(member):
      common.fail(
          f'bad sweep {common.config_argument()}: member {member.name} sets DiT fields '
          f'({", ".join(sweep.dit_fields(member))}) but the sweep chains no DiT (dit is empty)'
      )


def main(argv):
  del argv
  common.quiet_library_logs()
  directory = common.workdir()
  sweep_config = common.load_config()
  try:
    members = sweep.members(sweep_config)
  except ValueError as e:
    common.fail(f'bad sweep {common.config_argument()}: {e}')
  if _COLLECT.value:
    sweep_report.write(sweep_config, members, directory, describe)
    return
  check_members(sweep_config, members)
  if _EMIT.value:
    path = sweep_emit.write(_EMIT.value, sweep_config, members, directory, common.config_argument())
    print(f'wrote {path}: {len(members)} runs')
    return

  stop = Stop()
  states = {}
  for i, member in enumerate(members):
    if (
        sweep_report.read_status(os.path.join(directory, member.name, 'status.json')).get('state')
        == 'done'
    ):
      print(f'[{i + 1}/{len(members)}] {member.name}: done earlier', flush=True)
      states[member.name] = 'done'
      continue
    print(f'[{i + 1}/{len(members)}] {member.name}', flush=True)
    states[member.name] = run_member(sweep_config, member, directory, stop)
    if states[member.name] == 'stopped':
      print(
          f'stopped: {member.name} saved its progress; rerun the same command to resume',
          flush=True,
      )
      sys.exit(130)
  failed = [name for name, state in states.items() if state == 'failed']
  print(f'{len(members) - len(failed)} of {len(members)} runs done', flush=True)
  sweep_report.write(sweep_config, members, directory, describe)
  if failed:
    common.fail(f'failed: {", ".join(failed)} (see their status.json and logs)', code=1)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main)
