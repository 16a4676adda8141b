"""Where a compiled step spends its time: a JAX profiler trace of a few steps, with each executed
XLA op assigned to a part of the model (attention, matmuls, rotary embeddings, LPIPS, the
optimizer update, the rest).

The trace's op events name the compiled program's HLO instructions (see `op_times`). The compiled HLO text tells, for every
instruction, which computations it runs (a fusion's body) and the JAX name stack it came from
(`metadata={op_name=...}`), which carries the `jax.named_scope`s the model code opens: the
attention core (scores, softmax, weighted sum, or the fused kernel) is `attention_core`, RoPE is
`rope`, the loss's LPIPS network is `lpips`, the AdamW/EMA update is `optimizer`. Gradients keep the
scope (`transpose(jvp(attention_core))/...`), so backward ops land in the same part as their
forward. A matmul is any dot, convolution or library GEMM call left after those. Shares are of
the summed op time (on a multi-threaded CPU, of the threads' busy time).
"""

import collections
import glob
import os
import re
import tempfile
from typing import Callable

import jax

# Parts, in the order they are tested: the first whose rule matches an op wins.
SCOPED_PARTS = ('lpips', 'attention_core', 'rope', 'optimizer')
PART_NAMES = {'attention_core': 'attention'}
MATMUL_OPCODES = ('dot', 'convolution')
MATMUL_CUSTOM_CALLS = ('gemm', 'cublas', 'matmul', 'onednn', 'xnn', 'ynn')

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([\w\-]+)\(')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _in_scope(op_name: str, scope: str) -> bool:
  return re.search(rf'(^|[/(]){scope}($|[/)])', op_name) is not None


def parse_hlo(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {'opcode', 'op_name', 'target', 'calls', 'computation'}} of every
  instruction of every computation in an HLO module's text."""
  instructions = {}
  computation = ''
  for line in hlo_text.splitlines():
    if not line[:1].isspace() and _COMPUTATION.match(line):  # a computation's header
      computation = _COMPUTATION.match(line).group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode = match.groups()
    calls = []
    for group in _CALLS.findall(line):
      calls += [c.strip().lstrip('%') for c in group.split(',') if c.strip()]
    op_name = _OP_NAME.search(line)
    target = _CUSTOM_CALL_TARGET.search(line)
    instructions[name] = dict(
        opcode=opcode,
        op_name=op_name.group(1) if op_name else '',
        target=target.group(1) if target else '',
        calls=calls,
        computation=computation,
    )
  return instructions


def classify(hlo_text: str) -> dict[str, str]:
  """{instruction name: part} for every instruction (see the module docstring for the rules)."""
  instructions = parse_hlo(hlo_text)
  by_computation = collections.defaultdict(list)
  for info in instructions.values():
    by_computation[info['computation']].append(info)

  def contents(info, seen):
    """The instruction and everything in the computations it calls (fusion bodies), recursively."""
    out = [info]
    for callee in info['calls']:
      if callee not in seen:
        seen.add(callee)
        for inner in by_computation.get(callee, []):
          out += contents(inner, seen)
    return out

  parts = {}
  for name, info in instructions.items():
    ops = contents(info, set())
    part = next((p for p in SCOPED_PARTS if any(_in_scope(op['op_name'], p) for op in ops)), None)
    if part is None:
      matmul = any(
          op['opcode'] in MATMUL_OPCODES
          or (op['opcode'] == 'custom-call' and any(m in op['target'] for m in MATMUL_CUSTOM_CALLS))
          for op in ops
      )
      part = 'matmul' if matmul else 'other'
    parts[name] = PART_NAMES.get(part, part)
  return parts


def _has_events(plane) -> bool:
  return any(next(iter(line.events), None) is not None for line in plane.lines)


def op_times(trace_dir: str, known_names: set[str]) -> dict[str, float]:
  """Summed durations in seconds, per HLO instruction name, of the op events of the newest trace
  under `trace_dir`.

  Accelerators: the device planes ('/device:...'), their 'XLA Ops' line where there is one (TPU),
  else every stream line, each kernel event naming its instruction in its `hlo_op` stat (GPU); the
  host's planes then only hold launch calls and are left out. CPU: the host plane, whose worker
  threads' events are named after the instructions (thunks) they ran (device planes without
  events are left out)."""
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))
  if not paths:
    raise FileNotFoundError(f'no *.xplane.pb trace under {trace_dir}')
  data = jax.profiler.ProfileData.from_file(paths[-1])
  # Device planes with events: libtpu's profiler plugin, once loaded (e.g. to compile for a TPU
  # slice), adds an empty '/device:CUSTOM:Megascale Trace' plane to every trace, CPU ones too.
  devices = [p for p in data.planes if p.name.startswith('/device:') and _has_events(p)]
  lines = []
  for plane in devices or data.planes:
    xla_ops = [line for line in plane.lines if line.name == 'XLA Ops']
    lines += xla_ops or list(plane.lines)
  times = collections.Counter()
  for line in lines:
    for event in line.events:
      name = dict(event.stats).get('hlo_op', event.name)
      if name in known_names:
        times[name] += event.duration_ns * 1e-9
  return dict(times)


def step_breakdown(
    run_step: Callable[[], None], hlo_text: str, steps: int = 3, trace_dir: str = ''
) -> dict:
  """Traces `steps` calls of `run_step` (which must block until its step is done) and returns
  {'seconds_per_step': {part: s}, 'share': {part: fraction}, 'traced_s_per_step': total} over
  the compiled program `hlo_text`. With `trace_dir` the trace stays there (for TensorBoard's or
  XProf's profile viewer), with the program's HLO beside it as `step.hlo.txt`."""
  parts = classify(hlo_text)
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = trace_dir or scratch
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, 'step.hlo.txt'), 'w') as f:
      f.write(hlo_text)
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(steps):
        run_step()
    finally:
      jax.profiler.stop_trace()
    times = op_times(trace_dir, set(parts))
  per_part = collections.Counter()
  for name, seconds in times.items():
    per_part[parts[name]] += seconds / steps
  total = sum(per_part.values())
  order = ('attention', 'matmul', 'rope', 'lpips', 'optimizer', 'other')
  return {
      'seconds_per_step': {p: per_part.get(p, 0.0) for p in order},
      'share': {p: (per_part.get(p, 0.0) / total if total else float('nan')) for p in order},
      'traced_s_per_step': total,
  }
