"""What one run of a compiled program does on each device (the SPMD program is the same on
every device), added up from its optimized HLO (read by `vitok/core/hlo.py`): its collectives
(kind, bytes, the mesh axes they run over, whether they overlap compute), its matmul and kernel
FLOPs and its HBM traffic, every loop counted as often as it runs.

Conventions, per device:
  * HBM bytes: operands plus results of every instruction that runs outside a fusion, leaving out
    arrays XLA placed in on-chip memory (layouts marked `S(n)`, n > 0) and bookkeeping (tuples,
    bitcasts, parameters). It approximates XLA's own "bytes accessed".
  * collectives: the payload is the full operand of an all-reduce / reduce-scatter / all-to-all /
    collective-permute and the full result of an all-gather; a device sends payload x (n-1)/n
    over a ring of n devices (an all-reduce twice that). The TPU compiler fuses an all-reduce with
    the slice a device keeps of it into an `all-reduce-scatter` computation: one reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import math
import re

from vitok.core.hlo import (
    COLLECTIVES,
    Array,
    Computation,
    Instruction,
    attention_kernel_flops,
    group_axes,
    kernel_estimate,
    matmul_flops,
    parse,
    parse_arrays,
    replica_groups,
    run_counts,
    shape_bytes,
)

# Instructions that read or write no HBM of their own.
_BOOKKEEPING = {
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call',
    'conditional', 'after-all', 'partition-id', 'replica-id', 'copy-done', 'iota',
    'opt-barrier', 'add-dependency', 'all-gather-done', 'all-reduce-done',
    'collective-permute-done', 'async-done', 'send-done', 'recv-done', 'slice-done',
}  # fmt: skip


@dataclasses.dataclass
class Collective:
  """One collective instruction of the program, with how often it runs per program run."""

  kind: str  # all-gather | all-reduce | reduce-scatter | all-to-all | collective-permute
  axes: tuple[str, ...]  # the mesh axes its groups span
  group_size: int
  payload_bytes: float  # per device, per run (see the module docstring)
  times: float  # runs per program run (loop trip counts)
  overlapped: bool  # asynchronous, with compute scheduled between its start and its end
  across_slices: bool  # its groups span several slices: it crosses the data-centre network
  dims: tuple[int, ...]  # the full (unsharded) array: the result of an all-gather, else the operand
  dtype: str
  op_name: str  # JAX's name of the operation that produced it
  instruction: str  # the HLO instruction (a combined collective moves several arrays)
  tensor: str = ''  # the parameter it moves, when its shape is a parameter's; else ''

  @property
  def wire_bytes(self) -> float:
    """Bytes each device sends per run in a ring over its group."""
    n = self.group_size
    if n <= 1:
      return 0.0
    share = self.payload_bytes * (n - 1) / n
    if self.kind == 'all-reduce':
      return 2 * share
    if self.kind == 'collective-permute':
      return self.payload_bytes
    return share


@dataclasses.dataclass
class ProgramCost:
  """What one run of a compiled program does on each device."""

  matmul_flops: float
  kernel_flops: float  # Pallas kernels, from the cost estimates they carry
  hbm_bytes: float
  collectives: list[Collective]
  kernels_without_estimate: list[str]  # Pallas kernels whose work is not counted
  loops_without_trip_count: list[str]  # counted as running once

  @property
  def flops(self) -> float:
    return self.matmul_flops + self.kernel_flops

  def by_kind(self) -> list[dict]:
    """The collectives summed by (kind, mesh axes): instructions, runs per step, payload and
    wire bytes per device per step, and the share of those bytes that overlaps compute."""
    rows: dict[tuple, dict] = {}
    names: dict[tuple, set] = {}
    for c in self.collectives:
      key = (c.kind, c.axes, c.across_slices)
      row = rows.setdefault(
          key,
          {
              'kind': c.kind,
              'axes': 'x'.join(c.axes) or '-',
              'network': 'DCN' if c.across_slices else 'ICI',
              'instructions': 0,
              'runs': 0.0,
              'payload_bytes': 0.0,
              'wire_bytes': 0.0,
              'overlapped_bytes': 0.0,
          },
      )
      if c.instruction not in names.setdefault(key, set()):
        names[key].add(c.instruction)
        row['instructions'] += 1
        row['runs'] += c.times
      row['payload_bytes'] += c.payload_bytes * c.times
      row['wire_bytes'] += c.wire_bytes * c.times
      row['overlapped_bytes'] += c.wire_bytes * c.times if c.overlapped else 0.0
    return sorted(rows.values(), key=lambda r: -r['wire_bytes'])

  def by_tensor(self, limit: int = 12) -> list[dict]:
    """The largest movers: collectives grouped by the parameter they move (or, for activations,
    by kind, axes and the JAX operation), with wire bytes per device per step."""
    rows: dict[tuple, dict] = {}
    for c in self.collectives:
      what = c.tensor or f'activation ({c.op_name.split("/")[-1] or "?"})'
      key = (c.kind, c.axes, what)
      row = rows.setdefault(
          key,
          {
              'tensor': what,
              'kind': c.kind,
              'axes': 'x'.join(c.axes) or '-',
              'runs': 0.0,
              'wire_bytes': 0.0,
              'overlapped': True,
          },
      )
      row['runs'] += c.times
      row['wire_bytes'] += c.wire_bytes * c.times
      row['overlapped'] = row['overlapped'] and c.overlapped
    return sorted(rows.values(), key=lambda r: -r['wire_bytes'])[:limit]


def _is_reduce_scatter_fusion(comp: Computation) -> bool:
  """The TPU compiler's fused reduce-scatter: an all-reduce whose result the device slices."""
  ops = {inst.op for inst in comp.instructions}
  return comp.name.startswith('all-reduce-scatter') or (
      'all-reduce' in ops and 'dynamic-slice' in ops and len(comp.instructions) < 20
  )


_COMPUTE = ('fusion', 'convolution', 'dot', 'custom-call')


def _moved_arrays(kind, inst, source, comp, comps) -> list[Array]:
  """The full arrays a collective moves (a combined collective moves a tuple of several): the
  results of an all-gather, the operands of the others."""
  if source is not inst:  # a fused reduce-scatter: the operands of the all-reduce inside
    inner = comps[next(n for n in inst.called() if n in comps)]
    return [a for name in source.operands for a in parse_arrays(inner.shapes.get(name, ''))]
  if kind == 'all-gather':
    results = parse_arrays(inst.shape)
    # An all-gather-start's shape is the tuple (operands, results).
    return results[len(results) // 2 :] if inst.op.endswith('-start') else results
  return [a for name in inst.operands for a in parse_arrays(comp.shapes.get(name, ''))]


def _overlaps_compute(inst: Instruction, schedule: list[Instruction], position: int) -> bool:
  """An asynchronous start (or send) with compute scheduled before the instruction that ends it:
  its namesake "done" (`async-collective-start.3` ... `async-collective-done.3`: the fusions
  between them carry the collective along while computing), else the first to read its result."""
  twin = inst.name.replace('start', 'done')
  end = next((j for j in range(position + 1, len(schedule)) if schedule[j].name == twin), None)
  names = {inst.name}
  for j in range(position + 1, len(schedule) if end is None else 0):
    if names & set(schedule[j].operands):
      if schedule[j].op != 'get-tuple-element':
        end = j
        break
      names.add(schedule[j].name)
  return end is not None and any(s.op in _COMPUTE for s in schedule[position + 1 : end])


def _dcn_transfers(inst, comp, position, times, dcn_axes, dcn_group, tensor_of) -> list[Collective]:
  """A transfer to the multi-slice runtime: a collective over the mesh axes spanning slices, of
  the array it sends (its tuple's first element)."""
  kind = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', inst.attrs)[1]
  kind = kind.lower().replace('_', '-')
  arrays = parse_arrays(comp.shapes.get(inst.operands[0], '')) if inst.operands else []
  out = []
  for array in arrays:
    # An all-gather sends its shard and receives the others: its result is group x the shard.
    payload = array.bytes * (dcn_group if kind == 'all-gather' else 1)
    out.append(
        Collective(
            kind=kind,
            axes=dcn_axes,
            group_size=dcn_group,
            payload_bytes=payload,
            times=times,
            overlapped=_overlaps_compute(inst, comp.instructions, position),
            across_slices=True,
            dims=array.dims,
            dtype=array.dtype,
            op_name=inst.op_name,
            instruction=inst.name,
            tensor=tensor_of(array.dims),
        )
    )
  return out


def _hbm_bytes(inst: Instruction, comp: Computation, comps: dict[str, Computation]) -> float:
  """HBM bytes one top-level instruction reads and writes. A slice read by a dynamic-slice and an
  update written in place by a dynamic-update-slice (the stacked weights and saved activations of
  a scanned loop, one layer at a time) count as the slice, not the whole buffer, as in XLA's own
  cost analysis; so do fused ones, through nested fusions and bitcasts."""
  operands = [comp.shapes.get(name, '') for name in inst.operands]
  if inst.op == 'copy-start':  # a prefetch: HBM read once (the result is its destination)
    return shape_bytes(operands[0], hbm_only=True) if operands else 0.0
  if inst.op in ('slice', 'dynamic-slice', 'slice-start'):
    # Reads the slice (from HBM unless its source is on chip) and writes it. An asynchronous
    # slice-start ((source), slice, context) is how the TPU compiler prefetches a piece of a
    # buffer into on-chip memory: one read of the piece.
    arrays = parse_arrays(inst.shape)
    piece = arrays[-2] if inst.op == 'slice-start' and len(arrays) > 2 else arrays[0]
    from_hbm = bool(operands) and not _on_chip(operands[0])
    return piece.bytes * (from_hbm + (not piece.on_chip))
  if inst.op == 'dynamic-update-slice' and len(operands) > 1:
    return 2 * shape_bytes(operands[1], hbm_only=True)
  body = comps.get(inst.called()[0]) if inst.op == 'fusion' and inst.called() else None
  if body is None:
    return shape_bytes(inst.shape, hbm_only=True) + sum(
        shape_bytes(o, hbm_only=True) for o in operands
    )
  moved = 0.0
  for index, shape in enumerate(operands):
    if not _on_chip(shape):
      moved += _read(body, _parameter(body, index), shape_bytes(shape), comps)
  root = body.instructions[-1] if body.instructions else None
  outputs = (
      [root]
      if root is None or root.op != 'tuple'
      else [body.by_name.get(name) for name in root.operands]
  )
  for array, out in zip(parse_arrays(inst.shape), outputs):
    if not array.on_chip:
      moved += _written(body, out, array.bytes, comps)
  return moved


def _parameter(body: Computation, index: int) -> str:
  return next(
      (i.name for i in body.instructions if i.op == 'parameter' and i.literal == str(index)), ''
  )


def _read(body: Computation, name: str, whole: float, comps, depth: int = 0) -> float:
  """Bytes a fused computation reads of its value `name` (a parameter, or a bitcast of one):
  only the slices when every use is a dynamic-slice (or an in-place update), else all of it."""
  total = 0.0
  for user in (i for i in body.instructions if name in i.operands):
    first = user.operands[0] == name
    if user.op == 'dynamic-slice' and first:
      total += shape_bytes(user.shape)
    elif user.op == 'dynamic-update-slice' and first:
      continue  # updated in place: the write is counted at the output
    elif user.op == 'bitcast' and depth < 8:
      total += _read(body, user.name, whole, comps, depth + 1)
    elif user.op == 'fusion' and user.called() and user.called()[0] in comps and depth < 8:
      inner = comps[user.called()[0]]
      for index, operand in enumerate(user.operands):
        if operand == name:
          total += _read(inner, _parameter(inner, index), whole, comps, depth + 1)
    else:
      return whole
  return min(total, whole)


def _written(body: Computation, out: Instruction | None, whole: float, comps, depth=0) -> float:
  """Bytes a fused computation writes for its result `out`: the update of an in-place
  dynamic-update-slice (read and written), else the whole result."""
  while out is not None and out.op == 'bitcast' and out.operands and depth < 8:
    out, depth = body.by_name.get(out.operands[0]), depth + 1
  if out is None:
    return whole
  if out.op == 'dynamic-update-slice' and len(out.operands) > 1:
    return 2 * shape_bytes(body.shapes.get(out.operands[1], ''))
  if out.op == 'fusion' and out.called() and out.called()[0] in comps and depth < 8:
    inner = comps[out.called()[0]]
    root = inner.instructions[-1] if inner.instructions else None
    if root is not None and root.op != 'tuple':
      return _written(inner, root, whole, comps, depth + 1)
  return whole


def _on_chip(shape: str) -> bool:
  arrays = parse_arrays(shape)
  return bool(arrays) and all(a.on_chip for a in arrays)


def analyze(
    text: str,
    mesh_shape: dict[str, int],
    slice_shape: dict[str, int] | None = None,
    parameter_shapes: dict[tuple[int, ...], str] | None = None,
) -> ProgramCost:
  """The per-device cost of one run of the optimized HLO module `text` of a program compiled for a
  mesh of `mesh_shape` (axis name -> size, in the mesh's order).

  Several TPU slices: `slice_shape` is the part of the mesh inside one slice. The TPU compiler
  then writes one slice's program (its device ids number that slice's devices), and the
  collectives between slices are transfers to the multi-slice runtime over the data-centre
  network (`send`s marked `_xla_megascale_transfer_type`), which run over the mesh axes that span
  slices. `parameter_shapes`: full parameter shapes -> a name, to say which tensor a collective
  moves."""
  comps = parse(text)
  counts, unknown_loops = run_counts(comps)
  local = dict(slice_shape or mesh_shape)
  num_devices = math.prod(local.values())
  dcn_axes = tuple(a for a in mesh_shape if mesh_shape[a] > local.get(a, 1))
  dcn_group = math.prod(mesh_shape[a] // local.get(a, 1) for a in dcn_axes)
  fused_bodies = set()
  for comp in comps.values():
    for inst in comp.instructions:
      if inst.op in ('fusion',):
        fused_bodies.update(inst.called())
  reduce_scatters = {
      name for name in fused_bodies if name in comps and _is_reduce_scatter_fusion(comps[name])
  }
  shapes = parameter_shapes or {}

  def tensor_of(dims: tuple[int, ...]) -> str:
    squeezed = tuple(d for d in dims if d != 1)
    return shapes.get(dims) or shapes.get(squeezed) or ''

  # Asynchronous collective fusions: the TPU compiler moves a collective into a fused "start"
  # computation and repeats it (same channel) in the "done" one; it runs once, overlapped with
  # whatever is scheduled between the two fusions.
  callers = {}
  for comp in comps.values():
    for position, inst in enumerate(comp.instructions):
      for name in inst.called():
        callers.setdefault(name, (comp, inst, position))
  seen_channels: set[str] = set()
  collectives, kernels_unknown = [], []
  matmul = kernel = hbm = 0.0
  for comp in comps.values():
    times = counts.get(comp.name, 0)
    if not times:
      continue
    fused = comp.name in fused_bodies
    schedule = comp.instructions
    for position, inst in enumerate(schedule):
      op = inst.op
      if op in ('dot', 'convolution'):
        matmul += times * matmul_flops(inst, comp)
      if op == 'custom-call' and 'tpu_custom_call' in inst.attrs:
        estimate = kernel_estimate(inst)
        flops = estimate.get('flops', 0.0) if estimate else attention_kernel_flops(inst, comp)
        kernel += times * (flops or 0.0)
        if flops is None:
          kernels_unknown.append(inst.op_name.split('/')[-2] if '/' in inst.op_name else inst.name)
      if op == 'send' and '_xla_megascale_transfer_type' in inst.attrs:
        collectives.extend(
            _dcn_transfers(inst, comp, position, times, dcn_axes, dcn_group, tensor_of)
        )
        continue
      # Collectives: plain, asynchronous (-start), and the fused reduce-scatters.
      kind, source, asynchronous = None, inst, op.endswith('-start')
      base = op[: -len('-start')] if asynchronous else op
      if base in COLLECTIVES and comp.name not in reduce_scatters:
        kind = base
      elif op == 'fusion' and set(inst.called()) & reduce_scatters:
        inner = comps[next(iter(set(inst.called()) & reduce_scatters))]
        source = next((i for i in inner.instructions if i.op == 'all-reduce'), None)
        kind = 'reduce-scatter' if source is not None else None
      channel = re.search(r'channel_id=(\d+)', source.attrs)
      parent = callers.get(comp.name)
      if fused and parent and 'done' in parent[1].name:
        kind = None  # the "done" half of an asynchronous collective fusion: counted at its start
      if kind is not None and fused and channel and channel[1] in seen_channels:
        kind = None  # the same collective carried through another fusion of its chain
      if kind is not None:
        if fused and channel:
          seen_channels.add(channel[1])
        groups = replica_groups(source, num_devices)
        overlapped = asynchronous and _overlaps_compute(inst, schedule, position)
        if fused and parent and 'start' in parent[1].name:
          overlapped = _overlaps_compute(parent[1], parent[0].instructions, parent[2])
        for array in _moved_arrays(kind, inst, source, comp, comps):
          collectives.append(
              Collective(
                  kind=kind,
                  axes=group_axes(groups, local),
                  group_size=len(groups[0]) if groups else 1,
                  payload_bytes=array.bytes,
                  times=times,
                  overlapped=overlapped,
                  across_slices=False,
                  dims=array.dims,
                  dtype=array.dtype,
                  op_name=inst.op_name or source.op_name,
                  instruction=inst.name,
                  tensor=tensor_of(array.dims),
              )
          )
      # HBM traffic of what runs outside fusions.
      if fused or op in _BOOKKEEPING:
        continue
      hbm += times * _hbm_bytes(inst, comp, comps)
  return ProgramCost(
      matmul_flops=matmul,
      kernel_flops=kernel,
      hbm_bytes=hbm,
      collectives=collectives,
      kernels_without_estimate=sorted(set(kernels_unknown)),
      loops_without_trip_count=unknown_loops,
  )
