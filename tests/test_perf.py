"""vitok.core.perf: peak table, compiled-program stats (per device on a mesh), timing, MFU, tables."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vitok.core import perf


def fake_device(kind, platform='gpu'):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    'kind, tflops',
    [
        ('TPU v4', 275),
        ('TPU v5 lite', 197),
        ('TPU v5', 459),
        ('TPU v5p', 459),
        ('TPU v6 lite', 918),
        ('NVIDIA A100-SXM4-80GB', 312),
        ('NVIDIA A100 80GB PCIe', 312),
        ('NVIDIA H100 80GB HBM3', 989),
        ('NVIDIA H100 PCIe', 756),
        ('NVIDIA H200', 989),
    ],
)
def test_peak_table(kind, tflops):
  peak, source = perf.peak_flops_per_device(fake_device(kind, 'tpu' if 'TPU' in kind else 'gpu'))
  assert peak == tflops * 1e12
  assert source == f'table: {kind}'


def test_override_wins_and_cpu_is_measured():
  assert perf.peak_flops_per_device(fake_device('NVIDIA H100 80GB HBM3'), override_tflops=500) == (
      500e12,
      'config',
  )
  cpu = jax.local_devices()[0]
  assert cpu.platform == 'cpu'
  peak, source = perf.peak_flops_per_device(cpu)
  assert source.startswith('measured matmul')
  # 8 simulated devices share the host's cores: each gets 1/8 of the single-device rate.
  host = perf.measure_matmul_flops()
  assert host > 1e8
  assert peak == pytest.approx(host / len(jax.local_devices()))
  assert perf.measure_matmul_flops() == host  # cached
  # A bfloat16 run's MFU is against bfloat16 matmuls (accumulating in float32).
  peak_bf16, source = perf.peak_flops_per_device(cpu, dtype='bfloat16')
  assert source == 'measured matmul (bf16 host rate / 8 local CPU devices)'
  assert peak_bf16 == pytest.approx(perf.measure_matmul_flops(dtype=jnp.bfloat16) / 8)


M, K, N = 256, 512, 128


def test_compiled_stats_single_device():
  a, b = jnp.ones((M, K)), jnp.ones((K, N))
  stats = perf.compiled_stats(jax.jit(lambda a, b: a @ b).lower(a, b).compile())
  assert stats['flops'] == 2 * M * K * N  # exactly, on XLA:CPU
  assert stats['argument_bytes'] == a.nbytes + b.nbytes
  assert stats['output_bytes'] == M * N * 4
  assert stats['alias_bytes'] == 0
  assert stats['peak_bytes_estimate'] == (
      stats['argument_bytes'] + stats['output_bytes'] + stats['temp_bytes']
  )
  # A donated input reused as the output shows up as aliased bytes.
  donated = jax.jit(lambda x: x * 2, donate_argnums=0).lower(a).compile()
  assert perf.compiled_stats(donated)['alias_bytes'] == a.nbytes


def test_compiled_stats_are_per_device_on_a_mesh():
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  a = jax.device_put(jnp.ones((M, K)), NamedSharding(mesh, P('data', None)))
  b = jax.device_put(jnp.ones((K, N)), NamedSharding(mesh, P(None, 'model')))
  compiled = (
      jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P('data', 'model')))
      .lower(a, b)
      .compile()
  )
  stats = perf.compiled_stats(compiled)
  assert stats['flops'] == 2 * M * K * N / 8  # per device: 1/8 of the work
  assert stats['argument_bytes'] == (M // 2 * K + K * N // 4) * 4  # this device's shards
  assert stats['output_bytes'] == M // 2 * N // 4 * 4
  # Replicated work is counted on every device.
  rep = NamedSharding(mesh, P())
  replicated = (
      jax.jit(lambda a, b: a @ b, out_shardings=rep)
      .lower(jax.device_put(a, rep), jax.device_put(b, rep))
      .compile()
  )
  assert perf.compiled_stats(replicated)['flops'] == 2 * M * K * N


def test_cost_analysis_counts_a_loop_body_once():
  """The documented trap: scan / fori_loop bodies are not multiplied by the trip count."""
  x, w = jnp.ones((64, 64)), jnp.ones((10, 64, 64))
  scanned = jax.jit(lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0])
  flops = perf.compiled_stats(scanned.lower(x, w).compile())['flops']
  assert flops < 2 * 2 * 64**3  # ~ one matmul, not ten


def test_compiled_stats_tolerates_missing_analyses():
  class Old:

    def cost_analysis(self):
      return [{'flops': 10.0}, {'flops': 5.0}]

    def memory_analysis(self):
      return None

  stats = perf.compiled_stats(Old())
  assert stats['flops'] == 15.0
  assert stats['argument_bytes'] is None and stats['peak_bytes_estimate'] is None

  class Broken:

    def cost_analysis(self):
      raise NotImplementedError

    def memory_analysis(self):
      raise NotImplementedError

  assert set(perf.compiled_stats(Broken()).values()) == {None}


def _kernel_bytes(field: str) -> int:
  """VmHWM (peak) or VmRSS (current) of this process, from the kernel, in bytes."""
  for line in open('/proc/self/status'):
    if line.startswith(field + ':'):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def test_peak_memory_on_cpu_is_host_peak_rss_in_bytes():
  # The figure is the kernel's high-water mark in bytes, and touching more memory than the
  # current peak allows raises it by that much. (Measured in this process: a child's ru_maxrss
  # starts at its parent's size, which is inherited across fork and exec.)
  mib = 2**20
  before = perf.peak_memory_bytes()
  assert abs(before - _kernel_bytes('VmHWM')) <= 8 * mib
  extra = before - _kernel_bytes('VmRSS') + 256 * mib
  big = np.ones(extra // 8)
  big += 1
  after = perf.peak_memory_bytes()
  del big
  assert 200 * mib <= after - before <= 320 * mib, (before, after)
  assert abs(after - _kernel_bytes('VmHWM')) <= 8 * mib


def test_step_timer_with_a_fake_clock():
  now = [0.0]
  timer = perf.StepTimer(clock=lambda: now[0])
  for _ in range(4):
    with timer.data_wait():
      now[0] += 0.5  # blocked on the input pipeline
    now[0] += 1.5  # the step
    timer.step()
  with timer.excluded():
    now[0] += 100.0  # evaluation: not part of the interval
  stats = timer.lap()
  assert stats == {
      'steps': 4,
      'seconds': 8.0,
      'data_wait_s': 2.0,
      'step_time_s': 2.0,
      'data_wait_fraction': 0.25,
  }
  now[0] += 3.0
  timer.step()
  assert timer.lap()['seconds'] == 3.0  # a new interval


def test_throughput_by_hand():
  out = perf.throughput(
      step_seconds=0.5,
      global_batch=64,
      tokens_per_clip=256,
      flops_per_step_per_device=2e12,
      peak_flops=10e12,
      num_devices=8,
  )
  assert out['step_time_s'] == 0.5
  assert out['clips_per_s_per_device'] == pytest.approx(64 / 0.5 / 8)  # 16
  assert out['tokens_per_s_per_device'] == pytest.approx(16 * 256)
  assert out['tflops_per_device'] == pytest.approx(4.0)  # 2e12 / 0.5
  assert out['mfu'] == pytest.approx(0.4)
  assert np.isnan(perf.throughput(1.0, 8, 16, None, 1e12, 1)['mfu'])
  assert np.isnan(perf.throughput(1.0, 8, 16, 1e9, 0.0, 1)['mfu'])


def test_format_table_alignment():
  rows = [
      {'name': 'S-B/4x8', 'mfu': 0.4123456, 'clips': 12},
      {'name': 'B', 'mfu': 0.05, 'clips': 1234, 'extra': 'x'},
  ]
  text = perf.format_table(rows, ['name', ('mfu', 'MFU', '.1%'), ('clips', 'clips/s')])
  lines = text.splitlines()
  assert lines == [
      'name       MFU  clips/s',  # headers follow their column's alignment
      '-------  -----  -------',
      'S-B/4x8  41.2%       12',
      'B         5.0%     1234',
  ]
  assert perf.format_table([{'a': None, 'b': 1.5e-5}], ['a', 'b']).splitlines()[2] == '-  1.5e-05'
  assert perf.format_table([{'m': float('nan')}], [('m', 'MFU', '.1%')]).splitlines()[2] == 'nan'
