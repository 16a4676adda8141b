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
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, samples.')


def quiet_library_logs() -> None:
  """Orbax and tfds log every step of every save at INFO: show warnings and up unless the user
  asked for a verbosity (--verbosity=0 brings INFO back)."""
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def workdir() -> str | None:
  return os.path.abspath(os.path.expanduser(_WORKDIR.value)) if _WORKDIR.value else None


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
