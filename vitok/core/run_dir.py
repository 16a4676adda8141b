"""The files a run keeps in its workdir beside the checkpoints: config.json (written atomically;
what a resumed or evaluated run reads back) and metrics.jsonl (one JSON line per evaluation, for
every model family); and the check that a workdir can be written."""

from __future__ import annotations

import json
import os

import jax

from vitok.core import config_checks


def write_config(config, workdir: str) -> None:
  """WORKDIR/config.json, replaced atomically (a crash never leaves half a file)."""
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + '.tmp', path)


def config_differences(saved_path: str, config) -> list[str]:
  """['model.channels: 16 -> 8', ...]: the fields in which `config` differs from the config a run
  saved at `saved_path` (empty when that file is missing or unreadable)."""
  try:
    with open(saved_path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return []

  def flat(tree, prefix=''):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out.update(flat(value, f'{prefix}{key}.'))
      else:
        out[prefix + key] = value
    return out

  old, new = flat(saved), flat(json.loads(config.to_json_best_effort()))  # tuples as lists
  return [
      f'{k}: {old.get(k, "(absent)")} -> {new.get(k, "(absent)")}'
      for k in sorted(set(old) | set(new))
      if old.get(k) != new.get(k)
  ]


def check_workdir(workdir: str, flag: str = '--workdir') -> None:
  """`workdir` must be a directory this process can write, or creatable as one."""
  path = workdir
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise config_checks.ConfigError(f'{flag}={workdir}: {path} is a file, not a directory')
  if not os.access(path, os.W_OK | os.X_OK):
    raise config_checks.ConfigError(f'{flag}={workdir}: {path} is not writable')


def append_metrics(workdir: str, result: dict) -> None:
  """One JSON line per evaluation in WORKDIR/metrics.jsonl, for every model family (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(result) + '\n')
