r"""Benchmark the train step of a config on this machine's devices and print one table.

    python -m launch.bench --config=configs/vitok.py:demo --steps=20
    python -m launch.bench --config=configs/vitok.py:ucf101,batch=4 --steps=5 --mesh=-1x1

The step is the real one (loss, backward, AdamW, EMA; sharded on the config's mesh or --mesh),
fed a fixed random batch that already sits on the devices, so input reading is not measured.
After --warmup steps, each of --steps steps is timed to completion. Columns: compile time, median
step time, clips/s and tokens/s per device, achieved model TFLOP/s per device, MFU (against the
device's peak: the table in vitok/perf.py, config.peak_tflops, or on CPU a measured dense-matmul
rate of this machine), and peak memory (device allocator; on CPU the process's peak RSS).
Then --profile=N steps are traced with the JAX profiler and the op time split into attention,
matmuls, RoPE, LPIPS, the optimizer update and the rest (vitok/core/profile.py).

For a generative family (the DiT), --sample_steps=N also times generation: a batch of clips
sampled with N sampler steps (classifier-free guidance as configured) and decoded by the frozen
tokenizer, one jitted program, timed after a compiling run: samples/s and seconds per clip.
"""

import json
import statistics
import time

import jax
import numpy as np
from absl import flags

from launch import common
from vitok.core import hardware, perf, profile, sharding, trainer
from vitok.core import train_state as ts

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_PROFILE = flags.DEFINE_integer(
    'profile',
    3,
    'Also trace this many steps with the JAX profiler and report the share of the step in '
    'attention, matmuls, RoPE, LPIPS, the optimizer update and the rest (0 = off).',
)
_PROFILE_DIR = flags.DEFINE_string(
    'profile_dir', '', 'Keep the profiler trace (and the step HLO) in this directory.'
)
_SAMPLE_STEPS = flags.DEFINE_integer(
    'sample_steps', 0, 'Also time generation with this many sampler steps (DiT; 0 = off).'
)

COLUMNS = [
    ('config', 'config'),
    ('mesh', 'mesh'),
    ('devices', 'devices'),
    ('batch', 'batch'),
    ('compile_s', 'compile s', '.1f'),
    ('step_time_s', 'step s (median)', '.4f'),
    ('clips_per_s_per_device', 'clips/s/dev', '.2f'),
    ('tokens_per_s_per_device', 'tokens/s/dev', '.0f'),
    ('tflops_per_device', 'TFLOP/s/dev', '.4f'),
    ('mfu', 'MFU', '.3f'),
    ('peak_memory_GiB', 'peak mem GiB', '.2f'),
]


def random_batch(task, config, mesh) -> dict:
  """A random global batch of the task's shapes (uint8: random pixels; floats: standard normal;
  other integers, e.g. labels: zeros), created directly on the devices in the batch sharding."""
  batch_sharding = sharding.batch_sharding(mesh, config.sharding_rules)
  rng = np.random.default_rng(0)
  out = {}
  for name, spec in task.abstract_batch().items():
    if spec.dtype == np.uint8:
      host = rng.integers(0, 255, spec.shape).astype(spec.dtype)
    elif np.issubdtype(spec.dtype, np.floating):
      host = rng.standard_normal(spec.shape).astype(spec.dtype)
    else:
      host = np.zeros(spec.shape, spec.dtype)
    out[name] = jax.make_array_from_callback(spec.shape, batch_sharding, lambda i, h=host: h[i])
  return out


def _model_name(config, task) -> str:
  """The variant, and the mixer when it is not attention (a MATE DiT: 'DiT-cpu128/2 MATE')."""
  model = config.get('model', {})
  return model.get('variant', task.name) + (' MATE' if model.get('mixer') == 'mate' else '')


def bench(
    config,
    mesh,
    steps: int,
    warmup: int,
    name: str = '',
    profile_steps: int = 0,
    profile_dir: str = '',
) -> dict:
  task = common.make_task_or_exit(config)
  trainer.configure_runtime(config)
  layout = trainer.create_layout(task, config, mesh)
  state = layout.init()
  frozen = task.frozen(mesh)
  batch = random_batch(task, config, mesh)
  started = time.perf_counter()
  step_fn = ts.compile_train_step(
      layout,
      task.loss_fn,
      config.optim.ema_decay,
      task.abstract_batch(),
      task.abstract_frozen(mesh),
  )
  compile_s = time.perf_counter() - started
  report = trainer.compile_report(task, config, layout, step_fn)
  for _ in range(warmup):
    state, metrics = step_fn(state, batch, frozen)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - started)
  peak_flops, peak_source = perf.peak_flops_per_device(
      jax.local_devices()[0],
      config.peak_tflops,
      hardware.compute_dtype(config.get('model', {}).get('dtype', 'float32')),
  )
  row = {
      'config': name or _model_name(config, task),
      'mesh': 'x'.join(map(str, mesh.shape.values())),
      'devices': mesh.size,
      'batch': config.data.batch_size,
      'compile_s': compile_s,
  }
  row.update(
      perf.throughput(
          step_seconds=statistics.median(times),
          global_batch=config.data.batch_size,
          tokens_per_clip=task.tokens_per_clip,
          flops_per_step_per_device=report['analytic_flops'],
          peak_flops=peak_flops,
          num_devices=mesh.size,
      )
  )
  row.update(
      peak_memory_GiB=perf.peak_memory_bytes(jax.local_devices()[0]) / 2**30,
      peak_tflops=peak_flops / 1e12,
      peak_source=peak_source,
      xla_tflop_per_step_per_device=(report['flops'] or 0) / 1e12,
      model_tflop_per_step_per_device=report['analytic_flops'] / 1e12,
      step_times_s=[round(t, 4) for t in times],
      loss=float(metrics['loss']),
  )
  if profile_steps:

    def run_step():
      nonlocal state
      state, step_metrics = step_fn(state, batch, frozen)
      jax.block_until_ready((state, step_metrics))

    row['profile'] = profile.step_breakdown(run_step, step_fn.as_text(), profile_steps, profile_dir)
  return row


def bench_sampling(config, mesh, sampler_steps: int, repeats: int = 3) -> dict:
  """Generation throughput of a task that generates (`task.generate`): `data.batch_size` clips
  (labels cycling over the classes) sampled with `sampler_steps` steps and decoded, the median
  of `repeats` timed runs after a compiling one."""
  task = common.make_task_or_exit(config)
  if not hasattr(task, 'generate'):
    common.fail(f'--sample_steps: the {task.name} family does not generate samples')
  trainer.configure_runtime(config)
  layout = trainer.create_layout(task, config, mesh)
  params = layout.init().params
  frozen = task.frozen(mesh)
  labels = np.arange(config.data.batch_size, dtype=np.int32) % task.model_cfg.num_classes

  def run():
    return task.generate(layout.graphdef, params, frozen, labels, mesh, steps=sampler_steps)

  started = time.perf_counter()
  run()
  first = time.perf_counter() - started
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    run()
    times.append(time.perf_counter() - started)
  seconds = statistics.median(times)
  guided = config.sample.guidance != 1.0
  return {
      'sampler': config.sample.sampler,
      'sampler_steps': sampler_steps,
      'guidance': config.sample.guidance,
      'network_evaluations_per_clip': sampler_steps * (2 if guided else 1),
      'clips': int(len(labels)),
      'compile_and_first_run_s': round(first, 2),
      'seconds': round(seconds, 4),
      'samples_per_s': round(len(labels) / seconds, 3),
  }


def main(argv):
  del argv
  common.quiet_library_logs()
  config = common.load_config()
  common.init_distributed()
  common.mesh_override(config)
  mesh = common.make_mesh_or_exit(config)
  row = bench(
      config,
      mesh,
      _STEPS.value,
      _WARMUP.value,
      profile_steps=_PROFILE.value,
      profile_dir=_PROFILE_DIR.value,
  )
  if jax.process_index() == 0:
    print(perf.format_table([row], COLUMNS))
    print(
        f"peak for MFU: {row['peak_tflops']:.3f} TFLOP/s per device ({row['peak_source']}); "
        f"model TFLOP per step per device {row['model_tflop_per_step_per_device']:.4f}, "
        f"XLA counts {row['xla_tflop_per_step_per_device']:.4f}"
    )
    if 'profile' in row:
      shares = ', '.join(
          f'{part} {share:.0%}' for part, share in row['profile']['share'].items() if share > 0
      )
      print(
          f"profile ({_PROFILE.value} steps, {row['profile']['traced_s_per_step']:.4f} s of ops "
          f'per step): {shares}'
      )
    print(json.dumps(row))
  if _SAMPLE_STEPS.value:
    sampling = bench_sampling(config, mesh, _SAMPLE_STEPS.value)
    if jax.process_index() == 0:
      print(
          f"sampling: {sampling['clips']} clips, {sampling['sampler']} with "
          f"{sampling['sampler_steps']} steps (guidance {sampling['guidance']:g}), decoded: "
          f"{sampling['seconds']:.2f} s = {sampling['samples_per_s']:.2f} samples/s"
      )
      print(json.dumps(sampling))


if __name__ == '__main__':
  common.run(main)
