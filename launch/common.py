"""Start-up shared by the launch scripts: flag parsing, config loading and validation, task
selection, and one-line reports of everything that stops a command before (or instead of) its work.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, NamedTuple, NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from launch import tasks
from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, hardware, run_dir, trainer
from vitok.core import task as task_lib
from vitok.data import DataError

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file with an optional argument, e.g. configs/vitok.py:demo. '
    'Fields can be overridden with --config.<field>=value.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Run directory: checkpoints, logs, samples. '
    'Multi-host runs need a path on storage shared by all hosts.',
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address',
    '',
    'host:port of process 0 for a multi-process run started by hand '
    '(TPU pods and SLURM jobs are detected automatically).',
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', 0, 'With --coordinator_address: the number of processes.'
)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', -1, "With --coordinator_address: this process's index in [0, num_processes)."
)


_MESH = flags.DEFINE_string(
    'mesh',
    '',
    'Mesh shape overriding config.mesh.shape, e.g. 16x16 (sizes for config.mesh.axes; '
    'one may be -1).',
)


USAGE_EXIT_CODE = 2  # a bad flag or config: nothing was started
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT


def fail(message: str, code: int = USAGE_EXIT_CODE, exit_now: bool = False) -> NoReturn:
  """Ends the command with `message` as one line on stderr: no traceback, no usage dump
  (`exit_now`: without the interpreter's teardown)."""
  sys.stderr.write(' '.join(message.split('\n')).strip() + '\n')
  sys.stdout.flush()
  sys.stderr.flush()
  if exit_now:
    os._exit(code)
  sys.exit(code)


def run(main: Callable, on_interrupt: Callable[[], str] | None = None) -> None:
  """absl's app.run for the launch scripts. Everything that stops a command before its work is one
  line: a bad flag (unknown or mistyped --config.<field>, a bad --config argument), a bad config
  (`config_checks.ConfigError`), data that cannot be used (`DataError`: a missing folder, a split
  without clips), a checkpoint that cannot be used (`CheckpointError`), accelerators that JAX does
  not use (`hardware.HardwareError`: JAX installed without TPU / CUDA support), and Ctrl-C
  outside the training loop (which handles it itself): `on_interrupt()` says what was kept."""

  def guarded(argv):
    try:
      return main(argv)
    except hardware.HardwareError as e:  # a ConfigError, but about the installation, not the config
      fail(str(e), code=1)
    except config_checks.ConfigError as e:
      fail(f'bad config: {e}')
    except DataError as e:
      fail(f'bad data: {e}')
    except ckpt_lib.CheckpointError as e:
      fail(str(e), code=1)
    except KeyboardInterrupt:
      # os._exit: interpreter teardown while XLA compiles or Orbax writes in other threads can
      # crash (segfault) after the line; there is nothing left to clean up that matters.
      fail(
          'interrupted (Ctrl-C): ' + (on_interrupt() if on_interrupt else 'stopped'),
          code=INTERRUPTED_EXIT_CODE,
          exit_now=True,
      )

  # Before anything starts a JAX backend: with libtpu installed on a host without TPU chips JAX
  # would start its TPU backend anyway, and libtpu would print errors about the missing TPU.
  hardware.skip_absent_tpu_backend()
  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl raises flags.Error; ml_collections' --config.<field> overrides also raise
    # AttributeError / KeyError (unknown field) and TypeError.
    fail(_flag_error_message(e, argv))


def config_argument() -> str:
  """The --config argument as given ('configs/sweeps/vitok_sizes.py:demo')."""
  return _config_file_argument(sys.argv) or ''


def _config_file_argument(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config=') :]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _last_line(error) -> str:
  """The last non-empty line of an error's message (config_flags wraps the original error of a
  config file in a traceback text), without a leading 'ValueError: ' (the config files' own
  messages are ValueErrors; other types are kept)."""
  lines = [s.strip() for s in str(error).splitlines() if s.strip()]
  return re.sub(r'^ValueError: ', '', lines[-1]) if lines else type(error).__name__


def _flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line naming the flag and the problem, for an error raised while parsing flags."""
  argument = _config_file_argument(argv)
  defaults = None
  if argument is not None:
    try:
      defaults = flags.FLAGS['config'].parser.parse(argument)  # the config without overrides
      defaults.keys()  # a file that failed to load raises here
    except Exception as e:  # pylint: disable=broad-except
      return f'bad flag --config={argument}: {_last_line(e)}'
  missing = object()
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  for arg in overrides:
    dotted = arg[len('--') :].split('=', 1)[0]
    if (
        defaults is not None
        and config_checks.lookup(defaults, dotted[len('config.') :], missing) is missing
    ):
      return f'bad flag {arg}: {config_checks.unknown_field_message(dotted, defaults)}'
  match = re.match(r'flag (--config\.[\w.]+)=(.*?): ', str(error))
  if match and defaults is not None:
    dotted = match[1][len('--') :]
    current = config_checks.lookup(defaults, dotted[len('config.') :])
    return (
        f'bad flag {match[1]}={match[2]}: {dotted} takes {type(current).__name__} values, '
        f'got {match[2]!r}'
    )
  match = re.match(r'flag (--\S+?): (.*)', _last_line(error))
  return f'bad flag {match[1]}: {match[2]}' if match else f'bad flag: {_last_line(error)}'


def mesh_flag() -> str:
  return _MESH.value


def mesh_sizes(shape: str) -> tuple[int, ...]:
  """'16x16' (or '16,16') -> (16, 16); anything else fails naming --mesh."""
  from vitok.core import sharding

  try:
    return sharding.parse_mesh_shape(shape)
  except ValueError:
    fail(f'bad flag --mesh={shape}: expected sizes such as 16x16 or -1x1')


def mesh_override(config, default: str = '') -> None:
  """Applies --mesh (or `default` when --mesh is not given) to config.mesh.shape."""
  shape = _MESH.value or default
  if shape:
    config.mesh.shape = type(config.mesh.shape)(mesh_sizes(shape))  # tuple, or list from json


def init_distributed() -> None:
  """jax.distributed for multi-process runs (explicit flags, SLURM or a TPU pod); else nothing.
  Then raises `hardware.HardwareError` when the host's TPU chips or GPUs are left unused by a JAX
  running on the CPU. Must run before anything touches a device."""
  from vitok.core import distributed

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  hardware.check_backend_matches_hardware()


def quiet_library_logs() -> None:
  """Orbax and tfds log every step of every save at INFO: show warnings and up unless the user
  asked for a verbosity (--verbosity=0 brings INFO back)."""
  from absl import logging

  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def directory_flag(name: str) -> str | None:
  """--<name> as an absolute path; one line and exit when it is a URL or a file (or under one)."""
  value = flags.FLAGS[name].value
  if not value:
    return None
  if '://' in value:
    fail(
        f'bad flag --{name}={value}: URLs are not supported; use a path on a shared file '
        'system (NFS, Lustre, or a bucket mounted with gcsfuse)'
    )
  path = os.path.abspath(os.path.expanduser(value))
  try:
    run_dir.check_workdir(path, flag=f'--{name}')
  except config_checks.ConfigError as e:
    fail(f'bad flag {e}')
  return path


def workdir() -> str | None:
  return directory_flag('workdir')


def load_config(allow_workdir_config: bool = False) -> ml_collections.ConfigDict:
  """The --config, or (for eval) the config.json a training run wrote into --workdir."""
  config = _CONFIG.value
  if config is None:
    saved = os.path.join(workdir() or '', 'config.json')
    if not (allow_workdir_config and os.path.exists(saved)):
      fail(
          '--config is required (e.g. --config=configs/vitok.py:demo)'
          + (f'; no {saved} to fall back on' if allow_workdir_config else '')
      )
    try:
      with open(saved) as f:
        config = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
      fail(f"cannot read the run's config {saved}: {type(e).__name__}: {e}; pass --config")
    try:
      family = tasks.family_of(config)
    except config_checks.ConfigError as e:
      fail(f'bad config {saved}: {e}')
    tasks.read_old_cadences(config, family.base_config())
    added = config_checks.add_missing_defaults(config, family.base_config())
    if added:
      print(f'{saved} predates {", ".join(added)}: their defaults are used')
  try:
    config.keys()  # a --config file that failed to load raises on first access
  except OSError as e:
    fail(f'bad flag --config={_config_file_argument(sys.argv)}: {_last_line(e)}')
  return config


def make_task(config) -> task_lib.Task:
  """The Task of the family `config.task` names, the config validated (see `tasks.make_task`)."""
  return tasks.make_task(config)


def make_task_or_exit(config) -> task_lib.Task:
  """make_task for the command line: a bad config ends the run with its message, no traceback."""
  try:
    return make_task(config)
  except ValueError as e:
    fail(f'bad config: {e}')


def make_mesh_or_exit(config):
  """The config's mesh over all devices; a mesh that does not fit ends the run with its message."""
  from vitok.core import sharding

  try:
    return sharding.make_mesh(config.mesh)
  except ValueError as e:
    fail(f'bad config: {e}')


class TrainedRun(NamedTuple):
  config: ml_collections.ConfigDict
  task: task_lib.Task
  layout: Any  # train_state.StateLayout on this job's mesh
  params: Any  # the restored parameters (EMA or raw)
  step: int  # the checkpoint step they come from
  ema: bool  # whether they are the EMA


def open_trained_run(step: int | None, raw: bool, adjust: Callable | None = None) -> TrainedRun:
  """Start-up of the commands that read a training run (eval, export): the run's config (or
  --config), jax.distributed, a mesh over this job's devices (data-parallel unless --mesh says
  otherwise), the TrainState layout on it, and the parameters of checkpoint `step` (default: the
  newest that is not damaged; damaged ones are skipped with a warning and left in place), the
  EMA unless `raw` or the run kept none."""
  config = load_config(allow_workdir_config=True)
  if adjust is not None:
    adjust(config)  # a command's own overrides (e.g. launch.sample's --classes), then validated
  init_distributed()
  mesh_override(config, default='x'.join(['-1'] + ['1'] * (len(config.mesh.axes) - 1)))
  task = make_task_or_exit(config)
  mesh = make_mesh_or_exit(config)
  checkpointer = ckpt_lib.Checkpointer(workdir(), create=False)
  if checkpointer.latest_step() is None:
    fail(f'no checkpoint in {checkpointer.directory}: train first', code=1)
  trainer.configure_runtime(config)
  layout = trainer.create_layout(task, config, mesh)
  # Only the parameters are read: no optimizer state is allocated.
  use_ema = config.optim.ema_decay > 0 and not raw
  try:
    params = checkpointer.restore_params(layout.abstract.params, step, ema=use_ema)
  except ckpt_lib.CheckpointMismatch as e:
    fields = run_dir.config_differences(os.path.join(workdir(), 'config.json'), config)
    fail(
        f"bad config: {e}; fields of --config that differ from the run's config.json: "
        f'{"; ".join(fields) or "none"}'
    )
  return TrainedRun(config, task, layout, params, checkpointer.restored_step, use_ema)
