"""The shared training loop: mesh, sharded state, data, one compiled step, logging, evaluation,
checkpoints, resume and preemption.

A model plugs in through a small task object (see `vitok.stage1.TokenizerTask`):

    task.name, task.tokens_per_clip           task.create_model(rngs) -> nnx.Module
    task.train_flops_per_clip() -> int        task.loss_fn(model, batch, rng, frozen)
    task.frozen() -> pytree of frozen arrays  task.evaluate(graphdef, params, frozen, source,
                                                            step, workdir, mesh) -> dict
The loop itself knows nothing about the model. Every process of a multi-host run executes it;
each reads only its share of every batch, and only process 0 writes logs and samples.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from vitok import checkpoint as ckpt_lib
from vitok import config_checks, perf, sharding
from vitok import train_state as ts
from vitok.data import builders, pipeline
from vitok.writer import MetricWriter

PREEMPTED_EXIT_CODE = 143   # 128 + SIGTERM: "stopped early, resume me"


def check_config(config, task) -> None:
  """The shared fields' ranges (`config_checks.TRAINING_FIELDS`) and the best-checkpoint metric,
  which must be one the task's evaluation reports. (The task checked its own fields.)"""
  config_checks.check_fields(config, config_checks.TRAINING_FIELDS)
  if config.keep_best > 0 and config.best_metric not in task.eval_metrics:
    raise config_checks.ConfigError(
        f'config.best_metric={config.best_metric!r} is not a metric of the {task.name} '
        f'evaluation ({", ".join(task.eval_metrics)}), so keep_best={config.keep_best} would keep '
        f'nothing')


def write_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def configure_runtime(config) -> None:
  """Process-wide JAX settings the config controls (call before building any arrays)."""
  jax.config.update('jax_threefry_partitionable', bool(config.partitionable_rng))


def create_layout(task, config, mesh=None) -> ts.StateLayout:
  """The TrainState layout of `task` on `mesh` (default: the config's mesh over all devices)."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  return ts.state_layout(task.create_model, config, mesh, config.total_steps)


def abstract_batch(data_cfg) -> dict:
  """Shapes of one global training batch, as the input pipeline produces it."""
  b, t, r = data_cfg.batch_size, data_cfg.frames, data_cfg.res
  return {'video': jax.ShapeDtypeStruct((b, t, r, r, 3), np.uint8),
          'label': jax.ShapeDtypeStruct((b,), np.int32)}


def check_batch_fits(config, mesh) -> None:
  """The global training batch must split evenly over the data axes and over the processes, and
  each process's devices must hold its own block of rows. (The evaluation batch is rounded up
  to a multiple of the data-parallel size by the evaluation itself.)"""
  dp = sharding.data_parallel_size(mesh, config.sharding_rules)
  size = config.data.batch_size
  if size % dp or size % jax.process_count():
    raise ValueError(f'data.batch_size={size} must be divisible by the {dp} ways the mesh '
                     f'{dict(mesh.shape)} splits a batch and by the {jax.process_count()} '
                     f'process(es)')
  sharding.check_process_rows(sharding.batch_sharding(mesh, config.sharding_rules), size,
                              'data.batch_size')


def replicate(tree, mesh):
  """Host arrays (identical on every process) -> global arrays replicated over `mesh`."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda idx: np.asarray(x)[idx]),
      tree)


def global_batch(local_batch: dict, batch_sharding) -> dict:
  """This process's rows of a batch -> one global array per field, split over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in local_batch.items()}


def prepare_sources(data_cfg) -> dict:
  """Builds the dataset on process 0 first (others wait), so processes sharing a file system
  never write the same files at once; then every process opens it."""
  if jax.process_count() == 1:
    return builders.prepare(data_cfg)
  if jax.process_index() == 0:
    builders.prepare(data_cfg)
  multihost_utils.sync_global_devices('vitok: dataset prepared')
  return builders.prepare(data_cfg)


class Preemption:
  """Turns SIGTERM (the preemption / scancel / `kill` signal) into "save now and stop".

  Single process: a SIGTERM handler sets a flag the loop checks after each step. Multi-process:
  JAX's coordination service receives the notice and `reached_preemption_sync_point` makes all
  processes agree on the same step to save."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def restore_or_init(layout, checkpointer, train_iter):
  """The latest complete checkpoint restored onto `layout` (with the data iterator's position),
  or a fresh step-0 state. Returns (state, restored_step or None, iterator position restored)."""
  latest = checkpointer.latest_step()
  if latest is None:
    return layout.init(), None, True
  state = checkpointer.restore(layout.abstract, latest, data_iterator=train_iter)
  return state, latest, checkpointer.last_restore_had_data


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def compile_report(task, config, layout, compiled) -> dict:
  """Per-device memory and FLOPs of the compiled step, next to the analytic model FLOPs."""
  stats = perf.compiled_stats(compiled)
  num_devices = layout.mesh.size
  analytic = task.train_flops_per_clip() * config.data.batch_size / num_devices
  return dict(stats, analytic_flops=analytic, num_devices=num_devices,
              state_bytes=sharding.abstract_bytes_per_device(layout.abstract, layout.shardings))


def format_compile_report(report: dict, mesh) -> str:
  gib = 2 ** 30
  xla = report.get('flops') or 0.0
  ratio = f' (XLA/analytic {xla / report["analytic_flops"]:.2f})' if xla else ''
  return (f'compiled train step on mesh {dict(mesh.shape)}: per device '
          f'state {report["state_bytes"] / gib:.3f} GiB, '
          f'arguments {report.get("argument_bytes", 0) / gib:.3f} GiB, '
          f'temporaries {report.get("temp_bytes", 0) / gib:.3f} GiB; '
          f'{report["analytic_flops"] / 1e12:.4f} model TFLOP per step per device, '
          f'XLA counts {xla / 1e12:.4f}{ratio}')


def train(config, workdir: str, task):
  """Trains until `config.total_steps`, resuming from the latest checkpoint in `workdir`.

  Returns (final TrainState, metrics of the last evaluation or None). On SIGTERM it saves the
  current step and returns early with `state.step < total_steps` (`launch.train` then exits with
  PREEMPTED_EXIT_CODE)."""
  configure_runtime(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)      # a mesh that does not fit the devices fails here
  check_batch_fits(config, mesh)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)

  sources = prepare_sources(config.data)
  train_source = sources[config.data.train_split]
  layout = create_layout(task, config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_best=config.keep_best, best_metric=config.best_metric,
                                       best_mode=config.best_mode)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(pipeline.train_dataset(config.data, seed=config.data.seed, source=train_source,
                                           **process))
  state, resumed, iterator_restored = restore_or_init(layout, checkpointer, train_iter)
  start = int(state.step)
  if resumed is not None:
    _log(f'resumed from {checkpointer.directory}/{resumed}')
    if not iterator_restored:
      # E.g. a checkpoint written with another process count: batches are a pure function of
      # the global step, so the stream is positioned from the step instead.
      _log(f'no data-iterator state for this process in checkpoint {resumed}; '
           f'positioning the input stream at step {start}')
      if hasattr(train_iter, 'close'):
        train_iter.close()          # stops its worker processes, if any
      train_iter = pipeline.train_iterator(config.data, seed=config.data.seed, start_step=start,
                                           source=train_source, **process)

  frozen = replicate(task.frozen(), mesh)
  started = time.perf_counter()
  step_fn = ts.compile_train_step(layout, task.loss_fn, config.optim.ema_decay,
                                  abstract_batch(config.data), frozen)
  report = compile_report(task, config, layout, step_fn)
  n_params = sum(x.size for x in jax.tree.leaves(layout.abstract.params))
  _log(f'{task.name}: {n_params / 1e6:.2f}M parameters, steps {start} -> {config.total_steps}, '
       f'{jax.process_count()} process(es), {mesh.size} devices, workdir {workdir}')
  _log(format_compile_report(report, mesh) + f'; compile {time.perf_counter() - started:.1f} s')
  whole = sharding.undivided(layout.abstract.params, mesh, config.sharding_rules)
  if whole:
    _log(f'{len(whole)} parameter dimensions stay whole because their mesh axis does not divide '
         f'them, e.g. {"; ".join(whole[:3])}')

  peak_flops, peak_source = perf.peak_flops_per_device(jax.local_devices()[0], config.peak_tflops)
  batch_sharding = sharding.batch_sharding(mesh, config.sharding_rules)
  writer = MetricWriter(workdir) if is_main else None
  preemption = Preemption()
  pending, last_eval = [], None
  timer = perf.StepTimer()

  def run_eval(step):
    result = task.evaluate(layout.graphdef, ts.eval_params(state), frozen,
                           sources[config.data.eval_split], step, workdir, mesh)
    if writer:
      writer.scalars(step, {k: v for k, v in result.items() if isinstance(v, float)}, 'eval/')
    return result

  progress = tqdm(range(start, config.total_steps), initial=start, total=config.total_steps,
                  desc=task.name, dynamic_ncols=True, mininterval=2.0, disable=not is_main)
  for step in progress:
    with timer.data_wait():
      batch = global_batch(next(train_iter), batch_sharding)
    state, metrics = step_fn(state, batch, frozen)   # async: the host runs ahead of the device
    timer.step()
    pending.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      # The only device->host transfer of the loop: the metrics of the interval.
      interval = jax.device_get(pending)
      lap = timer.lap()
      values = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
      values.update(perf.throughput(
          step_seconds=lap['step_time_s'], global_batch=config.data.batch_size,
          tokens_per_clip=task.tokens_per_clip,
          flops_per_step_per_device=report['analytic_flops'], peak_flops=peak_flops,
          num_devices=mesh.size))
      values['data_wait_fraction'] = lap['data_wait_fraction']
      pending = []
      if writer:
        writer.scalars(done, values, prefix='train/')
      progress.set_postfix(loss=f"{values['loss']:.4f}", psnr=f"{values.get('train_psnr', 0):.2f}",
                           mfu=f"{values['mfu']:.3f}")
    eval_now = done % config.eval_every == 0 or done == config.total_steps
    # Every process asks every step: multi-host preemption is agreed on at a common step.
    preempted = preemption.reached(done) and done < config.total_steps
    save_now = done % config.ckpt_every == 0 or done == config.total_steps or preempted
    if eval_now or save_now:
      jax.block_until_ready(state)   # steps still queued on the device count as training time
      with timer.excluded():         # evaluation and saving do not
        if eval_now:
          last_eval = run_eval(done)
          if is_main:
            progress.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in last_eval.items()}))
        if save_now:
          checkpointer.save(done, state, data_iterator=train_iter,
                            metrics=last_eval if eval_now else None)
    if preempted:
      _log(f'SIGTERM: saved step {done} to {checkpointer.directory}; '
           f'rerun the same command to resume')
      break
  progress.close()
  _log(f'peak FLOP/s per device for MFU: {peak_flops / 1e12:.2f} TFLOP/s ({peak_source})')
  if start >= config.total_steps:
    _log(f'nothing to train: checkpoint step {start} already reached total_steps='
         f'{config.total_steps} (raise --config.total_steps to continue)')
  preemption.close()
  checkpointer.close()          # waits for the last asynchronous save to be committed
  if writer:
    writer.close()
  return state, last_eval
