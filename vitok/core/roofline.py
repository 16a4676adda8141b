"""A compiled program held against the chip it was compiled for: memory per chip against HBM, the
collectives of one run, FLOPs, and a lower bound on its time from the chip's published peaks.

The bound is the largest of four times, each the least the chip could need for one resource:
  compute  the compiled program's matmul FLOPs (and its Pallas kernels' estimates) / the peak
           dense bf16 FLOP/s (kernels without an estimate count nothing: still a bound);
  HBM      bytes XLA's instructions read and write / HBM bandwidth;
  ICI      for each collective inside a slice, the bytes a chip sends in a ring over its group,
           over both directions of every torus axis the group spans (2 x links x link bandwidth);
  DCN      collectives whose groups span slices: bytes over the chip's data-centre bandwidth.
It assumes every resource runs at its peak and overlaps perfectly with the others, so a real step
is slower; it is a bound, not a step time (XLA's own `optimal_seconds` is not one either: it came
back negative for a whole DiT-L step).

The collectives the schedule leaves exposed (synchronous, or asynchronous with no compute between
start and end) are timed apart, at the same bandwidths: a step whose compute and HBM traffic
overlap perfectly still waits for them, so max(compute, HBM) + exposed is the estimate to compare
schedules by when collectives do not overlap (with libtpu's default flags, none of the presets'
do). With few exposed bytes it equals the bound.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from vitok.core import hlo_cost, perf, sharding, topology


def parameter_names(abstract_params: Any) -> dict[tuple[int, ...], str]:
  """Parameter shape -> its path, to say which tensor a collective moves: the full shape (an
  all-gather's result, a reduce-scatter's operand), one device's shard of it (a gradient shard
  all-reduced over the data axes after the reduce-scatter) and, for blocks stacked by
  `model.scan`, one layer's. Shapes shared by several parameters name the first with a count."""
  names: dict[tuple[int, ...], list[str]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    where = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    where = where.removesuffix('/value').removesuffix('/.value')
    shape = tuple(int(d) for d in np.shape(leaf))
    keys = {shape: where}
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None and tuple(sharding.shard_shape(shape)) != shape:
      keys.setdefault(tuple(sharding.shard_shape(shape)), f'{where} (shard)')
    if len(shape) > 2:
      keys.setdefault(shape[1:], f'{where} (one layer)')
    for key, name in keys.items():
      for variant in {key, tuple(d for d in key if d != 1)}:
        if variant:
          names.setdefault(variant, []).append(name)
  return {
      shape: paths[0] + (f' (+{len(paths) - 1} of this shape)' if len(paths) > 1 else '')
      for shape, paths in names.items()
  }


def bound_seconds(cost: hlo_cost.ProgramCost, chip: topology.Chip, mesh) -> dict:
  """The four times of the module docstring, the bound (their maximum) and which one it is, and
  the exposed collectives' time with the estimate it gives."""
  flops = cost.flops
  ici = dcn = exposed = 0.0
  axis_links: dict[tuple[str, ...], int] = {}
  for c in cost.collectives:
    if c.group_size <= 1:
      continue
    if c.across_slices:
      seconds = 0.0
      if chip.dcn_gbits_per_chip:
        seconds = c.wire_bytes * c.times / (chip.dcn_gbits_per_chip / 8 * 1e9)
      dcn += seconds
    else:
      if c.axes not in axis_links:
        axis_links[c.axes] = _axes_links(c.axes, mesh)
      seconds = c.wire_bytes * c.times / (2 * axis_links[c.axes] * chip.ici_link_gbps * 1e9)
      ici += seconds
    exposed += 0.0 if c.overlapped else seconds
  times = {
      'compute_s': flops / (chip.peak_tflops * 1e12),
      'hbm_s': cost.hbm_bytes / (chip.hbm_gbps * 1e9),
      'ici_s': ici,
      'dcn_s': dcn,
  }
  limit = max(times, key=times.get)
  return dict(
      times,
      bound_s=times[limit],
      bound_by=limit.removesuffix('_s'),
      exposed_collectives_s=exposed,
      exposed_estimate_s=max(times['compute_s'], times['hbm_s']) + exposed,
  )


def _axes_links(axes: tuple[str, ...], mesh) -> int:
  """Torus axes spanned by a group along `axes` of `mesh` (the group of chip 0)."""
  names = list(mesh.shape)
  index = tuple(slice(None) if n in axes else 0 for n in names)
  group = mesh.devices[index].ravel()
  coords = [getattr(d, 'coords', None) for d in group]
  if any(c is None for c in coords):
    return 1
  return max(1, sum(len({c[i] for c in coords}) > 1 for i in range(len(coords[0]))))


def slice_shape(mesh) -> dict[str, int]:
  """The part of `mesh` inside one slice: each axis divided by the slices laid along it."""
  slices = np.vectorize(lambda d: int(getattr(d, 'slice_index', 0) or 0))(mesh.devices)
  out = {}
  for i, name in enumerate(mesh.shape):
    line = np.moveaxis(slices, i, 0)[(slice(None),) + (0,) * (slices.ndim - 1)]
    out[name] = mesh.shape[name] // len(set(line.tolist()))
  return out


def program_report(
    compiled, mesh, chip: topology.Chip | None, model_flops: float, param_names=None
) -> dict:
  """Per-chip memory, FLOPs, collectives and (with a chip) the time bound of `compiled`."""
  stats = perf.compiled_stats(compiled)
  cost = hlo_cost.analyze(compiled.as_text(), dict(mesh.shape), slice_shape(mesh), param_names)
  peak = (
      (stats['argument_bytes'] or 0)
      + (stats['output_bytes'] or 0)
      - (stats['alias_bytes'] or 0)
      + (stats['temp_bytes'] or 0)
      + (stats['generated_code_bytes'] or 0)
  )
  report = {
      'temp_bytes': stats['temp_bytes'] or 0,
      'argument_bytes': stats['argument_bytes'] or 0,
      'output_bytes_not_aliased': (stats['output_bytes'] or 0) - (stats['alias_bytes'] or 0),
      'code_bytes': stats['generated_code_bytes'] or 0,
      'total_bytes': peak,
      'model_flops': model_flops,
      'compiled_matmul_flops': cost.matmul_flops,
      'compiled_kernel_flops': cost.kernel_flops,
      'xla_cost_analysis_flops': stats['flops'],
      'hbm_bytes': cost.hbm_bytes,
      'collectives': cost.by_kind(),
      'largest_collectives': cost.by_tensor(),
      'collective_wire_bytes': sum(c.wire_bytes * c.times for c in cost.collectives),
      'kernels_without_cost_estimate': cost.kernels_without_estimate,
      'loops_without_trip_count': cost.loops_without_trip_count,
  }
  if chip is not None:
    report['hbm_capacity_bytes'] = chip.hbm_bytes
    report['fits'] = peak <= chip.hbm_bytes
    report['hbm_used_fraction'] = peak / chip.hbm_bytes
    report['bound'] = bound_seconds(cost, chip, mesh)
    report['bound']['mfu_at_bound'] = (
        model_flops / (report['bound']['bound_s'] * chip.peak_tflops * 1e12)
        if report['bound']['bound_s']
        else math.nan
    )
  return report


def out_of_memory_report(error, chip: topology.Chip, state: dict, model_flops: float) -> dict:
  """The report of a program the TPU compiler refused for want of HBM (it names the temporaries
  it needed and the HBM it had); other compile errors are raised again."""
  m = re.search(r'temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)', str(error))
  if 'RESOURCE_EXHAUSTED' not in str(error) or not m:
    raise error
  temp, hbm = float(m[1]) * 2**30, float(m[2]) * 2**30
  total = temp + sum(state.values())
  return {
      'fits': False,
      'compiler_message': str(error).splitlines()[0],
      'temp_bytes': temp,
      'total_bytes': total,
      'hbm_capacity_bytes': hbm,
      'hbm_used_fraction': total / hbm,
      'model_flops': model_flops,
  }


def state_bytes(layout, frozen) -> dict:
  """Bytes per chip of the train state's parts and of the frozen arrays (shapes only)."""
  per_device = lambda part: sharding.abstract_bytes_per_device(
      getattr(layout.abstract, part), getattr(layout.shardings, part)
  )
  ema = per_device('ema_params') if layout.abstract.ema_params is not None else 0
  return {
      'params_bytes': per_device('params'),
      'optimizer_bytes': per_device('opt_state'),
      'ema_bytes': ema,
      'frozen_bytes': sharding.abstract_bytes_per_device(
          frozen, jax.tree.map(lambda x: x.sharding, frozen)
      ),
  }
