"""What one run of a compiled program does, read from its optimized HLO text (`compiled.as_text()`):
its collectives (kind, bytes, the mesh axes they run over, whether they overlap compute), its matmul
FLOPs and its HBM traffic, with every loop counted as often as it runs.

Why not `compiled.cost_analysis()` alone: XLA counts the body of a `while` loop once, not once per
iteration (a `lax.scan` over 24 blocks reports about 1/24 of its matmuls, on CPU and TPU alike),
and it does not see inside Pallas kernels. Here every computation is weighted by how many times it
runs: a loop body by its trip count (XLA's `known_trip_count` when printed, else read off the
loop's condition and induction variable, as JAX lowers `scan` and `fori_loop`), a fused or called
computation as often as its caller. Pallas TPU kernels count with the cost estimate they carry.

Conventions, per device (the SPMD program is the same on every device):
  * matmul FLOPs: 2 x (output elements) x (contracted elements) of every `dot` and `convolution`;
    elementwise work is left out, as in the usual model-FLOPs convention.
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
import json
import math
import re
from typing import Sequence

import numpy as np

_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5,
}  # fmt: skip
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+) = (?P<shape>.+?) (?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$'
)
_HEADER = re.compile(r'^(ENTRY\s+)?%(?P<name>[^\s(]+)\s*\((?P<params>.*)\)\s*->.*\{\s*$')
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
# Instructions that read or write no HBM of their own.
_BOOKKEEPING = {
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call',
    'conditional', 'after-all', 'partition-id', 'replica-id', 'copy-done', 'iota',
    'opt-barrier', 'add-dependency', 'all-gather-done', 'all-reduce-done',
    'collective-permute-done', 'async-done', 'send-done', 'recv-done',
}  # fmt: skip


def _dtype_bytes(dtype: str) -> float:
  if dtype.startswith(('f8', 'f4')):
    return 1
  return _BYTES.get(dtype, 0)


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  on_chip: bool  # placed by XLA in a memory space other than HBM (VMEM, SMEM, ...)

  @property
  def bytes(self) -> float:
    return math.prod(self.dims) * _dtype_bytes(self.dtype)


def parse_arrays(shape: str) -> list[Array]:
  """Every array of an HLO shape string (a tuple gives several; tokens none)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if _dtype_bytes(dtype) == 0:
      continue
    space = re.search(r'S\((\d+)\)', layout or '')
    dims = tuple(int(d) for d in dims.split(',') if d)
    out.append(Array(dtype, dims, bool(space and space[1] != '0')))
  return out


def _bytes(shape: str, hbm_only: bool = False) -> float:
  return sum(a.bytes for a in parse_arrays(shape) if not (hbm_only and a.on_chip))


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  shape: str
  operands: list[str]  # names of the operand instructions
  literal: str  # the raw text between the parentheses (a constant's value)
  attrs: str

  def attr(self, key: str) -> str | None:
    m = re.search(rf'\b{key}=%?([\w.\-]+)', self.attrs)
    return m[1] if m else None

  def called(self) -> list[str]:
    """The computations this instruction runs (fusion bodies, loop bodies, branches, ...)."""
    names = re.findall(
        r'\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)',
        self.attrs,
    )
    for group in re.findall(r'(?:branch_computations|called_computations)=\{([^}]*)\}', self.attrs):
      names += re.findall(r'%([\w.\-]+)', group)
    return names

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m[1] if m else ''


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: list[Instruction]
  shapes: dict[str, str]  # instruction or parameter name -> shape string

  def __post_init__(self):
    self.by_name = {inst.name: inst for inst in self.instructions}


def _split_operands(rest: str) -> tuple[str, str]:
  """'%a, %b), attr=...' -> ('%a, %b', ', attr=...'): the operand list up to its closing
  parenthesis (operands may hold parentheses of their own) and the attributes after it."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch == '(':
      depth += 1
    elif ch == ')':
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1 :]
  return rest, ''


def parse(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text, by name."""
  comps: dict[str, Computation] = {}
  name, entry, instructions, shapes = None, False, [], {}
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      name, entry, instructions = header['name'], bool(header[1]), []
      shapes = dict(re.findall(r'([\w.\-]+): ([^:]+?)(?=, [\w.\-]+: |$)', header['params']))
      continue
    if name is None:
      continue
    if line.rstrip() == '}':  # (a kernel's metadata may hold newlines: lines that start with })
      comps[name] = Computation(name, entry, instructions, shapes)
      name = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      operands, attrs = _split_operands(m['rest'])
      inst = Instruction(
          m['name'], m['op'], m['shape'], re.findall(r'%([\w.\-]+)', operands), operands, attrs
      )
      instructions.append(inst)
      shapes[inst.name] = inst.shape
    elif instructions:  # the rest of an attribute that holds a newline
      instructions[-1].attrs += '\n' + line
  return comps


# ------------------------------------------------------------------------------------------------
# How often each computation runs.
# ------------------------------------------------------------------------------------------------


def _source(comp: Computation, name: str) -> Instruction | None:
  """The instruction behind `name`, looking through copies, converts and bitcasts."""
  inst = comp.by_name.get(name)
  while inst is not None and inst.op in ('copy', 'convert', 'bitcast') and inst.operands:
    inst = comp.by_name.get(inst.operands[0])
  return inst


def _integer(comp: Computation, name: str) -> int | None:
  inst = _source(comp, name)
  if inst is None or inst.op != 'constant' or not re.match(r'[su]\d+\[\]', inst.shape):
    return None
  m = re.fullmatch(r'\s*(-?\d+)\s*', inst.literal)
  return int(m[1]) if m else None


def _tuple_index(comp: Computation, name: str) -> int | None:
  """Which element of the computation's parameter tuple `name` reads, if it reads one."""
  inst = _source(comp, name)
  if inst is not None and inst.op == 'get-tuple-element':
    m = re.search(r'index=(\d+)', inst.attrs)
    return int(m[1]) if m else None
  return None


def trip_count(loop: Instruction, comps: dict[str, Computation]) -> int | None:
  """Iterations of a `while`: XLA's known_trip_count when printed; else JAX's loop pattern, an
  induction variable (a tuple element) starting at 0, compared LT against a constant bound in the
  condition and advanced by a constant step in the body. None when neither is found."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if m:
    return int(m[1])
  cond, body = comps.get(loop.attr('condition') or ''), comps.get(loop.attr('body') or '')
  if cond is None or body is None:
    return None
  for inst in cond.instructions:
    if inst.op != 'compare' or 'direction=LT' not in inst.attrs or len(inst.operands) != 2:
      continue
    index, bound = _tuple_index(cond, inst.operands[0]), _integer(cond, inst.operands[1])
    if index is None or bound is None:
      continue
    for add in body.instructions:
      if add.op != 'add' or len(add.operands) != 2:
        continue
      for var, step in (add.operands, add.operands[::-1]):
        value = _integer(body, step)
        if value and value > 0 and _tuple_index(body, var) == index:
          return max(0, -(-bound // value))
  return None


def run_counts(comps: dict[str, Computation]) -> tuple[dict[str, float], list[str]]:
  """How many times each computation runs per run of the entry computation, and the loops whose
  trip count could not be read (counted once)."""
  counts: dict[str, float] = {}
  unknown = []
  entry = next(c for c in comps.values() if c.entry)

  def visit(comp: Computation, times: float):
    counts[comp.name] = counts.get(comp.name, 0) + times
    for inst in comp.instructions:
      if inst.op == 'while':
        trips = trip_count(inst, comps)
        if trips is None:
          unknown.append(inst.name)
          trips = 1
        body, cond = inst.attr('body'), inst.attr('condition')
        if body in comps:
          visit(comps[body], times * trips)
        if cond in comps:
          visit(comps[cond], times * (trips + 1))
        continue
      for name in inst.called():
        # Reductions' scalar lambdas (to_apply) run per element; they hold no matmul or
        # collective, so they are not walked.
        if name in comps and f'to_apply=%{name}' not in inst.attrs:
          visit(comps[name], times)

  visit(entry, 1)
  return counts, unknown


# ------------------------------------------------------------------------------------------------
# Replica groups -> mesh axes.
# ------------------------------------------------------------------------------------------------


def _iota(text: str) -> np.ndarray:
  """'[4,2]<=[2,4]T(1,0)' / '[2,2]T(1,0)' / '[8]' -> the device ids in that iota arrangement."""
  m = re.fullmatch(r'\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?', text.replace(' ', ''))
  if not m:
    raise ValueError(f'not an iota device list: {text!r}')
  dims = [int(d) for d in m[1].split(',')]
  reshape = [int(d) for d in (m[2] or m[1]).split(',')]
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  if m[3]:
    ids = ids.transpose([int(p) for p in m[3].split(',')])
  return ids.reshape(dims) if m[2] else ids


def replica_groups(inst: Instruction, num_devices: int) -> list[list[int]]:
  """The groups of logical device ids an instruction's collective runs over, from any of the
  formats XLA prints: explicit lists, iota lists, and mesh axes."""
  attrs = inst.attrs
  pairs = re.search(r'source_target_pairs=\{(.*?)\}\}', attrs)
  if pairs:
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)', pairs[1] + '}')]
  mesh = re.search(
      r'replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}', attrs
  )
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh[1])
    sizes = [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if mesh[2]:
      ids = (
          _iota(mesh[2]).ravel()
          if '[' in mesh[2]
          else np.array([int(d) for d in mesh[2].split(',')])
      )
    # A grouped axis may be a sub-axis "'a':(pre)size": split that mesh axis into
    # [pre, size, rest] and group over the middle part.
    dims, grouped, offset = [], [], {}
    refs = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", mesh[3])
    index = {n: i for i, (n, _) in enumerate(axes)}
    split = {index[n]: (int(pre), int(size)) for n, pre, size in refs if pre}
    for i, size in enumerate(sizes):
      offset[i] = len(dims)
      if i in split:
        pre, sub = split[i]
        dims += [pre, sub, size // (pre * sub)]
      else:
        dims.append(size)
    for n, pre, _ in refs:
      grouped.append(offset[index[n]] + (1 if pre else 0))
    keep = [d for d in range(len(dims)) if d not in grouped]
    group_size = math.prod(dims[d] for d in grouped)
    arranged = ids.reshape(dims).transpose(keep + grouped).reshape(-1, group_size)
    return arranged.tolist()
  iota = re.search(r'replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)', attrs)
  if iota:
    return _iota(iota[1]).tolist()
  listed = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', attrs)
  if listed and listed[1]:
    return [[int(d) for d in g.split(',') if d] for g in re.findall(r'\{([\d,]*)\}', listed[1])]
  return [list(range(num_devices))]  # no groups: every device takes part


def group_axes(groups: Sequence[Sequence[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """The mesh axes along which the devices of a group differ: the axes a collective runs over.
  Logical device ids are positions in the mesh's row-major device order (jit's device
  assignment)."""
  shape = tuple(mesh_shape.values())
  varying = set()
  for group in groups:
    coords = np.array(np.unravel_index(np.asarray(group, dtype=np.int64), shape)).T
    varying |= {i for i in range(len(shape)) if len(set(coords[:, i])) > 1}
  return tuple(name for i, name in enumerate(mesh_shape) if i in varying)


# ------------------------------------------------------------------------------------------------
# The accounting.
# ------------------------------------------------------------------------------------------------


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


def _kernel_estimate(inst: Instruction) -> dict | None:
  m = re.search(r'"cost_estimate":(\{[^}]*\})', inst.attrs)
  if not m:
    return None
  try:
    return {k: float(v) for k, v in json.loads(m[1]).items()}
  except (ValueError, TypeError):
    return None


def _window(attrs: str, key: str, count: int, default: int) -> list[int]:
  m = re.search(rf'\b{key}=([-\d_x]+)', attrs)
  if not m:
    return [default] * count
  return [int(v.split('_')[0]) if key == 'pad' else int(v) for v in m[1].split('x')]


def _convolution_flops(attrs: str, out: Array, lhs: Array, rhs: Array) -> float:
  """2 x (output batch x output features) x input features x, per spatial dimension, the window
  taps that meet input elements summed over the output positions (padding and the holes of a
  dilated input meet none). The TPU compiler writes batched matmuls as convolutions over padded
  or dilated size-1 "spatial" dimensions, where counting whole windows would count 10x too many."""
  m = re.search(r'dim_labels=([^_]+)_([^-]+)->([\w]+)', attrs)
  if not m:
    return 0.0
  lhs_labels, rhs_labels, out_labels = m[1], m[2], m[3]
  spatial = sum(ch.isdigit() for ch in lhs_labels)
  size = [rhs.dims[rhs_labels.index(str(d))] for d in range(spatial)]
  size = _window(attrs, 'size', spatial, 1) if 'window=' in attrs else size
  stride = _window(attrs, 'stride', spatial, 1)
  pad_low = _window(attrs, 'pad', spatial, 0)
  lhs_dilate = _window(attrs, 'lhs_dilate', spatial, 1)
  rhs_dilate = _window(attrs, 'rhs_dilate', spatial, 1)
  taps = 1
  for d in range(spatial):
    extent = (lhs.dims[lhs_labels.index(str(d))] - 1) * lhs_dilate[d] + 1
    outputs = np.arange(out.dims[out_labels.index(str(d))])[:, None]
    where = outputs * stride[d] + np.arange(size[d])[None, :] * rhs_dilate[d] - pad_low[d]
    taps *= int(np.sum((where >= 0) & (where < extent) & (where % lhs_dilate[d] == 0)))
  batch = out.dims[out_labels.index('b')]
  features = out.dims[out_labels.index('f')]
  return 2.0 * batch * features * rhs.dims[rhs_labels.index('i')] * taps


# Matmuls of L_q x L_k x head_dim per head in flash attention's kernels, recomputation included:
# the forward pass 2 (q k^T, p v), the dq kernel 3 (s, dp, dq), the dkv kernel 4 (s, dp, dv,
# dk), a fused backward 5.
_ATTENTION_MATMULS = (('dkv', 4), ('dq', 3), ('bwd', 5), ('', 2))


def _attention_kernel_flops(inst: Instruction, comp: Computation) -> float | None:
  """FLOPs of a Pallas flash / splash attention kernel that carries no cost estimate (self-
  attention: as many keys as queries), from its query operand (..., L, head_dim); None for
  other kernels."""
  name = f'{inst.name} {inst.op_name}'.lower()
  if 'flash' not in name and 'splash' not in name:
    return None
  for operand in inst.operands:
    for q in parse_arrays(comp.shapes.get(operand, '')):
      if q.dtype in ('bf16', 'f32', 'f16') and len(q.dims) >= 3 and q.dims[-1] <= 256:
        matmuls = next(n for key, n in _ATTENTION_MATMULS if key in name.split('/')[-1] + name)
        return 2.0 * matmuls * math.prod(q.dims[:-2]) * q.dims[-2] ** 2 * q.dims[-1]
  return None


def _matmul_flops(inst: Instruction, comp: Computation) -> float:
  out = parse_arrays(inst.shape)
  if not out or len(inst.operands) < 2:
    return 0.0
  lhs = parse_arrays(comp.shapes.get(inst.operands[0], ''))
  rhs = parse_arrays(comp.shapes.get(inst.operands[1], ''))
  if not lhs or not rhs:
    return 0.0
  if inst.op == 'dot':
    m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', inst.attrs)
    dims = [int(d) for d in m[1].split(',') if d] if m else []
    contracted = math.prod(lhs[0].dims[d] for d in dims)
  else:
    return _convolution_flops(inst.attrs, out[0], lhs[0], rhs[0])
  return 2.0 * math.prod(out[0].dims) * contracted


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
    return _bytes(operands[0], hbm_only=True) if operands else 0.0
  if inst.op == 'dynamic-slice':
    return 2 * _bytes(inst.shape, hbm_only=True)
  if inst.op == 'dynamic-update-slice' and len(operands) > 1:
    return 2 * _bytes(operands[1], hbm_only=True)
  body = comps.get(inst.called()[0]) if inst.op == 'fusion' and inst.called() else None
  if body is None:
    return _bytes(inst.shape, hbm_only=True) + sum(_bytes(o, hbm_only=True) for o in operands)
  moved = 0.0
  for index, shape in enumerate(operands):
    if not _on_chip(shape):
      moved += _read(body, _parameter(body, index), _bytes(shape), comps)
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
      total += _bytes(user.shape)
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
    return 2 * _bytes(body.shapes.get(out.operands[1], ''))
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
        matmul += times * _matmul_flops(inst, comp)
      if op == 'custom-call' and 'tpu_custom_call' in inst.attrs:
        estimate = _kernel_estimate(inst)
        flops = estimate.get('flops', 0.0) if estimate else _attention_kernel_flops(inst, comp)
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
