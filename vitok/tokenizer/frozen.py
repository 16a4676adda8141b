"""A trained tokenizer, frozen, for another job (the DiT, latent caching, tiled reconstruction).

The run's `config.json` fixes the architecture: the model config is built from its `model` fields
directly, and only the tokenizer's parameters are read, from an export of `launch.export`
(`params/`) or from a training workdir (its newest checkpoint that restores; the EMA when the run
kept one). A stage-2 run holds the tokenizer beside its discriminator: the restore reads the
`tokenizer` subtree alone (an Orbax partial restore), so nothing of stage 2's objective is needed.

    frozen = open_tokenizer('/models/sb4x8')          # .params, .graphdef, .model_cfg, .source
    model = load_tokenizer('/models/sb4x8')           # model.encode(video) / model.decode(z)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import ml_collections
from flax import nnx

from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, export, hardware, sharding
from vitok.tokenizer import model as tokenizer

STAGE2_TASK = 'vitok_stage2'  # config.task of an adversarial stage-2 run (configs/vitok_stage2.py)
STAGE2_SUBTREE = 'tokenizer'  # where a stage-2 run keeps the tokenizer (stage2.Stage2Model)


def model_config(model_fields, frames: int, res: int) -> tokenizer.TokenizerConfig:
  """The tokenizer config of `model_fields` (a config's `model`) for frames x res x res clips, with
  dtype='auto' and attention='auto' resolved for the compile target (vitok/core/hardware.py). Fails
  at start-up, naming data.frames / data.res, when the clip does not tile into tubelets."""
  model_cfg = tokenizer.TokenizerConfig.from_config(hardware.with_compute_dtype(model_fields))
  tokens = math.prod(model_cfg.latent_grid(frames, res))
  if model_cfg.attention == 'auto':  # the kernel for the target and the token count
    attention = hardware.auto_attention(tokens, model_cfg.dtype)[0]
    model_cfg = dataclasses.replace(model_cfg, attention=attention)
  model_cfg.check_backend(hardware.target_platform())
  return model_cfg


def read_tokenizer_config(directory: str) -> ml_collections.ConfigDict:
  """The config.json of a tokenizer export (`launch.export`) or training workdir."""
  path = os.path.join(directory, 'config.json')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise config_checks.ConfigError(
        f'{directory} is not a tokenizer (an export of launch.export or a training workdir): '
        f'cannot read {path}: {type(e).__name__}: {e}'
    ) from None


def abstract_tokenizer_params(model_cfg: tokenizer.TokenizerConfig, mesh, rules):
  """The parameters of a tokenizer of `model_cfg` as ShapeDtypeStructs sharded by `rules` on
  `mesh`, and its graphdef: the restore target of a frozen tokenizer (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: tokenizer.ViTok(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, sharding.abstract_placed(params, mesh, rules)


class FrozenTokenizer(NamedTuple):
  config: Any  # the tokenizer run's config
  model_cfg: tokenizer.TokenizerConfig  # resolved for the run's clips on this target
  graphdef: Any
  params: Any  # nnx.State of the parameters, sharded by the config's rules on the mesh
  source: str  # what was read: the export, or checkpoint step N (EMA or raw)


def open_tokenizer(directory: str, mesh=None, rules=None) -> FrozenTokenizer:
  """The tokenizer of `directory` (an export or a training workdir, stage 1 or stage 2), frozen.
  Parameters are sharded by `rules` (default: the tokenizer config's) on `mesh` (default: all
  devices, data-parallel)."""
  config = read_tokenizer_config(directory)
  if mesh is None:
    config.mesh.shape = [-1] + [1] * (len(config.mesh.axes) - 1)
    mesh = sharding.make_mesh(config.mesh)
  model_cfg = model_config(config.model, config.data.frames, config.data.res)
  rules = config.sharding_rules if rules is None else rules
  graphdef, abstract = abstract_tokenizer_params(model_cfg, mesh, rules)
  subtree = STAGE2_SUBTREE if config.get('task') == STAGE2_TASK else ''
  if os.path.isdir(os.path.join(directory, 'params')):
    params = export.load_params(os.path.join(directory, 'params'), abstract, subtree=subtree)
    return FrozenTokenizer(config, model_cfg, graphdef, params, f'the export {directory}')
  checkpointer = ckpt_lib.Checkpointer(directory, create=False)
  if checkpointer.latest_step() is None:
    raise ckpt_lib.CheckpointError(
        f'{directory} has neither exported parameters (params/) nor checkpoints: train or '
        'export the tokenizer first'
    )
  ema = config.optim.ema_decay > 0
  params = checkpointer.restore_params(abstract, ema=ema, subtree=subtree)
  step = checkpointer.restored_step
  source = f'step {step} of {directory} ({"EMA" if ema else "raw"} parameters)'
  return FrozenTokenizer(config, model_cfg, graphdef, params, source)


def load_tokenizer(directory: str, mesh=None) -> tokenizer.ViTok:
  """The tokenizer of `directory` (see `open_tokenizer`) ready for inference:
  `model.encode(video)` / `model.decode(z)`, its parameters placed by the config's sharding rules
  on `mesh` (default: every device, data-parallel, i.e. replicated)."""
  frozen = open_tokenizer(directory, mesh)
  return nnx.merge(frozen.graphdef, frozen.params)
