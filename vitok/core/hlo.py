"""Reading a compiled program's optimized HLO text (`compiled.as_text()`): its arrays,
instructions and computations, how many times each computation runs, the mesh axes a collective's
replica groups span, and the FLOPs of one matmul or Pallas kernel. `vitok/core/hlo_cost.py` adds
these up into what one run of the program costs each device.

Why read the text at all, not `compiled.cost_analysis()` alone: XLA counts the body of a `while`
loop once, not once per iteration (a `lax.scan` over 24 blocks reports about 1/24 of its matmuls,
on CPU and TPU alike), and it does not see inside Pallas kernels. Here every computation is
weighted by how many times it runs: a loop body by its trip count (XLA's `known_trip_count` when
printed, else read off the loop's condition and induction variable, as JAX lowers `scan` and
`fori_loop`), a fused or called computation as often as its caller. Pallas TPU kernels count with
the cost estimate they carry; flash / splash attention kernels without one by their matmuls.

Matmul FLOPs: 2 x (output elements) x (contracted elements) of every `dot` and `convolution`;
elementwise work is left out, as in the usual model-FLOPs convention.
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


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
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
# FLOPs of one instruction.
# ------------------------------------------------------------------------------------------------


def kernel_estimate(inst: Instruction) -> dict | None:
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


def convolution_flops(attrs: str, out: Array, lhs: Array, rhs: Array) -> float:
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


def attention_kernel_flops(inst: Instruction, comp: Computation) -> float | None:
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


def matmul_flops(inst: Instruction, comp: Computation) -> float:
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
    return convolution_flops(inst.attrs, out[0], lhs[0], rhs[0])
  return 2.0 * math.prod(out[0].dims) * contracted
