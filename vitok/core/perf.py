"""Throughput accounting shared by training and benchmarking: peak FLOP/s, compiled-program stats,
memory, step timing, MFU, and a plain text table.

What XLA reports, as checked on jax/jaxlib 0.10.2 with 8 simulated CPU devices (tests/test_perf.py):

* `compiled.cost_analysis()['flops']` is the FLOP count of the **per-device** (SPMD-partitioned)
  program: a (256,512)x(512,128) matmul reports exactly 2*m*k*n; sharded over a 2x4 mesh
  (rows on 'data', columns on 'model') it reports 2*m*k*n / 8; with the contracting dim sharded
  it adds the partial-sum all-reduce's adds (m/2 * n per device here). Replicated work is counted
  on every device (a fully replicated matmul reports the full 2*m*k*n), so MFU from these numbers
  is "hardware" utilisation: redundant and rematerialised compute count as useful.
  **Trap:** a `while` loop body (lax.scan / fori_loop / nnx.scan over layers) is counted once,
  not times its trip count (a 10-step scan of matmuls reports ~1/10 of the unrolled count).
* `compiled.memory_analysis()` sizes are **per device** too: `argument_size_in_bytes` is the
  bytes of this device's shards of the inputs (equal to the full input bytes on one device),
  `output_size_in_bytes` this device's output shards, `temp_size_in_bytes` its scratch buffers,
  `alias_size_in_bytes` the donated inputs reused as outputs. `generated_code_size_in_bytes` is 0
  on CPU.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak TFLOP/s per device (one chip for TPUs, one GPU), keyed by a substring of
# `jax.Device.device_kind`; the first match wins, so more specific keys come first. Sources are the
# vendors' spec pages / datasheets, dense numbers (NVIDIA lists "with sparsity" figures at 2x):
#   TPU v4  275   cloud.google.com/tpu/docs/v4        (device_kind 'TPU v4')
#   TPU v5e 197   cloud.google.com/tpu/docs/v5e       (device_kind 'TPU v5 lite')
#   TPU v5p 459   cloud.google.com/tpu/docs/v5p       (device_kind 'TPU v5p', older runtimes 'TPU v5')
#   TPU v6e 918   cloud.google.com/tpu/docs/v6e       (Trillium, device_kind 'TPU v6 lite')
#   A100    312   NVIDIA A100 datasheet, BF16 Tensor Core (624 with sparsity); SXM and PCIe alike
#   H100    989   NVIDIA H100 datasheet, SXM BF16 Tensor Core 1979 with sparsity -> 989 dense
#   H100 PCIe 756 (1513 with sparsity); H100 NVL 835 (1671 with sparsity), same datasheet
#   H200    989   NVIDIA H200 datasheet (SXM; same compute as H100 SXM)
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ('TPU v5 lite', 197.0),
    ('TPU v5e', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),
    ('TPU v6 lite', 918.0),
    ('TPU v6e', 918.0),
    ('TPU v4', 275.0),
    ('H100 PCIe', 756.0),
    ('H100 NVL', 835.0),
    ('H100', 989.0),
    ('H200', 989.0),
    ('A100', 312.0),
)


def table_peak_tflops(device_kind: str) -> float | None:
  """The PEAK_TFLOPS entry whose key is a substring of `device_kind` (case-insensitive), or None."""
  kind = (device_kind or '').lower()
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in kind:
      return tflops
  return None


_MATMUL_CACHE: dict[tuple, float] = {}


def measure_matmul_flops(
    n: int | None = None, dtype=jnp.float32, seconds: float = 0.3, device: jax.Device | None = None
) -> float:
  """Measured dense-matmul FLOP/s of one device (default: this host's first local device).

  A jitted n x n matmul, one warm-up call, then timed calls (block_until_ready) until `seconds`
  have passed (at least 3, at most 50); returns 2 n^3 / median time. Cached in-process per
  (platform, device kind, dtype, n). n defaults to 1024 on CPU (~12 ms a call on 2 cores) and 8192
  on accelerators (big enough to hide dispatch overhead).
  On CPU one device's matmul uses every core: with simulated devices
  (--xla_force_host_platform_device_count) this is the host's rate, shared by all of them.
  """
  device = device or jax.local_devices()[0]
  if n is None:
    n = 1024 if device.platform == 'cpu' else 8192
  dtype = jnp.dtype(dtype)
  key = (device.platform, device.device_kind, dtype.name, n)
  if key in _MATMUL_CACHE:
    return _MATMUL_CACHE[key]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.full((n, n), 0.5, dtype), device)
  # Accumulating in float32, as the models' matmuls do (vitok/nn/matmul.py): for bfloat16 inputs
  # that is the native path of CPU libraries and of matrix units.
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()  # compile + warm-up
  times, start = [], time.perf_counter()
  while len(times) < 3 or (len(times) < 50 and time.perf_counter() - start < seconds):
    t = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  rate = 2.0 * n**3 / float(np.median(times))
  _MATMUL_CACHE[key] = rate
  return rate


def peak_flops_per_device(
    device: jax.Device | None = None, override_tflops: float = 0.0, dtype: str = 'float32'
) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from).

  `override_tflops` > 0 wins ('config'); else the PEAK_TFLOPS table ('table: <device_kind>');
  else (CPU, unknown accelerators) a measured matmul rate ('measured matmul ...'), on CPU in the
  run's compute `dtype` (a bfloat16 run's MFU is against bfloat16 matmuls). On CPU the host
  rate is divided by the number of local CPU devices, since simulated devices share the cores
  (8 simulated devices running at once get ~1/8 of the single-device rate each).
  """
  if override_tflops and override_tflops > 0:
    return float(override_tflops) * 1e12, 'config'
  device = device or jax.local_devices()[0]
  tflops = table_peak_tflops(getattr(device, 'device_kind', ''))
  if tflops is not None:
    return tflops * 1e12, f'table: {device.device_kind}'
  if getattr(device, 'platform', '') == 'cpu':
    dtype = jnp.dtype(dtype)
    rate = measure_matmul_flops(dtype=dtype, device=device)
    shared = max(1, len(jax.local_devices(backend='cpu')))
    name = {'float32': 'f32', 'bfloat16': 'bf16'}.get(dtype.name, dtype.name)
    return rate / shared, (
        f'measured matmul ({name} host rate / {shared} local CPU devices)'
        if shared > 1
        else f'measured matmul ({name})'
    )
  return measure_matmul_flops(dtype=jnp.bfloat16, device=device), 'measured matmul (bf16)'


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends / versions do not implement it
    return None
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  total, found = 0.0, False
  for entry in cost:  # older jax: a list with one dict per program
    if entry and entry.get('flops') is not None:
      total += float(entry['flops'])
      found = True
  return total if found else None


def compiled_stats(compiled) -> dict[str, Any]:
  """Per-device numbers of a `jax.stages.Compiled` (see the module docstring for what they mean).

  Returns flops, argument_bytes, output_bytes, temp_bytes, alias_bytes, generated_code_bytes and
  peak_bytes_estimate = argument + output + temp - alias; a value is None where XLA reports nothing.
  """
  stats: dict[str, Any] = {'flops': _cost_flops(compiled)}
  try:
    mem = compiled.memory_analysis()
  except Exception:
    mem = None
  fields = {
      'argument_bytes': 'argument_size_in_bytes',
      'output_bytes': 'output_size_in_bytes',
      'temp_bytes': 'temp_size_in_bytes',
      'alias_bytes': 'alias_size_in_bytes',
      'generated_code_bytes': 'generated_code_size_in_bytes',
  }
  for name, attr in fields.items():
    value = getattr(mem, attr, None) if mem is not None else None
    stats[name] = int(value) if value is not None else None
  parts = [stats['argument_bytes'], stats['output_bytes'], stats['temp_bytes']]
  stats['peak_bytes_estimate'] = (
      None if any(p is None for p in parts) else sum(parts) - (stats['alias_bytes'] or 0)
  )
  return stats


def peak_memory_bytes(device: jax.Device | None = None) -> int:
  """Peak bytes: the device allocator's `memory_stats()['peak_bytes_in_use']` on GPU/TPU. Where a
  device keeps no memory stats (CPU: memory_stats() is None) it is the peak resident set size of
  this **host process** (getrusage ru_maxrss: KiB on Linux, bytes on macOS), which also counts
  Python, the input pipeline and XLA itself."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


class StepTimer:
  """Wall time and time blocked on input between two log steps.

      timer = StepTimer()
      for step in ...:
        with timer.data_wait():
          batch = next(it)
        state, metrics = step_fn(state, batch)
        timer.step()
        if log_now:
          jax.device_get(metrics)        # sync, so the interval's wall time covers the device work
          stats = timer.lap()            # {'steps', 'seconds', 'step_time_s', 'data_wait_s', ...}
        with timer.excluded():           # evaluation / checkpoint time kept out of the throughput
          evaluate()

  With asynchronous dispatch the device may still be running queued steps while the host waits
  for data, so `data_wait_fraction` is an upper bound on the fraction of time lost to input.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self.reset()

  def reset(self) -> None:
    self._start = self._clock()
    self._excluded = 0.0
    self._wait = 0.0
    self._steps = 0

  @contextmanager
  def data_wait(self):
    t = self._clock()
    try:
      yield
    finally:
      self._wait += self._clock() - t

  @contextmanager
  def excluded(self):
    t = self._clock()
    try:
      yield
    finally:
      self._excluded += self._clock() - t

  def step(self, n: int = 1) -> None:
    self._steps += n

  def lap(self) -> dict[str, float]:
    """The interval's totals since the last lap/reset, then starts a new interval."""
    seconds = max(self._clock() - self._start - self._excluded, 0.0)
    steps = self._steps
    out = {
        'steps': steps,
        'seconds': seconds,
        'data_wait_s': self._wait,
        'step_time_s': seconds / steps if steps else float('nan'),
        'data_wait_fraction': self._wait / seconds if seconds > 0 else 0.0,
    }
    self.reset()
    return out


def throughput(
    step_seconds: float,
    global_batch: int,
    tokens_per_clip: int,
    flops_per_step_per_device: float | None,
    peak_flops: float | None,
    num_devices: int,
) -> dict[str, float]:
  """Per-device rates of one training step. `flops_per_step_per_device` as compiled_stats reports it
  (the per-device program), `peak_flops` in FLOP/s per device (peak_flops_per_device). Values that
  cannot be computed (no flops, no peak) are NaN."""
  clips = global_batch / step_seconds / num_devices
  achieved = (
      flops_per_step_per_device / step_seconds
      if flops_per_step_per_device is not None
      else float('nan')
  )
  return {
      'step_time_s': step_seconds,
      'clips_per_s_per_device': clips,
      'tokens_per_s_per_device': clips * tokens_per_clip,
      'tflops_per_device': achieved / 1e12,
      'mfu': achieved / peak_flops if peak_flops else float('nan'),
  }


def _cell(value, fmt: str | None) -> str:
  if value is None:
    return '-'
  if isinstance(value, float) and math.isnan(value):
    return 'nan'
  if fmt:
    return format(value, fmt)
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    if math.isfinite(value) and 1e3 <= abs(value) < 1e12:
      return f'{value:.0f}'
    return f'{value:.4g}'
  return str(value)


def format_table(rows: Sequence[dict], columns: Iterable) -> str:
  """A plain aligned text table. `columns`: keys, or (key, header) / (key, header, format_spec)
  tuples. Numbers are right-aligned, everything else left-aligned; missing values print '-'."""
  specs = []
  for col in columns:
    if isinstance(col, str):
      specs.append((col, col, None))
    else:
      key, header, *fmt = col
      specs.append((key, header, fmt[0] if fmt else None))
  cells = [[_cell(row.get(key), fmt) for key, _, fmt in specs] for row in rows]
  numeric = [
      all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows)
      for key, _, _ in specs
  ]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h, _) in enumerate(specs)]

  def line(values):
    return '  '.join(
        v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
    ).rstrip()

  out = [line([h for _, h, _ in specs]), '  '.join('-' * w for w in widths)]
  out += [line(r) for r in cells]
  return '\n'.join(out)
