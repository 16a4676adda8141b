r"""What a config costs, before launching it.

Without --mesh: parameter counts (encoder / decoder / total), tokens per clip, E (latent floats per
clip), pixels per latent float and forward GMACs per clip, from abstract shapes only.

With --mesh: also compiles the full train step ahead of time for that mesh on simulated CPU
devices (nothing is allocated or run) and reports per-device memory -- parameters, optimizer state
(Adam moments + EMA), XLA's temporaries -- and FLOPs per step, so you know whether a config fits a
pod slice before you get one:

    python -m launch.plan --config=configs/vitok.py:variant=S-B/4x8,res=128,frames=16
    python -m launch.plan --config=configs/vitok.py:ucf101 --mesh=16x16

Memory figures come from XLA's CPU compiler: parameter and optimizer bytes are exact; temporaries
are the CPU backend's buffer assignment, a guide to (not a guarantee of) what TPU/GPU need.
"""

import json
import math
import time

import jax

from launch import common
from vitok.core import perf, sharding, trainer
from vitok.core import train_state as ts

GIB = 2**30


def plan(config) -> dict:
  """Sizes and analytic costs of the config's model, as its task describes them (no
  compilation)."""
  return common.make_task_or_exit(config).describe()


def compile_plan(config, mesh) -> dict:
  """Ahead-of-time compiles the train step for `mesh` and reports per-device memory and FLOPs."""
  task = common.make_task_or_exit(config)
  trainer.configure_runtime(config)
  dp = sharding.data_parallel_size(mesh, config.sharding_rules)
  if config.data.batch_size % dp:
    common.fail(
        f'bad config: data.batch_size={config.data.batch_size} must be divisible by '
        f'the {dp} ways the mesh {dict(mesh.shape)} splits a batch'
    )
  layout = trainer.create_layout(task, config, mesh)
  frozen = task.abstract_frozen(mesh)  # shapes only: nothing is loaded onto the devices
  started = time.perf_counter()
  compiled = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), frozen
  )
  compile_s = time.perf_counter() - started
  stats = perf.compiled_stats(compiled)
  frozen_b = sharding.abstract_bytes_per_device(frozen, jax.tree.map(lambda x: x.sharding, frozen))
  per_device = lambda part: sharding.abstract_bytes_per_device(
      getattr(layout.abstract, part), getattr(layout.shardings, part)
  )
  params_b = per_device('params')
  optimizer_b = per_device('opt_state') + (
      per_device('ema_params') if layout.abstract.ema_params is not None else 0
  )
  analytic = task.train_flops_per_clip() * config.data.batch_size / mesh.size
  return {
      'mesh': dict(mesh.shape),
      'devices': mesh.size,
      'global_batch': config.data.batch_size,
      'clips_per_device': config.data.batch_size / mesh.size,
      'params_GiB_per_device': round(params_b / GIB, 4),
      'optimizer_GiB_per_device': round(optimizer_b / GIB, 4),
      'frozen_GiB_per_device': round(frozen_b / GIB, 4),
      'temp_GiB_per_device': round((stats['temp_bytes'] or 0) / GIB, 4),
      'total_GiB_per_device': round(
          (params_b + optimizer_b + frozen_b + (stats['temp_bytes'] or 0)) / GIB, 4
      ),
      'model_TFLOP_per_step_per_device': round(analytic / 1e12, 4),
      'xla_TFLOP_per_step_per_device': round((stats['flops'] or 0) / 1e12, 4),
      'compile_s': round(compile_s, 1),
      **(
          {'note': 'XLA counts the scanned blocks once (model.scan); MFU uses the model FLOPs'}
          if config.model.get('scan')
          else {}
      ),
  }


def simulate_devices(mesh_flag: str) -> None:
  """Makes the CPU backend present as many devices as --mesh names (before JAX starts)."""
  sizes = common.mesh_sizes(mesh_flag)
  if any(s < 1 for s in sizes):
    common.fail(f'bad flag --mesh={mesh_flag}: plan needs explicit positive sizes (no -1)')
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', math.prod(sizes))


def main(argv):
  del argv
  common.quiet_library_logs()
  config = common.load_config()
  mesh_flag = common.mesh_flag()
  if mesh_flag:
    simulate_devices(mesh_flag)  # before anything starts the JAX backend
    common.mesh_override(config)
  result = plan(config)
  if mesh_flag:
    result['compiled'] = compile_plan(config, common.make_mesh_or_exit(config))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  common.run(main)
