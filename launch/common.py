"""Start-up shared by the launch scripts: config loading, validation, task selection."""

from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from configs import vitok as vitok_config
from vitok import stage1
from vitok import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with an optional argument, e.g. configs/vitok.py:demo. '
    'Fields can be overridden with --config.<field>=value.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples. '
                                'Multi-host runs need a path on storage shared by all hosts.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0 for a multi-process run started by hand '
    '(TPU pods and SLURM jobs are detected automatically).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'With --coordinator_address: '
                                      'the number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'With --coordinator_address: this '
                                   'process\'s index in [0, num_processes).')


_MESH = flags.DEFINE_string(
    'mesh', '', 'Mesh shape overriding config.mesh.shape, e.g. 16x16 (sizes for config.mesh.axes; '
    'one may be -1).')


def mesh_flag() -> str:
  return _MESH.value


def mesh_override(config, default: str = '') -> None:
  """Applies --mesh (or `default` when --mesh is not given) to config.mesh.shape."""
  shape = _MESH.value or default
  if not shape:
    return
  try:
    sizes = tuple(int(s) for s in shape.replace(',', 'x').split('x'))
  except ValueError:
    raise app.UsageError(f'--mesh={shape}: expected sizes such as 16x16 or -1x1') from None
  config.mesh.shape = type(config.mesh.shape)(sizes)   # a tuple, or a list from config.json


def init_distributed() -> None:
  """jax.distributed for multi-process runs (explicit flags, SLURM or a TPU pod); else nothing.
  Must run before anything touches a device."""
  from vitok import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def quiet_library_logs() -> None:
  """Orbax and tfds log every step of every save at INFO: show warnings and up unless the user
  asked for a verbosity (--verbosity=0 brings INFO back)."""
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def workdir() -> str | None:
  if not _WORKDIR.value:
    return None
  if '://' in _WORKDIR.value:
    raise app.UsageError(f'--workdir={_WORKDIR.value}: URLs are not supported; use a path on a '
                         'shared file system (NFS, Lustre, or a bucket mounted with gcsfuse)')
  return os.path.abspath(os.path.expanduser(_WORKDIR.value))


def load_config(allow_workdir_config: bool = False) -> ml_collections.ConfigDict:
  """The --config, or (for eval) the config.json a training run wrote into --workdir."""
  config = _CONFIG.value
  if config is None:
    saved = os.path.join(workdir() or '', 'config.json')
    if not (allow_workdir_config and os.path.exists(saved)):
      raise SystemExit('--config is required (e.g. --config=configs/vitok.py:demo)'
                       + (f'; no {saved} to fall back on' if allow_workdir_config else ''))
    with open(saved) as f:
      config = ml_collections.ConfigDict(json.load(f))
  return config


def make_task(config) -> stage1.TokenizerTask:
  """Validates the config (unknown fields, model/data consistency) and returns the task."""
  trainer.check_known_fields(config, vitok_config.base_config())
  return stage1.TokenizerTask(config)


def make_task_or_exit(config) -> stage1.TokenizerTask:
  """make_task for the command line: a bad config ends the run with its message, no traceback."""
  try:
    return make_task(config)
  except ValueError as e:
    raise app.UsageError(f'bad config: {e}') from None


def make_mesh_or_exit(config):
  """The config's mesh over all devices; a mesh that does not fit ends the run with its message."""
  from vitok import sharding
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise app.UsageError(f'bad config: {e}') from None


def open_trained_run(step: int | None):
  """Start-up of the commands that read a finished or running training run (eval, export): the
  run's config (or --config), jax.distributed, a mesh over this job's devices (data-parallel
  unless --mesh says otherwise) and the TrainState layout on it, the checkpointer and the step.
  Returns (config, task, layout, checkpointer, step)."""
  from vitok import checkpoint as ckpt_lib
  config = load_config(allow_workdir_config=True)
  init_distributed()
  mesh_override(config, default='x'.join(['-1'] + ['1'] * (len(config.mesh.axes) - 1)))
  task = make_task_or_exit(config)
  mesh = make_mesh_or_exit(config)
  checkpointer = ckpt_lib.Checkpointer(workdir(), create=False)
  step = step if step is not None else checkpointer.latest_step()
  if step is None:
    raise SystemExit(f'no checkpoint in {checkpointer.directory}: train first')
  trainer.configure_runtime(config)
  return config, task, trainer.create_layout(task, config, mesh), checkpointer, step
