r"""Plans variants of one config for one TPU slice with the TPU compiler and ranks them: the tuning
loop of `launch.plan --topology`, one compile per variant.

    python -m launch.plan_sweep --config=configs/dit.py:ucf101 --topology=v5p-128 \
        --variants='preset: ; fsdp: mesh.shape=16x4 ; splash: mesh.shape=16x4,model.attention=splash_tpu' \
        --out=/tmp/dit_v5p.md

Each variant is `name: field=value,field=value` (config fields as --config.<field> takes them;
nothing after the colon: the config as given); variants are separated by `;`. Every variant runs
`python -m launch.plan` in its own process (libtpu's memory is returned between compiles), and a
variant that fails is reported with its last line. The table (markdown, also printed) lists per
chip: HBM used, the roofline lower bound and what sets it, max(compute, HBM) plus the collectives
the schedule leaves exposed, compiled FLOPs, HBM traffic, bytes a chip sends in collectives and the
share of them that overlaps compute, and the compile time; `--out` also gets every plan's JSON
beside it (`<out>.jsonl`) and each variant's optimized HLO (`<out>.<variant>.hlo`, for
`vitok/core/hlo.py` and a reader). A DiT's sampling program is left out: `launch.plan` compiles it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from launch import common
from vitok.core import perf

_TOPOLOGY = flags.DEFINE_string('topology', '', 'The TPU slice, as launch.plan takes it.')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'Slices over the data-centre network.')
_VARIANTS = flags.DEFINE_string('variants', '', "'name: field=value,...; name: ...'")
_OUT = flags.DEFINE_string('out', '', 'Markdown table here, and the plans as JSON lines beside.')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 1800, 'Longest compile of one variant.')

COLUMNS = [
    ('variant', 'variant'),
    ('hbm_GiB', 'HBM GiB/chip', '.2f'),
    ('hbm_share', 'of HBM', '.0%'),
    ('bound_ms', 'bound ms', '.1f'),
    ('bound_by', 'set by'),
    ('exposed_ms', 'with exposed collectives ms', '.1f'),
    ('tflop', 'TFLOP/chip', '.2f'),
    ('hbm_traffic_GiB', 'HBM traffic GiB', '.1f'),
    ('sent_MiB', 'collectives MiB sent', '.0f'),
    ('overlap', 'overlapped', '.0%'),
    ('mfu_bound', 'MFU at bound', '.0%'),
    ('compile_s', 'compile s', '.0f'),
]


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
  """'a: x=1,y=2; b:' -> [('a', ['--config.x=1', '--config.y=2']), ('b', [])]."""
  variants = []
  for item in filter(str.strip, text.split(';')):
    if ':' not in item:
      common.fail(f"bad flag --variants: {item.strip()!r} is not 'name: field=value,...'")
    name, fields = (s.strip() for s in item.split(':', 1))
    overrides = []
    for field in filter(str.strip, fields.split(',')):
      if '=' not in field:
        common.fail(f'bad flag --variants: {name}: {field.strip()!r} is not field=value')
      overrides.append(f'--config.{field.strip()}')
    variants.append((name, overrides))
  if not variants:
    common.fail('bad flag --variants: no variant')
  return variants


def _last_error_line(stderr: str) -> str:
  """The line that says what went wrong: the last one, skipping JAX's traceback-filtering note."""
  lines = [
      line.strip()
      for line in stderr.splitlines()
      if line.strip() and not line.startswith(('For simplicity', '-----'))
  ]
  return lines[-1] if lines else '?'


def row_of(name: str, plan: dict) -> dict:
  """One table row of a plan's JSON."""
  step = plan['train_step']
  row = {
      'variant': name,
      'hbm_GiB': step['total_bytes'] / 2**30,
      'hbm_share': step['hbm_used_fraction'],
  }
  if 'bound' not in step:  # the compiler refused it: does not fit
    return row
  sent = step['collective_wire_bytes']
  overlapped = sum(r['overlapped_bytes'] for r in step['collectives'])
  row.update(
      bound_ms=step['bound']['bound_s'] * 1e3,
      bound_by=step['bound']['bound_by'],
      exposed_ms=step['bound']['exposed_estimate_s'] * 1e3,
      tflop=(step['compiled_matmul_flops'] + step['compiled_kernel_flops']) / 1e12,
      hbm_traffic_GiB=step['hbm_bytes'] / 2**30,
      sent_MiB=sent / 2**20,
      overlap=overlapped / sent if sent else 0.0,
      mfu_bound=step['bound']['mfu_at_bound'],
      compile_s=plan['compile_s'],
  )
  return row


def main(argv):
  del argv
  config_arg = common.config_argument()
  if not config_arg or not _TOPOLOGY.value:
    common.fail('--config and --topology are required')
  rows, plans = [], []
  for name, overrides in parse_variants(_VARIANTS.value):
    args = [
        sys.executable,
        '-m',
        'launch.plan',
        f'--config={config_arg}',
        f'--topology={_TOPOLOGY.value}',
        f'--num_slices={_NUM_SLICES.value}',
        '--nosampling',  # the train step is what the variants change
        *([f'--hlo_out={_OUT.value}.{name}.hlo'] if _OUT.value else []),
        *overrides,
    ]
    started = time.perf_counter()
    try:
      out = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT.value)
      failed = out.returncode != 0
      detail = _last_error_line(out.stderr) if failed else ''
    except subprocess.TimeoutExpired:
      failed, detail = True, f'no plan within --timeout_s={_TIMEOUT.value}'
    if failed:
      rows.append({'variant': name, 'bound_by': f'failed: {detail}'})
      print(f'{name}: failed ({detail})', flush=True)
      continue
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    plan['variant'] = {'name': name, 'overrides': overrides}
    plans.append(plan)
    rows.append(row_of(name, plan))
    print(
        f'{name}: {time.perf_counter() - started:.0f} s, {rows[-1].get("bound_by", "")}', flush=True
    )
  table = perf.format_table(rows, COLUMNS)
  header = f'{config_arg} on {_TOPOLOGY.value}' + (
      f' x {_NUM_SLICES.value} slices' if _NUM_SLICES.value > 1 else ''
  )
  print(header + '\n' + table)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w') as f:
      f.write(_markdown(header, rows))
    with open(_OUT.value + '.jsonl', 'w') as f:
      f.writelines(json.dumps(p, default=float) + '\n' for p in plans)


def _markdown(header: str, rows: list[dict]) -> str:
  lines = [f'{header}\n', '| ' + ' | '.join(h for _, h, *_ in COLUMNS) + ' |']
  lines.append('|' + '---|' * len(COLUMNS))
  for row in rows:
    cells = []
    for key, _, *fmt in COLUMNS:
      value = row.get(key)
      cells.append('-' if value is None else format(value, fmt[0]) if fmt else str(value))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  common.run(main)
