"""The shared training loop: mesh, sharded state, data, one compiled step, logging, evaluation,
checkpoints, resume and preemption.

A model family plugs in through a `vitok.core.task.Task`; the loop knows nothing else about it.
`train` is `start_run` (everything that can fail, writing nothing into the workdir) followed by
`run_loop` (steps, logs, evaluations, saves, signals). Every process of a multi-host run executes
both; each reads only its share of every batch, and only process 0 writes logs and samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, hardware, perf, run_dir, sharding, signals
from vitok.core import task as task_lib
from vitok.core import train_state as ts
from vitok.core.writer import MetricWriter

PREEMPTED_EXIT_CODE = signals.EXIT_CODES['SIGTERM']


class TrainResult(NamedTuple):
  state: Any  # the final TrainState
  last_eval: dict | None  # metrics of the last evaluation
  stopped_by: str | None  # 'SIGTERM' / 'SIGINT' when a signal stopped the run early (step saved)


def check_best_metric(config, task) -> None:
  """keep_best ranks checkpoints by `best_metric`: it must be one the task's evaluators report."""
  metrics = task_lib.evaluation_metrics(task)
  if config.keep_best > 0 and config.best_metric not in metrics:
    raise config_checks.ConfigError(
        f'config.best_metric={config.best_metric!r} is not a metric of the {task.name} '
        f'evaluation ({", ".join(metrics)}), so keep_best={config.keep_best} would keep '
        f'nothing'
    )


def configure_runtime(config) -> None:
  """Process-wide JAX settings the config controls (call before building any arrays)."""
  jax.config.update('jax_threefry_partitionable', bool(config.partitionable_rng))


def create_layout(task, config, mesh=None) -> ts.StateLayout:
  """The TrainState layout of `task` on `mesh` (default: the config's mesh over all devices)."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  groups = task.param_groups(config.total_steps) if hasattr(task, 'param_groups') else None
  return ts.state_layout(task.create_model, config, mesh, config.total_steps, groups)


def check_context_split(task, config, mesh) -> None:
  """A context mesh axis must split the tokens of every attention stack of the task (and, for
  all-to-all, its heads): `task.attention_stacks()` -> [(name, tokens, heads, scheme)]."""
  for name, tokens, heads, scheme in getattr(task, 'attention_stacks', lambda: [])():
    try:
      sharding.check_context_split(mesh, config.sharding_rules, tokens, heads, scheme, name)
    except ValueError as e:
      raise config_checks.ConfigError(str(e)) from None


def check_batch_fits(config, mesh) -> None:
  """The global training batch must split evenly over the data axes and over the processes, and
  each process's devices must hold its own block of rows. (The evaluation batch is rounded up
  to a multiple of the data-parallel size by the evaluation itself.)"""
  dp = sharding.data_parallel_size(mesh, config.sharding_rules)
  size = config.data.batch_size
  if size % dp or size % jax.process_count():
    raise config_checks.ConfigError(
        f'data.batch_size={size} must be divisible by the {dp} ways the mesh '
        f'{dict(mesh.shape)} splits a batch and by the {jax.process_count()} '
        f'process(es)'
    )
  sharding.check_process_rows(
      sharding.batch_sharding(mesh, config.sharding_rules), size, 'data.batch_size'
  )


def global_batch(local_batch: dict, batch_sharding) -> dict:
  """This process's rows of a batch -> one global array per field, split over the data axes."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local_batch.items()
  }


def prepare_data(task) -> dict:
  """The task's data splits, built on process 0 first (the others wait), so processes sharing a
  file system never write the same files at once; then every process opens them."""
  if jax.process_count() == 1:
    return task.prepare_data()
  if jax.process_index() == 0:
    task.prepare_data()
  multihost_utils.sync_global_devices('vitok: dataset prepared')
  return task.prepare_data()


def restore_or_init(layout, checkpointer, train_iter, config, workdir: str):
  """The newest checkpoint that restores onto `layout` (damaged ones are skipped, see
  `Checkpointer.restore`), with the data iterator's position, or a fresh step-0 state when the
  run has no checkpoint. Returns (state, restored step or None, iterator position restored).
  A run whose checkpoints hold other arrays than this config builds raises ConfigError naming the
  arrays and the fields that differ from the run's config.json."""
  if checkpointer.latest_step() is None:
    return layout.init(), None, True
  try:
    state = checkpointer.restore(layout.abstract, data_iterator=train_iter)
  except ckpt_lib.CheckpointMismatch as e:
    fields = run_dir.config_differences(os.path.join(workdir, 'config.json'), config)
    raise config_checks.ConfigError(
        f'this config does not match the checkpoints of the run in {workdir}: {e}. Fields that '
        f"differ from the run's config.json: {'; '.join(fields) or 'none (no config.json)'}. "
        f"Resume with the run's own config, or start this one in another --workdir"
    ) from None
  return state, checkpointer.restored_step, checkpointer.last_restore_had_data


def warm_started(state: ts.TrainState, params) -> ts.TrainState:
  """A fresh state whose parameters (and EMA) start from `params` (e.g. a finished stage-1 run);
  the optimizer state is the fresh one (its moments do not depend on the parameter values)."""
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, ema_params=ema)


def positioned_iterator(task, sources, train_iter, start: int, restored: bool, process: dict):
  """The training iterator at global step `start`: the checkpoint's iterator when it is where the
  step says (batches are a pure function of the step, so its state must equal that of an iterator
  positioned at the step), else a new one positioned at the step. (Positioning needs to know
  grain's iterator state; for a version it does not know, a restored iterator is trusted.)"""
  try:
    at_step = task.train_iterator(sources, start, **process)
  except NotImplementedError:
    if restored:
      return train_iter
    raise
  if restored and train_iter.get_state() == at_step.get_state():
    _close(at_step)
    return train_iter
  _log(
      "the checkpoint's data-iterator state "
      + (
          f'{train_iter.get_state()} does not match its step {start} (damaged?)'
          if restored
          else 'is not there for this process (e.g. saved with another process count)'
      )
      + f'; positioning the input stream at step {start}'
  )
  _close(train_iter)
  return at_step


def _close(iterator) -> None:
  if hasattr(iterator, 'close'):
    iterator.close()  # stops its worker processes, if any


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def compile_report(task, config, layout, compiled) -> dict:
  """Per-device memory and FLOPs of the compiled step, next to the analytic model FLOPs."""
  stats = perf.compiled_stats(compiled)
  num_devices = layout.mesh.size
  analytic = task.train_flops_per_clip() * config.data.batch_size / num_devices
  return dict(
      stats,
      analytic_flops=analytic,
      num_devices=num_devices,
      state_bytes=sharding.abstract_bytes_per_device(layout.abstract, layout.shardings),
  )


def format_compile_report(report: dict, mesh) -> str:
  gib = 2**30
  xla = report.get('flops') or 0.0
  ratio = f' (XLA/analytic {xla / report["analytic_flops"]:.2f})' if xla else ''
  return (
      f'compiled train step on mesh {dict(mesh.shape)}: per device '
      f'state {report["state_bytes"] / gib:.3f} GiB, '
      f'arguments {report.get("argument_bytes", 0) / gib:.3f} GiB, '
      f'temporaries {report.get("temp_bytes", 0) / gib:.3f} GiB; '
      f'{report["analytic_flops"] / 1e12:.4f} model TFLOP per step per device, '
      f'XLA counts {xla / 1e12:.4f}{ratio}'
  )


@dataclasses.dataclass
class Run:
  """A run that started: everything the loop needs, built and checked by `start_run`."""

  config: Any
  task: Any
  workdir: str
  mesh: Any
  layout: ts.StateLayout
  checkpointer: ckpt_lib.Checkpointer
  sources: dict
  train_iter: Any
  state: Any
  frozen: Any
  step_fn: Any
  compile_report: dict
  evaluators: list


def start_run(config, workdir: str, task) -> Run:
  """Start-up: config and mesh checks, the dataset, the state restored (newest checkpoint that
  restores) or initialised, the data iterator positioned, the frozen arrays placed, the step
  compiled. Writes nothing into `workdir` until all of it succeeded; then moves the checkpoints
  the restore skipped as damaged to WORKDIR/damaged_checkpoints/ and writes config.json."""
  check_best_metric(config, task)
  configure_runtime(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  run_dir.check_workdir(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)  # a mesh that does not fit the devices fails here
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  check_batch_fits(config, mesh)
  check_context_split(task, config, mesh)

  sources = prepare_data(task)
  layout = create_layout(task, config, mesh)
  checkpointer = ckpt_lib.Checkpointer(
      workdir,
      keep=config.keep_checkpoints,
      keep_best=config.keep_best,
      best_metric=config.best_metric,
      best_mode=config.best_mode,
      create=False,
  )
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = task.train_iterator(sources, 0, **process)
  state, resumed, iterator_restored = restore_or_init(
      layout, checkpointer, train_iter, config, workdir
  )
  if resumed is None and hasattr(task, 'warm_start'):
    state = warm_started(state, task.warm_start(state.params, mesh))
  start = int(state.step)
  if resumed is not None:
    train_iter = positioned_iterator(task, sources, train_iter, start, iterator_restored, process)

  abstract_frozen = task.abstract_frozen(mesh)
  frozen = task.frozen(mesh)
  started = time.perf_counter()
  step_fn = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), abstract_frozen
  )
  report = compile_report(task, config, layout, step_fn)
  report['compile_s'] = time.perf_counter() - started

  # Start-up succeeded: from here on the run writes into its workdir.
  if checkpointer.skipped:
    moved = checkpointer.quarantine([step for step, _ in checkpointer.skipped])
    for (step, reason), path in zip(checkpointer.skipped, moved):
      _log(f'checkpoint step {step} is damaged ({reason}); moved to {path} for inspection')
  if resumed is not None:
    _log(f'resumed from {checkpointer.directory}/{resumed}')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    run_dir.write_config(config, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(layout.abstract.params))
  _log(
      f'{task.name}: {n_params / 1e6:.2f}M parameters, steps {start} -> {config.total_steps}, '
      f'{jax.process_count()} process(es), {mesh.size} devices, workdir {workdir}'
  )
  _log(format_compile_report(report, mesh) + f'; compile {report["compile_s"]:.1f} s')
  if config.get('model', {}).get('dtype') == 'auto':
    dtype, why = hardware.auto_dtype()
    _log(f"model.dtype='auto': computing in {dtype} ({why})")
  if config.get('model', {}).get('attention') == 'auto':
    resolved = getattr(getattr(task, 'model_cfg', None), 'attention', '?')
    _log(f"model.attention='auto': {resolved} on {hardware.target_platform()}")
  whole = sharding.undivided(layout.abstract.params, mesh, config.sharding_rules)
  if whole:
    _log(
        f'{len(whole)} parameter dimensions stay whole because their mesh axis does not divide '
        f'them, e.g. {"; ".join(whole[:3])}'
    )
  return Run(
      config=config,
      task=task,
      workdir=workdir,
      mesh=mesh,
      layout=layout,
      checkpointer=checkpointer,
      sources=sources,
      train_iter=train_iter,
      state=state,
      frozen=frozen,
      step_fn=step_fn,
      compile_report=report,
      evaluators=[e for e in task.evaluators() if e.during_training],
  )


def evaluate(run: Run, evaluators, step: int, state) -> dict:
  """Runs `evaluators` on `state` at `step`; returns their results merged (the float metrics
  also go to TensorBoard under eval/, and every result is printed as one JSON line)."""
  results = {}
  for evaluator in evaluators:
    use_ema = evaluator.use_ema and state.ema_params is not None
    context = task_lib.EvalContext(
        graphdef=run.layout.graphdef,
        params=state.ema_params if use_ema else state.params,
        frozen=run.frozen,
        sources=run.sources,
        step=step,
        workdir=run.workdir,
        mesh=run.mesh,
    )
    results.update(evaluator.run(context))
  return results


def run_loop(run: Run, writer: MetricWriter | None = None) -> TrainResult:
  """Trains from the run's state to `config.total_steps`: steps (asynchronous: the host runs
  ahead of the device), a log every `log_every` steps, each evaluator on its cadence, a checkpoint
  every `ckpt_every` steps. SIGTERM or Ctrl-C saves the current step and returns early
  (`stopped_by`; `launch.train` exits with `signals.EXIT_CODES`)."""
  config, task, checkpointer = run.config, run.task, run.checkpointer
  state, train_iter, start = run.state, run.train_iter, int(run.state.step)
  is_main = jax.process_index() == 0
  peak_flops, peak_source = perf.peak_flops_per_device(
      jax.local_devices()[0],
      config.peak_tflops,
      hardware.compute_dtype(config.get('model', {}).get('dtype', 'float32')),
  )
  batch_sharding = sharding.batch_sharding(run.mesh, config.sharding_rules)
  stop = signals.StopSignals()
  pending, last_eval, stopped_by = [], None, None
  timer = perf.StepTimer()
  progress = tqdm(
      range(start, config.total_steps),
      initial=start,
      total=config.total_steps,
      desc=task.name,
      dynamic_ncols=True,
      mininterval=2.0,
      disable=not is_main,
  )
  for step in progress:
    with timer.data_wait():
      batch = global_batch(next(train_iter), batch_sharding)
    state, metrics = run.step_fn(state, batch, run.frozen)  # async: returns before the device
    timer.step()
    pending.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == config.total_steps:
      # The only device->host transfer of the loop: the metrics of the interval.
      values = _interval_metrics(run, jax.device_get(pending), timer.lap(), peak_flops)
      pending = []
      if writer:
        writer.scalars(done, values, prefix='train/')
      shown = {'loss': f"{values['loss']:.4f}"}
      shown.update({k: f'{values[k]:.4g}' for k in task.progress_metrics if k in values})
      progress.set_postfix(shown, mfu=f"{values['mfu']:.3f}")
    # Every process asks every step: a multi-host stop is agreed on at a common step.
    stopping = stop.reached(done) and done < config.total_steps
    due = [e for e in run.evaluators if e.due(done, config.total_steps)] if not stopping else []
    save_now = done % config.ckpt_every == 0 or done == config.total_steps or stopping
    evaluated = False
    if due or save_now:
      jax.block_until_ready(state)  # steps still queued on the device count as training time
      with timer.excluded():  # evaluation and saving do not
        if due:
          try:
            with stop.interruptible():
              last_eval = evaluate(run, due, done, state)
              evaluated = True
            _report_eval(done, last_eval, writer, progress if is_main else None, run.workdir)
          except signals.EvaluationInterrupted as e:
            _log(
                f'{e}: the evaluation of step {done} was abandoned (for it: python -m '
                f'launch.eval --workdir={run.workdir} --step={done})'
            )
            stopping, save_now = True, True
        if save_now:
          checkpointer.save(
              done, state, data_iterator=train_iter, metrics=last_eval if evaluated else None
          )
    if stopping:
      stopped_by = stop.received or 'SIGTERM'  # another process's signal: JAX's SIGTERM
      _log(
          f'{stopped_by}: saved step {done} to {checkpointer.directory}; '
          f'rerun the same command to resume'
      )
      break
  progress.close()
  _log(f'peak FLOP/s per device for MFU: {peak_flops / 1e12:.2f} TFLOP/s ({peak_source})')
  if start >= config.total_steps:
    _log(
        f'nothing to train: checkpoint step {start} already reached total_steps='
        f'{config.total_steps} (raise --config.total_steps to continue)'
    )
  stop.close()
  return TrainResult(state, last_eval, stopped_by)


def _interval_metrics(run: Run, interval: list[dict], lap: dict, peak_flops: float) -> dict:
  """Means of the train metrics over a logging interval, with throughput and MFU."""
  values = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
  values.update(
      perf.throughput(
          step_seconds=lap['step_time_s'],
          global_batch=run.config.data.batch_size,
          tokens_per_clip=run.task.tokens_per_clip,
          flops_per_step_per_device=run.compile_report['analytic_flops'],
          peak_flops=peak_flops,
          num_devices=run.mesh.size,
      )
  )
  values['data_wait_fraction'] = lap['data_wait_fraction']
  return values


def _report_eval(step: int, result: dict, writer, progress, workdir: str) -> None:
  run_dir.append_metrics(workdir, result)
  if writer:
    writer.scalars(step, {k: v for k, v in result.items() if isinstance(v, float)}, 'eval/')
  if progress is not None:
    progress.write(
        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    )


def train(config, workdir: str, task) -> TrainResult:
  """Trains `task` until `config.total_steps`, resuming from the newest checkpoint in `workdir`
  that restores (`start_run`, then `run_loop`). The config's fields are validated when the task is
  made (`launch.tasks.make_task`); start-up checks what needs the task or the devices."""
  run = start_run(config, workdir, task)
  writer = MetricWriter(run.workdir) if jax.process_index() == 0 else None
  result = run_loop(run, writer)
  run.checkpointer.close()  # waits for the last asynchronous save to be committed
  if writer:
    writer.close()
  return result
