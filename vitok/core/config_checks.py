"""Start-up checks of an experiment config: unknown fields, numbers out of range, unknown choices.

A bad value must fail when the run starts, naming the field and what it accepts, instead of late
(`ckpt_every=0`: ZeroDivisionError in the loop) or never (a negative learning rate trains). Each
layer declares the ranges of the fields it reads: `TRAINING_FIELDS` below for the shared
infrastructure (loop, optimizer, checkpoints, data), a model family for its own fields (e.g.
`vitok.tokenizer.stage1.LOSS_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from vitok.data import DATASET_NAMES


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Range:
  """Numbers in [low, high] (either bound optional; an `open` end excludes the bound). Floats must
  be finite; `note` says what special values mean."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  note: str = ''

  def __contains__(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def __str__(self) -> str:
    if self.low is None and self.high is None:
      return 'a finite number' + (f' ({self.note})' if self.note else '')
    if self.low is not None and self.high is not None:
      text = (
          f'in {"(" if self.low_open else "["}{self.low}, {self.high}'
          f'{")" if self.high_open else "]"}'
      )
    elif self.low is not None:
      text = f'{">" if self.low_open else ">="} {self.low}'
    else:
      text = f'{"<" if self.high_open else "<="} {self.high}'
    return f'a number {text}' + (f' ({self.note})' if self.note else '')


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple

  def __contains__(self, value) -> bool:
    return value in self.choices

  def __str__(self) -> str:
    return 'one of ' + ', '.join(repr(c) for c in self.choices)


AT_LEAST_1 = Range(1)
EVAL_EVERY = Range(-1, note='0 = at the last step only, -1 = not during training')
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
DECAY = Range(0, 1, high_open=True)

# The fields the shared training infrastructure reads.
TRAINING_FIELDS: dict[str, Range | OneOf] = {
    'seed': NON_NEGATIVE,
    'total_steps': AT_LEAST_1,
    'log_every': AT_LEAST_1,
    'ckpt_every': AT_LEAST_1,
    'keep_checkpoints': AT_LEAST_1,
    'keep_best': NON_NEGATIVE,
    'best_mode': OneOf(('max', 'min')),
    'num_eval_videos': NON_NEGATIVE,
    'peak_tflops': Range(0, note='0 = the table of device peaks'),
    'optim.lr': Range(0, note="0 = the paper's rule 1e-4 x batch / 256"),
    'optim.b1': DECAY,
    'optim.b2': DECAY,
    'optim.weight_decay': NON_NEGATIVE,
    'optim.warmup_steps': NON_NEGATIVE,
    'optim.end_lr_fraction': FRACTION,
    'optim.clip_norm': Range(0, note='0 = no clipping'),
    'optim.ema_decay': Range(0, 1, high_open=True, note='0 = no EMA'),
    'data.name': OneOf(DATASET_NAMES),
    'data.frames': AT_LEAST_1,
    'data.res': AT_LEAST_1,
    'data.frame_stride': AT_LEAST_1,
    'data.batch_size': AT_LEAST_1,
    'data.eval_batch_size': AT_LEAST_1,
    'data.num_workers': NON_NEGATIVE,
    'data.crop_min_scale': Range(0, 1, low_open=True),
    'data.clip_frames': Range(0, note='0 = frames x frame_stride'),
    'data.store_short_side': Range(0, note='0 = res'),
    'data.clip_stride': Range(0, note='0 = clip_frames'),
    'data.max_clips_per_video': Range(0, note='0 = all'),
    'data.ucf_fold': OneOf((1, 2, 3)),
    'data.holdout_fraction': FRACTION,
    'data.seed': NON_NEGATIVE,
}


def check_known_fields(config, reference, path: str = 'config') -> None:
  """Every field of `config` must exist in `reference` (the config file's defaults): a typo such
  as `optim.learning_rate` fails at start-up instead of being silently ignored."""
  for key in config.keys():
    if key not in reference:
      raise ConfigError(_unknown(path, key, reference))
    if hasattr(config[key], 'keys') and hasattr(reference[key], 'keys'):
      check_known_fields(config[key], reference[key], f'{path}.{key}')


def add_missing_defaults(config, defaults, path: str = 'config') -> list[str]:
  """Gives `config` (a run's saved config.json) every field of `defaults` (its family's current
  config) that it lacks, with the default value; returns their dotted names. A field added to a
  family keeps the old behaviour as its default, so an older run reads back as it ran."""
  added = []
  for key in defaults.keys():
    if key not in config:
      with config.unlocked():
        config[key] = defaults[key]
      added.append(f'{path}.{key}')
    elif hasattr(config[key], 'keys') and hasattr(defaults[key], 'keys'):
      added += add_missing_defaults(config[key], defaults[key], f'{path}.{key}')
  return added


def unknown_field_message(dotted: str, reference) -> str:
  """The message for the first component of `dotted` ('config.a.b') that `reference` (the whole
  config) lacks."""
  node, path = reference, 'config'
  for name in dotted.split('.')[1:]:
    if not hasattr(node, 'keys') or name not in node:
      return _unknown(path, name, node)
    node, path = node[name], f'{path}.{name}'
  return f'{dotted} is a known field'


def _unknown(path: str, name: str, node) -> str:
  known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: it is a value)'
  return f'unknown config field {path}.{name}; known fields of {path}: {known}'


def lookup(config, dotted: str, default: Any = None) -> Any:
  """config['a']['b'] for 'a.b', or `default` when a component is missing."""
  node = config
  for name in dotted.split('.'):
    if not hasattr(node, 'keys') or name not in node:
      return default
    node = node[name]
  return node


def check_fields(config, fields: Mapping[str, Range | OneOf]) -> None:
  """Raises ConfigError naming the first field of `fields` whose value `config` holds is not
  accepted (fields the config lacks are skipped)."""
  missing = object()
  for dotted, accepted in fields.items():
    value = lookup(config, dotted, missing)
    if value is not missing and value not in accepted:
      raise ConfigError(f'config.{dotted}={value!r} is not accepted: it must be {accepted}')
