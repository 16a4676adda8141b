"""Post-tuning a trained DiT for longer clips (ExVideo): start from a finished run and train only
its time parameters.

    --config.finetune.start=DIT_RUN --config.finetune.trainable=time \
    --config.latents.window=8 --config.model.frame_positions=8

ExVideo extends a short-clip video model to longer clips by tuning only its temporal modules, with
the extended temporal position embeddings initialised cyclically from the old ones. This DiT has
full 3-D attention (no temporal-only layers); its time parameters are the stride embedding and
the learned per-frame embedding (`model.frame_positions`), both zero-initialised, so a model
trained without them starts post-tuning exactly as it was. Everything else is frozen: no gradient,
no optimizer state, its value kept bit for bit (train_state.ParamGroups).

A MATE DiT (model.mixer='mate') has no length-bound parameter: its scans and windows are functions
of the clip, and its positions too unless it has a frame table. LinGen extends it to longer videos
by training on them (progressive training); here that is post-tuning with trainable='all' from the
shorter run: every parameter starts as the run's, and nothing but the windows' length changes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dit import model as dit_model
from vitok.core import config_checks, sharding, train_state

TIME_PARAMETERS = ('stride_embed', 'frame_embed')  # what finetune.trainable='time' trains


def is_time_parameter(path: tuple[str, ...]) -> bool:
  return any(name in path for name in TIME_PARAMETERS)


def param_groups(config, total_steps: int) -> train_state.ParamGroups | None:
  """finetune.trainable='time': one AdamW over the time parameters, every other one frozen;
  'all': the default single optimizer (None)."""
  if config.finetune.trainable == 'all':
    return None
  tx, schedule = train_state.make_optimizer(config.optim, config.data.batch_size, total_steps)
  group = lambda path: 'time' if is_time_parameter(path) else None
  return train_state.ParamGroups(group=group, optimizers={'time': tx}, schedule=schedule)


def _leaves_by_path(params) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {train_state.names(path): leaf for path, leaf in flat}


def warm_start(config, model_cfg, params, mesh) -> tuple[object, dict | None]:
  """With finetune.start: `params` replaced by that finished DiT run's (its EMA when it kept one)
  wherever they have this model's shape; a longer frame table starts as the run's repeated
  cyclically (ExVideo); parameters the run lacks (a new stride embedding) keep their zero
  initialisation. Returns the parameters and the count of what is trained (printed too)."""
  source = config.finetune.start
  if not source:
    return params, None
  trained, where = open_dit_params(source, model_cfg, mesh, config.sharding_rules)
  trained = _leaves_by_path(trained)

  def take(path, value):
    old = trained.get(path)
    if old is None:
      return value
    if old.shape == value.shape:
      return old
    if 'frame_embed' in path and old.shape[1:] == value.shape[1:]:
      repeats = -(-value.shape[0] // old.shape[0])
      return jax.device_put(jnp.tile(old, (repeats, 1))[: value.shape[0]], value.sharding)
    raise config_checks.ConfigError(
        f'config.finetune.start={source}: its parameter {"/".join(path)} has shape '
        f'{old.shape}, this model needs {value.shape}'
    )

  params = jax.tree_util.tree_map_with_path(lambda p, v: take(train_state.names(p), v), params)
  leaves = _leaves_by_path(params)
  trainable = leaves
  if config.finetune.trainable == 'time':
    trainable = {path: v for path, v in leaves.items() if is_time_parameter(path)}
  parts = {}
  for path, value in trainable.items():
    parts[path[0]] = parts.get(path[0], 0) + int(value.size)
  count, total = sum(parts.values()), sum(int(v.size) for v in leaves.values())
  print(
      f'post-tuning from {where}: {count:,} of {total:,} parameters trained '
      f'({100 * count / total:.2f}%: '
      + ', '.join(f'{name} {n:,}' for name, n in sorted(parts.items()))
      + ')',
      flush=True,
  )
  return params, {'trainable_params': count, 'total_params': total, 'trainable_parts': parts}


def open_dit_params(directory: str, model_cfg: dit_model.DiTConfig, mesh, rules):
  """The parameters (the EMA when the run kept one) of the newest checkpoint that restores of the
  DiT run in `directory`, sharded by `rules` on `mesh`, and where they are from. The run's model
  is `model_cfg` with the run's own variant and long-video options (which post-tuning may
  change)."""
  from vitok.core import checkpoint as ckpt_lib  # checkpoint I/O only where it is needed

  path = os.path.join(directory, 'config.json')
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise config_checks.ConfigError(
        f'config.finetune.start={directory} is not a DiT run: cannot read {path}: '
        f'{type(e).__name__}: {e}'
    ) from None
  if config.get('task') != 'dit':
    raise config_checks.ConfigError(
        f'config.finetune.start={directory} is a {config.get("task", "vitok")} run, not a DiT'
    )
  model = config['model']
  if model.get('mixer', 'attention') != model_cfg.mixer:
    raise config_checks.ConfigError(
        f'config.finetune.start={directory} has model.mixer={model.get("mixer", "attention")!r}; '
        f'this run has {model_cfg.mixer!r}: post-tuning keeps the mixer'
    )
  strides = tuple(int(s) for s in str(model.get('strides', '')).split(',') if s.strip())
  source_cfg = dataclasses.replace(
      model_cfg,
      variant=model['variant'],
      recipe=model.get('recipe', model_cfg.recipe),
      frame_mask=bool(model.get('frame_mask', False)),
      strides=strides,
      frame_positions=int(model.get('frame_positions', 0)),
      ssd_state=int(model.get('ssd_state', model_cfg.ssd_state)),
      review_tokens=bool(model.get('review_tokens', model_cfg.review_tokens)),
  )
  abstract = nnx.eval_shape(lambda: dit_model.DiT(source_cfg, rngs=nnx.Rngs(0)))
  params = sharding.abstract_placed(nnx.split(abstract, nnx.Param)[1], mesh, rules)
  checkpointer = ckpt_lib.Checkpointer(directory, create=False)
  if checkpointer.latest_step() is None:
    raise ckpt_lib.CheckpointError(f'config.finetune.start={directory} has no checkpoint')
  ema = config.get('optim', {}).get('ema_decay', 0) > 0
  restored = checkpointer.restore_params(params, ema=ema)
  where = f'step {checkpointer.restored_step} of {directory} ({"EMA" if ema else "raw"})'
  checkpointer.close()
  return restored, where
