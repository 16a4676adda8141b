"""The model families the launch commands serve, selected by `config.task`.

Each family names its config file (whose `base_config()` holds every field the family accepts,
for the unknown-field check) and its `vitok.core.task.Task` class. Both are imported only when
the family is used, so a run of one family never imports the other.
"""

from __future__ import annotations

import dataclasses
import importlib

from vitok.core import config_checks


@dataclasses.dataclass(frozen=True)
class Family:
  config_module: str  # the family's config file, as a module
  task_class: str  # 'module:Class' of its Task

  def base_config(self):
    return importlib.import_module(self.config_module).base_config()

  def task(self, config):
    module, name = self.task_class.split(':')
    return getattr(importlib.import_module(module), name)(config)


FAMILIES: dict[str, Family] = {
    'vitok': Family('configs.vitok', 'vitok.tokenizer.stage1:TokenizerTask'),
    'vitok_stage2': Family('configs.vitok_stage2', 'vitok.tokenizer.stage2:Stage2Task'),
    'dit': Family('configs.dit', 'dit.task:DiTTask'),
}
DEFAULT = 'vitok'  # the family of runs whose config.json predates config.task

# Evaluation cadences before config.evals: old field -> (evaluator, what its 0 meant there).
_TOKENIZER_CADENCES = {
    'eval_every': ('reconstruction', 0),
    'fvd_every': ('rfvd', -1),  # 0: only in launch.eval
    'fid_every': ('rfid', -1),
}
OLD_CADENCES = {
    'vitok': _TOKENIZER_CADENCES,
    'vitok_stage2': _TOKENIZER_CADENCES,
    'dit': {
        'eval_every': ('loss', 0),
        'sample.every': ('samples', 0),  # 0: at the end only
        'accuracy.every': ('class_accuracy', 0),
        'generation.every': ('generation', -1),  # 0: only in launch.eval
    },
}


def family_of(config) -> Family:
  """The family `config.task` names (runs saved before the field existed are ViTok runs)."""
  name = config.get('task', DEFAULT)
  if name not in FAMILIES:
    raise config_checks.ConfigError(
        f'config.task={name!r} is not a model family; known: {", ".join(FAMILIES)}'
    )
  return FAMILIES[name]


def make_task(config):
  """Validates `config` (unknown fields against its family's defaults, the shared ranges, the
  family's own fields) and returns its Task. Raises ConfigError (or ValueError) naming the field.
  What needs the task's evaluators or the devices (the best-checkpoint metric, the mesh, the
  batch split) training checks at start-up (`vitok.core.trainer.start_run`), once."""
  family = family_of(config)
  if 'task' not in config:
    with config.unlocked():
      config.task = DEFAULT
  read_old_cadences(config, family.base_config())
  config_checks.check_known_fields(config, family.base_config())
  config_checks.check_fields(config, config_checks.TRAINING_FIELDS)  # before the task reads them
  return family.task(config)


def read_old_cadences(config, defaults) -> None:
  """A config from before config.evals (the config.json of an older run): its cadence fields read
  into config.evals (the family's defaults for the rest), with a one-line note."""
  old = OLD_CADENCES[config.get('task', DEFAULT)]
  found = {}
  for dotted in old:
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node.get(name) if hasattr(node, 'get') else None
    if node is not None and hasattr(node, 'keys') and leaf in node:
      found[dotted] = node
  if not found:
    return
  with config.unlocked():
    if 'evals' not in config:
      config.evals = defaults.evals
    renamed = []
    for dotted, node in found.items():
      name, zero = old[dotted]
      value = int(node[dotted.split('.')[-1]])
      del node[dotted.split('.')[-1]]
      config.evals[name].every = zero if value == 0 else value
      renamed.append(f'{dotted}={value} -> evals.{name}.every={config.evals[name].every}')
  print(f'a config from before config.evals: read {"; ".join(renamed)}', flush=True)
