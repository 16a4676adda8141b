"""The shared training loop: data, state, jitted step, logging, evaluation, checkpoints, resume.

A model plugs in through a small task object (see `vitok.stage1.TokenizerTask`):

    task.create_model(rngs) -> nnx.Module        task.loss_fn(model, batch, rng, frozen)
    task.frozen() -> pytree of frozen arrays      task.evaluate(graphdef, params, frozen, source,
                                                                step, workdir) -> dict
The loop itself knows nothing about the model.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from vitok import checkpoint as ckpt_lib
from vitok import train_state as ts
from vitok.data import builders, pipeline
from vitok.writer import MetricWriter


def check_known_fields(config, reference, path: str = 'config') -> None:
  """Every field of `config` must exist in `reference` (the config file's defaults): a typo such
  as `optim.learning_rate` fails at start-up instead of being silently ignored."""
  for key in config.keys():
    if key not in reference:
      raise ValueError(f'unknown config field {path}.{key}; known fields of {path}: '
                       f'{", ".join(sorted(reference.keys()))}')
    if hasattr(config[key], 'keys') and hasattr(reference[key], 'keys'):
      check_known_fields(config[key], reference[key], f'{path}.{key}')


def write_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def create_state(task, config, total_steps: int):
  """Model, optimizer and step-0 state. Returns (graphdef, state, tx, schedule)."""
  model = task.create_model(nnx.Rngs(params=config.seed))
  tx, schedule = ts.make_optimizer(config.optim, config.data.batch_size, total_steps)
  rng = jax.random.PRNGKey(config.seed + 1)
  graphdef, state = ts.init_train_state(model, tx, rng, ema=config.optim.ema_decay > 0)
  return graphdef, state, tx, schedule


def restore_or_init(task, config, checkpointer: ckpt_lib.Checkpointer):
  graphdef, state, tx, schedule = create_state(task, config, config.total_steps)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(ckpt_lib.abstract_like(state), latest)
    print(f'resumed from {checkpointer.directory}/{latest}', flush=True)
  return graphdef, state, tx, schedule


def train(config, workdir: str, task):
  """Trains until `config.total_steps`, resuming from the latest checkpoint in `workdir`.
  Returns (final TrainState, metrics of the last evaluation or None)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  write_config(config, workdir)

  sources = builders.prepare(config.data)
  train_source = sources[config.data.train_split]

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  graphdef, state, tx, schedule = restore_or_init(task, config, checkpointer)
  start = int(state.step)
  # Until the iterator state is checkpointed (multi-host issue), a resumed run draws a fresh shuffle
  # seeded by its start step instead of replaying the batches it has already seen.
  train_iter = iter(pipeline.train_dataset(config.data, seed=config.data.seed + start,
                                           source=train_source))
  frozen = task.frozen()
  step_fn = jax.jit(ts.make_train_step(graphdef, task.loss_fn, tx, schedule,
                                       config.optim.ema_decay), donate_argnums=0)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{task.name}: {n_params / 1e6:.2f}M parameters, steps {start} -> {config.total_steps}, '
        f'workdir {workdir}', flush=True)
  writer = MetricWriter(workdir)
  batch_size = config.data.batch_size
  pending, last_eval = [], None
  last_time, last_step = time.perf_counter(), start

  def run_eval(step):
    result = task.evaluate(graphdef, ts.eval_params(state), frozen, sources[config.data.eval_split],
                           step, workdir)
    writer.log(step, result, prefix='eval/')
    return result

  progress = tqdm(range(start, config.total_steps), initial=start, total=config.total_steps,
                  desc=task.name, dynamic_ncols=True, mininterval=2.0)
  for step in progress:
    batch = next(train_iter)
    state, metrics = step_fn(state, batch, frozen)   # async: the host runs ahead of the device
    pending.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      # The only device->host transfer of the loop: the averaged metrics of the interval.
      interval = jax.device_get(pending)
      values = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
      now = time.perf_counter()
      values['steps_per_s'] = (done - last_step) / (now - last_time)
      values['clips_per_s'] = values['steps_per_s'] * batch_size
      last_time, last_step, pending = now, done, []
      writer.scalars(done, values, prefix='train/')
      progress.set_postfix(loss=f"{values['loss']:.4f}", psnr=f"{values.get('train_psnr', 0):.2f}")
    if done % config.ckpt_every == 0 or done == config.total_steps:
      checkpointer.save(done, state)
    if done % config.eval_every == 0 or done == config.total_steps:
      last_eval = run_eval(done)
      last_time = time.perf_counter()   # evaluation time does not count as training throughput
      progress.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in last_eval.items()}))
  progress.close()
  if start >= config.total_steps:
    print(f'nothing to train: checkpoint step {start} already reached total_steps='
          f'{config.total_steps} (raise --config.total_steps to continue)', flush=True)
  checkpointer.close()
  writer.close()
  return state, last_eval
