r"""What a config costs, before launching it.

    python -m launch.plan --config=configs/vitok.py:ucf101                       # sizes only
    python -m launch.plan --config=configs/vitok.py:ucf101 --mesh=16x16          # simulated CPU
    python -m launch.plan --config=configs/dit.py:ucf101 --topology=v5p-128      # the TPU compiler
    python -m launch.plan --config=configs/dit.py:ucf101 --topology=v5p-128 --num_slices=2

Without flags: parameter counts, tokens per clip, E, forward GMACs per clip, from shapes only.

--mesh=AxB: also compiles the full train step for that mesh on simulated CPU devices (nothing is
allocated or run) and reports per-device memory and FLOPs. XLA's CPU compiler assigns memory
differently from a TPU's (it overstated the TPU compiler's temporaries 1.75-2.2x for the UCF-101
presets): a guide for users without libtpu, not a TPU figure.

--topology=SLICE (v4-32, v5p-128, v5litepod-256, v6e-256, or a topology such as v5p:4x4x4), with
--num_slices=N for N slices over the data-centre network: compiles the train step (and, for a
model that generates, its sampling program) with the real TPU compiler (libtpu, the `tpu` or
`test` extra) for that slice, on this machine, and reports per chip: parameters, optimizer state,
EMA, frozen weights, temporaries and their total against the chip's HBM (fits, or by how much it
does not); the hosts and the batch each feeds; the collectives of one step by kind and mesh axis
with their bytes; FLOPs; and a lower bound on the step time from the chip's published peaks
(vitok/core/roofline.py). A short table, then the whole report as one JSON line.
"""

import json
import math
import time

import jax
from absl import flags

from launch import common
from vitok.core import hardware, hlo_cost, perf, roofline, sharding, topology, trainer
from vitok.core import train_state as ts

GIB = 2**30

_TOPOLOGY = flags.DEFINE_string(
    'topology', '', 'A TPU slice to compile for, e.g. v5p-128, v6e-256, v4-32 or v5p:4x4x4.'
)
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'With --topology: slices of that size joined over the data-centre network.'
)
_SAMPLING = flags.DEFINE_bool(
    'sampling', True, "With --topology: also compile a DiT's sampling program (minutes)."
)
_HLO_OUT = flags.DEFINE_string(
    'hlo_out',
    '',
    "With --topology: write the train step's optimized HLO (the TPU compiler's) here.",
)


def plan(config) -> dict:
  """Sizes and analytic costs of the config's model, as its task describes them (no
  compilation)."""
  return common.make_task_or_exit(config).describe()


def compile_plan(config, mesh) -> dict:
  """Ahead-of-time compiles the train step for `mesh` and reports per-device memory and FLOPs."""
  task = common.make_task_or_exit(config)
  trainer.configure_runtime(config)
  _check_batch(config, mesh)
  _check_context(task, config, mesh)
  layout = trainer.create_layout(task, config, mesh)
  frozen = task.abstract_frozen(mesh)  # shapes only: nothing is loaded onto the devices
  started = time.perf_counter()
  compiled = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), frozen
  )
  compile_s = time.perf_counter() - started
  stats = perf.compiled_stats(compiled)
  # The collectives of one step by kind and mesh axis, read from the compiled program (what
  # XLA:CPU's partitioner chose; the TPU compiler's schedule may differ).
  cost = hlo_cost.analyze(compiled.as_text(), dict(mesh.shape))
  parts = roofline.state_bytes(layout, frozen)
  params_b, frozen_b = parts['params_bytes'], parts['frozen_bytes']
  optimizer_b = parts['optimizer_bytes'] + parts['ema_bytes']
  analytic = task.train_flops_per_clip() * config.data.batch_size / mesh.size
  return {
      'backend': 'XLA:CPU on simulated devices (memory is a guide, not a TPU figure)',
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
      'collectives': cost.by_kind(),
      'collective_wire_bytes': sum(c.wire_bytes * c.times for c in cost.collectives),
      'compile_s': round(compile_s, 1),
      **(
          {'note': 'XLA counts the scanned blocks once (model.scan); MFU uses the model FLOPs'}
          if config.model.get('scan')
          else {}
      ),
  }


def _check_context(task, config, mesh) -> None:
  try:
    trainer.check_context_split(task, config, mesh)
  except ValueError as e:
    common.fail(f'bad config: {e}')


def _check_batch(config, mesh) -> None:
  dp = sharding.data_parallel_size(mesh, config.sharding_rules)
  if config.data.batch_size % dp:
    common.fail(
        f'bad config: data.batch_size={config.data.batch_size} must be divisible by '
        f'the {dp} ways the mesh {dict(mesh.shape)} splits a batch'
    )


def tpu_plan(config, piece: topology.Slice) -> dict:
  """The train step (and sampling program) of `config` compiled by the TPU compiler for the
  slice(s) `piece`, reported per chip (see the module docstring)."""
  devices = topology.describe_devices(piece)
  with hardware.compile_target('tpu'):
    task = common.make_task_or_exit(config)
    trainer.configure_runtime(config)
    described = task.describe()
    try:
      mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
      common.fail(f'bad config: {e}')
    _check_batch(config, mesh)
    _check_context(task, config, mesh)
    hosts = len({d.process_index for d in devices})
    layout = trainer.create_layout(task, config, mesh)
    frozen = task.abstract_frozen(mesh)
    names = roofline.parameter_names(layout.abstract.params)
    started = time.perf_counter()
    model_flops = task.train_flops_per_clip() * config.data.batch_size / mesh.size
    state = roofline.state_bytes(layout, frozen)
    try:
      compiled = ts.compile_train_step(
          layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), frozen
      )
      step = roofline.program_report(compiled, mesh, piece.chip, model_flops, names)
      if _HLO_OUT.value:
        with open(_HLO_OUT.value, 'w') as f:
          f.write(compiled.as_text())
    except jax.errors.JaxRuntimeError as e:
      try:
        step = roofline.out_of_memory_report(e, piece.chip, state, model_flops)
      except jax.errors.JaxRuntimeError:
        common.fail(f'the TPU compiler refused the train step: {_first_lines(e)}', code=1)
    compile_s = time.perf_counter() - started
    result = {
        'model': described,
        'backend': f'XLA:TPU (libtpu), compiled ahead of time for {piece.topology}'
        + (f' x {piece.num_slices} slices' if piece.num_slices > 1 else ''),
        'topology': piece.name,
        'chip': piece.chip.name,
        'chips': mesh.size,
        'slices': piece.num_slices,
        'hosts': hosts,
        'mesh': dict(mesh.shape),
        'model_dtype': hardware.compute_dtype(config.model.dtype),
        'attention': config.model.get('attention', 'xla'),
        'mixer': config.model.get('mixer', 'attention'),
        'global_batch': config.data.batch_size,
        'clips_per_chip': config.data.batch_size / mesh.size,
        'clips_per_host': config.data.batch_size / hosts,
        **state,
        'train_step': step,
        'compile_s': round(compile_s, 1),
    }
    if _SAMPLING.value and hasattr(task, 'lower_generation') and 'bound' in step:
      steps = config.sample.steps
      started = time.perf_counter()
      lowered = task.lower_generation(
          layout.graphdef, layout.abstract.params, frozen, mesh, config.data.batch_size, steps
      )
      sampling = roofline.program_report(lowered.compile(), mesh, piece.chip, 0.0, names)
      sampling.update(
          clips=config.data.batch_size,
          sampler=config.sample.sampler,
          sampler_steps=steps,
          guidance=config.sample.guidance,
          compile_s=round(time.perf_counter() - started, 1),
      )
      result['sampling'] = sampling
  return result


def _first_lines(error, limit: int = 400) -> str:
  """A compiler error's first two lines (what and where), on one line."""
  text = ' '.join(line.strip() for line in str(error).splitlines()[:2])
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _gib(value: float) -> str:
  return f'{value / GIB:.2f} GiB'


def format_tpu_plan(result: dict) -> str:
  """The short human report of `tpu_plan`."""
  step = result['train_step']
  hbm = step['hbm_capacity_bytes']
  verdict = (
      f'fits ({step["hbm_used_fraction"]:.0%} of {_gib(hbm)})'
      if step['fits']
      else f'DOES NOT FIT: {_gib(step["total_bytes"] - hbm)} over the {_gib(hbm)} of HBM'
  )
  mesh = ' x '.join(f'{k} {v}' for k, v in result['mesh'].items())
  parts = ', '.join(
      f'{label} {_gib(result[key])}'
      for label, key in (
          ('parameters', 'params_bytes'),
          ('optimizer', 'optimizer_bytes'),
          ('EMA', 'ema_bytes'),
          ('frozen', 'frozen_bytes'),
      )
  )
  lines = [
      f'{result["backend"]}: {result["chips"]} chips ({result["chip"]}), {result["hosts"]} hosts, '
      f'mesh {mesh}; {result["model_dtype"]} compute, '
      + (
          'mixer MATE (dit/mate.py)'
          if result.get('mixer') == 'mate'
          else f'attention {result["attention"]}'
      ),
      f'batch {result["global_batch"]}: {result["clips_per_chip"]:g} clips per chip, '
      f'{result["clips_per_host"]:g} per host',
      f'per chip: {parts}, temporaries {_gib(step["temp_bytes"])}; total '
      f'{_gib(step["total_bytes"])}: {verdict}',
  ]
  if 'bound' not in step:  # the compiler refused the program
    lines.append(f'the TPU compiler: {step["compiler_message"]}')
    return '\n'.join(lines)
  bound = step['bound']
  lines += [
      f'FLOPs per chip per step: model {step["model_flops"] / 1e12:.3f} T, compiled matmuls '
      f'{step["compiled_matmul_flops"] / 1e12:.3f} T + kernels '
      f'{step["compiled_kernel_flops"] / 1e12:.3f} T; HBM traffic {_gib(step["hbm_bytes"])}',
      f'step time >= {bound["bound_s"] * 1e3:.2f} ms (a lower bound, set by {bound["bound_by"]}: '
      f'compute {bound["compute_s"] * 1e3:.2f} / HBM {bound["hbm_s"] * 1e3:.2f} / ICI '
      f'{bound["ici_s"] * 1e3:.2f} / DCN {bound["dcn_s"] * 1e3:.2f} ms; MFU at most '
      f'{bound["mfu_at_bound"]:.0%})',
      f'collectives the schedule leaves exposed: {bound["exposed_collectives_s"] * 1e3:.2f} ms; '
      f'max(compute, HBM) + exposed = {bound["exposed_estimate_s"] * 1e3:.2f} ms',
      'collectives per step (bytes a chip sends):',
  ]
  rows = [
      dict(
          kind=r['kind'],
          axes=r['axes'],
          net=r['network'],
          ops=r['instructions'],
          runs=r['runs'],
          payload=r['payload_bytes'] / 2**20,
          sent=r['wire_bytes'] / 2**20,
          overlap=r['overlapped_bytes'] / r['wire_bytes'] if r['wire_bytes'] else 0.0,
      )
      for r in step['collectives']
  ]
  lines.append(
      perf.format_table(
          rows,
          [
              ('kind', 'kind'),
              ('axes', 'mesh axes'),
              ('net', 'net'),
              ('ops', 'ops'),
              ('runs', 'runs', '.0f'),
              ('payload', 'payload MiB', '.1f'),
              ('sent', 'sent MiB', '.1f'),
              ('overlap', 'async', '.0%'),
          ],
      )
  )
  if 'sampling' in result:
    s = result['sampling']
    lines.append(
        f'sampling {s["clips"]} clips ({s["sampler"]}, {s["sampler_steps"]} steps, guidance '
        f'{s["guidance"]:g}) and decoding: temporaries {_gib(s["temp_bytes"])}, total '
        f'{_gib(s["total_bytes"])} ({"fits" if s["fits"] else "does not fit"}); >= '
        f'{s["bound"]["bound_s"]:.2f} s ({s["bound"]["bound_by"]})'
    )
  for key in ('kernels_without_cost_estimate', 'loops_without_trip_count'):
    if step[key]:
      lines.append(f'note: {key.replace("_", " ")}: {", ".join(step[key])}')
  return '\n'.join(lines)


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
  if _NUM_SLICES.value != 1 and not _TOPOLOGY.value:
    common.fail(f'bad flag --num_slices={_NUM_SLICES.value}: it counts slices of --topology')
  if _TOPOLOGY.value:
    try:
      piece = topology.parse_slice(_TOPOLOGY.value, _NUM_SLICES.value)
    except topology.TopologyError as e:
      common.fail(f'bad flag {e}')
    common.mesh_override(config)
    try:
      result = tpu_plan(config, piece)
    except topology.TopologyError as e:
      common.fail(str(e))
    print(format_tpu_plan(result))
    print(json.dumps(result, default=float))
    return
  if mesh_flag:
    simulate_devices(mesh_flag)  # before anything starts the JAX backend
    common.mesh_override(config)
  result = plan(config)
  if mesh_flag:
    result['compiled'] = compile_plan(config, common.make_mesh_or_exit(config))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  common.run(main)
