"""vitok.core.hardware: counting TPU chips and NVIDIA GPUs, the one-line start-up error when JAX
runs on the CPU beside them, and JAX limited to the backends that can start when libtpu is
installed on a host without TPU chips (quiet start, TPU topologies still compile ahead of time)."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vitok.core import config_checks, hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_NOISE = ('E0000', 'host bounds', 'TPU_WORKER_HOSTNAMES', 'InitGoogle')


def _env_without_platforms(**variables):
  """This process's environment without the JAX_PLATFORMS=cpu of conftest: JAX picks backends."""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'JAX_FORCE_TPU_INIT')}
  # This process may hold libtpu's lock (it compiled for a TPU topology): without this, libtpu
  # would not load in the child, which then could not compile for TPUs, nor show libtpu's errors.
  env.update(XLA_FLAGS='', ALLOW_MULTIPLE_LIBTPU_LOAD='1', **variables)
  return env


def _python(code, env=None, args=()):
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code), *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=_env_without_platforms() if env is None else env,
  )


@pytest.fixture
def platforms_unset(monkeypatch):
  """No JAX_PLATFORMS from the user (environment or jax.config); jax.config and what the module
  set are restored afterwards (this process's backends are already started: nothing changes)."""
  before = jax.config.jax_platforms
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('JAX_FORCE_TPU_INIT', raising=False)
  monkeypatch.setattr(hardware, '_platforms_set_here', None)
  jax.config.update('jax_platforms', None)
  yield
  jax.config.update('jax_platforms', before)


def _host(monkeypatch, chips=0, gpus=0, libtpu=True, cuda_plugin=False):
  """Pretends this host has `chips` TPU chips, `gpus` NVIDIA GPUs and the given JAX packages."""
  monkeypatch.setattr(hardware, 'tpu_chips_present', lambda: chips)
  monkeypatch.setattr(hardware, 'nvidia_gpus_present', lambda: gpus)
  monkeypatch.setattr(hardware, 'libtpu_installed', lambda: libtpu)
  monkeypatch.setattr(hardware, 'cuda_plugin_installed', lambda: cuda_plugin)


# ------------------------------------------------------------------------------------------------
# Counting the accelerators.
# ------------------------------------------------------------------------------------------------


def _pci_device(root, address, vendor, device):
  path = root / address
  path.mkdir(parents=True)
  (path / 'vendor').write_text(vendor + '\n')
  (path / 'device').write_text(device + '\n')


def test_tpu_chips_are_google_pci_devices_with_a_tpu_device_id(tmp_path):
  _pci_device(tmp_path, '0000:00:04.0', '0x1ae0', '0x005e')  # TPU v4
  _pci_device(tmp_path, '0000:00:05.0', '0x1ae0', '0x005e')
  _pci_device(tmp_path, '0000:00:06.0', '0x1ae0', '0x0063')  # TPU v5e
  _pci_device(tmp_path, '0000:00:07.0', '0x1ae0', '0x0042')  # gVNIC: Google's, not a TPU
  _pci_device(tmp_path, '0000:00:08.0', '0x10de', '0x2330')  # an NVIDIA H100
  (tmp_path / '0000:00:09.0').mkdir()  # no vendor file
  assert hardware._count_tpu_chips(str(tmp_path)) == 3
  assert hardware._count_tpu_chips(str(tmp_path / 'absent')) == 0


def test_tpu_chips_are_counted_by_jax_and_without_it_from_the_pci_bus(monkeypatch):
  from jax._src import hardware_utils

  monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id', lambda: (4, 'v4'))
  read = []
  monkeypatch.setattr(hardware, '_count_tpu_chips', lambda root: read.append(root) or 8)
  assert hardware.tpu_chips_present() == 4 and read == []

  def moved():
    raise AttributeError('hardware_utils changed')

  monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id', moved)
  assert hardware.tpu_chips_present() == 8 and read == ['/sys/bus/pci/devices']


def test_nvidia_gpus_are_the_driver_entries_or_else_the_numbered_device_nodes(tmp_path):
  proc, dev = tmp_path / 'proc', tmp_path / 'dev'
  dev.mkdir()
  for name in ('nvidia0', 'nvidia1', 'nvidia12', 'nvidiactl', 'nvidia-uvm', 'nvidia-modeset'):
    (dev / name).touch()
  assert hardware._count_nvidia_gpus(str(proc), str(dev)) == 3
  proc.mkdir()
  assert hardware._count_nvidia_gpus(str(proc), str(dev)) == 3  # an empty list: the nodes count
  for address in ('0000:3b:00.0', '0000:5e:00.0'):
    (proc / address).mkdir()
  assert hardware._count_nvidia_gpus(str(proc), str(dev)) == 2
  assert hardware._count_nvidia_gpus(str(tmp_path / 'x'), str(tmp_path / 'y')) == 0


def test_the_real_counts_agree_with_the_pci_bus_and_the_device_nodes():
  from jax._src import hardware_utils

  assert hardware.tpu_chips_present() == hardware._count_tpu_chips('/sys/bus/pci/devices')
  assert hardware.tpu_chips_present() == hardware_utils.num_available_tpu_chips_and_device_id()[0]
  if hardware.nvidia_gpus_present():
    assert hardware_utils.has_visible_nvidia_gpu()  # JAX's own check sees a GPU too


@pytest.mark.skipif(
    any(os.path.exists(p) for p in ('/dev/accel0', '/dev/vfio/0', '/dev/nvidiactl')),
    reason='this host has TPU or NVIDIA devices',
)
def test_this_host_without_accelerators_has_no_tpu_chips_and_no_gpus():
  assert hardware.tpu_chips_present() == 0
  assert hardware.nvidia_gpus_present() == 0


def _installed(distribution_prefix):
  return any(
      (d.metadata['Name'] or '').lower().replace('_', '-').startswith(distribution_prefix)
      for d in importlib.metadata.distributions()
  )


def test_installed_jax_packages_are_found_without_importing_them(tmp_path, monkeypatch):
  # The test extra installs jax[tpu]; a CUDA plugin only where someone installed one.
  assert hardware.libtpu_installed() == _installed('libtpu')
  assert hardware.cuda_plugin_installed() == _installed('jax-cuda')

  plugin = tmp_path / 'jax_plugins' / 'xla_cuda12'  # where jax-cuda12-pjrt installs the plugin
  plugin.mkdir(parents=True)
  (plugin / '__init__.py').write_text('raise ImportError("must not be imported")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert hardware.cuda_plugin_installed()


def test_libtpu_is_found_through_tpu_library_path(tmp_path, monkeypatch):
  monkeypatch.setattr(hardware.importlib.util, 'find_spec', lambda name: None)
  monkeypatch.setenv('TPU_LIBRARY_PATH', str(tmp_path / 'libtpu.so'))
  assert not hardware.libtpu_installed()  # names no file
  (tmp_path / 'libtpu.so').touch()
  assert hardware.libtpu_installed()


# ------------------------------------------------------------------------------------------------
# The start-up check.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'host, found, why, extra',
    [
        (dict(chips=4), 'this host has 4 TPU chips', "JAX's TPU backend did not start", 'tpu'),
        (dict(chips=1, libtpu=False), 'has 1 TPU chip but', 'libtpu is not installed', 'tpu'),
        (dict(gpus=8), 'this host has 8 NVIDIA GPUs', 'no JAX CUDA plugin is installed', 'cuda'),
        (
            dict(gpus=1, cuda_plugin=True),
            'has 1 NVIDIA GPU but',
            'CUDA plugin did not start',
            'cuda',
        ),
    ],
)
def test_accelerators_beside_a_cpu_backend_stop_start_up_with_the_fix(
    platforms_unset, monkeypatch, host, found, why, extra
):
  _host(monkeypatch, **host)
  with pytest.raises(hardware.HardwareError) as raised:
    hardware.check_backend_matches_hardware('cpu')
  message = str(raised.value)
  assert isinstance(raised.value, config_checks.ConfigError)
  assert '\n' not in message
  assert found in message and why in message and 'JAX runs on the CPU' in message
  assert f'`pip install -e ".[{extra}]"`' in message
  assert message.endswith('or set JAX_PLATFORMS=cpu to run on the CPU on purpose')


def test_the_check_reads_the_backend_jax_started(platforms_unset, monkeypatch):
  _host(monkeypatch, chips=4)
  assert jax.default_backend() == 'cpu'  # this process: JAX_PLATFORMS=cpu from conftest
  with pytest.raises(hardware.HardwareError, match='4 TPU chips'):
    hardware.check_backend_matches_hardware()


@pytest.mark.parametrize(
    'host, backend',
    [
        (dict(chips=4), 'tpu'),
        (dict(gpus=8), 'gpu'),
        (dict(chips=4, gpus=8), 'tpu'),
        (dict(), 'cpu'),  # no accelerators: the CPU is all there is
    ],
)
def test_a_backend_that_uses_the_accelerators_passes(platforms_unset, monkeypatch, host, backend):
  _host(monkeypatch, **host)
  hardware.check_backend_matches_hardware(backend)


def test_the_cpu_chosen_by_the_user_passes(platforms_unset, monkeypatch):
  _host(monkeypatch, chips=4, gpus=8)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  hardware.check_backend_matches_hardware('cpu')
  monkeypatch.delenv('JAX_PLATFORMS')
  jax.config.update('jax_platforms', 'cpu')  # in code, before JAX started
  hardware.check_backend_matches_hardware('cpu')


def test_the_cpu_chosen_by_skip_absent_tpu_backend_does_not_hide_unused_gpus(
    platforms_unset, monkeypatch
):
  _host(monkeypatch, gpus=2, cuda_plugin=False)
  assert hardware.skip_absent_tpu_backend() == 'cpu'
  with pytest.raises(hardware.HardwareError, match='2 NVIDIA GPUs'):
    hardware.check_backend_matches_hardware('cpu')


def test_launch_start_up_ends_in_one_line_naming_the_chips_and_the_fix():
  # The chips are pretended after start-up chose the platforms from the real (empty) PCI bus, so
  # that JAX starts on the CPU here as it would on a TPU VM without libtpu.
  code = """
      import sys
      from launch import common
      from vitok.core import hardware

      def main(argv):
        setattr(hardware, sys.argv[1], lambda: 4)
        common.init_distributed()
        print('trained on the CPU')

      common.run(main)
  """
  for detector, found, extra in (
      ('tpu_chips_present', '4 TPU chips', 'tpu'),
      ('nvidia_gpus_present', '4 NVIDIA GPUs', 'cuda'),
  ):
    out = _python(code, args=[detector])
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = out.stderr.splitlines()
    assert line.startswith(f'this host has {found} but JAX runs on the CPU: ')
    assert f'`pip install -e ".[{extra}]"`' in line
    assert 'trained on the CPU' not in out.stdout

  out = _python(code, env=_env_without_platforms(JAX_PLATFORMS='cpu'), args=['tpu_chips_present'])
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'trained on the CPU' in out.stdout


# ------------------------------------------------------------------------------------------------
# No TPU backend on a host without TPU chips.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'host, platforms',
    [
        (dict(), 'cpu'),
        (dict(gpus=2, cuda_plugin=True), 'cuda,cpu'),
        (dict(gpus=2, cuda_plugin=False), 'cpu'),  # GPUs JAX cannot drive: the check names them
        (dict(cuda_plugin=True), 'cpu'),
    ],
)
def test_without_tpu_chips_jax_starts_only_what_the_host_can_run(
    platforms_unset, monkeypatch, host, platforms
):
  _host(monkeypatch, **host)
  assert hardware.skip_absent_tpu_backend() == platforms
  assert jax.config.jax_platforms == platforms


@pytest.mark.parametrize(
    'host, variables',
    [
        (dict(chips=4), {}),  # a TPU host: JAX's own choice (it sets 'tpu,cpu' itself)
        (dict(libtpu=False), {}),  # no libtpu: JAX does not try the TPU
        (dict(), {'JAX_PLATFORMS': 'cpu,tpu'}),  # the user's choice
        (dict(), {'JAX_FORCE_TPU_INIT': '1'}),  # JAX's switch to start the TPU anyway
    ],
)
def test_the_platforms_are_left_alone_where_jax_or_the_user_decides(
    platforms_unset, monkeypatch, host, variables
):
  _host(monkeypatch, **host)
  for name, value in variables.items():
    monkeypatch.setenv(name, value)
  assert hardware.skip_absent_tpu_backend() is None
  assert jax.config.jax_platforms is None


def test_platforms_set_in_code_are_left_alone(platforms_unset, monkeypatch):
  _host(monkeypatch)
  jax.config.update('jax_platforms', 'cpu,tpu')
  assert hardware.skip_absent_tpu_backend() is None
  assert jax.config.jax_platforms == 'cpu,tpu'


def test_tpu_topologies_compile_ahead_of_time_with_jax_on_the_cpu():
  # This process runs JAX with jax_platforms='cpu' (conftest), as skip_absent_tpu_backend sets it.
  assert jax.config.jax_platforms == 'cpu' and jax.default_backend() == 'cpu'
  topology = topologies.get_topology_desc('v5p:2x2x1', 'tpu')
  assert [d.platform for d in topology.devices] == ['tpu'] * 4
  mesh = Mesh(np.array(topology.devices), ('data',))
  x = jax.ShapeDtypeStruct((256, 128), np.float32, sharding=NamedSharding(mesh, P('data')))
  compiled = jax.jit(lambda x: x @ x.T).lower(x).compile()
  hlo = compiled.as_text()
  assert 'num_partitions=4' in hlo and 'f32[64,128]' in hlo  # a quarter of the rows per chip
  assert compiled.output_shardings.mesh.devices.flat[0].platform == 'tpu'


def test_a_fresh_process_starts_only_the_cpu_and_still_compiles_for_tpu():
  out = _python("""
      import sys
      import jax, numpy as np
      from jax.experimental import topologies
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from vitok.core import hardware

      assert hardware.skip_absent_tpu_backend() == 'cpu'
      assert [d.platform for d in jax.devices()] == ['cpu']
      print('-- backends started --', file=sys.stderr, flush=True)
      topology = topologies.get_topology_desc('v5p:2x2x1', 'tpu')
      mesh = Mesh(np.array(topology.devices), ('data',))
      x = jax.ShapeDtypeStruct((256, 128), np.float32, sharding=NamedSharding(mesh, P('data')))
      print(jax.jit(lambda x: x @ x.T).lower(x).compile().as_text())
  """)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'num_partitions=4' in out.stdout
  started = out.stderr.split('-- backends started --')[0]
  assert not any(noise in started for noise in LIBTPU_NOISE), started


@pytest.mark.slow
def test_plan_starts_without_libtpu_errors():
  # Without skip_absent_tpu_backend JAX starts its TPU backend here and libtpu prints its errors:
  # the first run shows this host is one where the check below means something.
  bare = _python('import jax; jax.devices()')
  assert bare.returncode == 0
  if hardware.libtpu_installed() and not hardware.tpu_chips_present():
    assert any(noise in bare.stderr for noise in LIBTPU_NOISE), bare.stderr

  out = subprocess.run(
      [sys.executable, '-m', 'launch.plan', '--config=configs/vitok.py:demo'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=_env_without_platforms(),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"task": "vitok"' in out.stdout
  assert not any(noise in out.stderr for noise in LIBTPU_NOISE), out.stderr


# ------------------------------------------------------------------------------------------------
# The compute dtype of model.dtype='auto'.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'platform, flags, expected',
    [
        ('tpu', frozenset(), 'bfloat16'),
        ('gpu', frozenset(), 'bfloat16'),
        ('cpu', frozenset({'avx2', 'fma', 'avx512f'}), 'float32'),  # an EPYC with AVX2 / AVX-512
        ('cpu', frozenset({'avx512f', 'avx512_bf16'}), 'bfloat16'),  # AVX512-BF16
        ('cpu', frozenset({'avx512f', 'amx_bf16', 'amx_tile'}), 'bfloat16'),  # a Xeon with AMX
        ('cpu', frozenset({'fp', 'asimd', 'bf16'}), 'bfloat16'),  # an Arm core with FEAT_BF16
        ('cpu', frozenset(), 'float32'),  # flags unreadable
    ],
)
def test_auto_dtype_follows_the_platform_and_the_cpu_flags(platform, flags, expected):
  assert hardware.auto_dtype(platform, flags)[0] == expected


def test_auto_dtype_here_matches_this_cpus_flags_read_independently():
  """On this machine's CPU: bfloat16 exactly when /proc/cpuinfo lists a bfloat16 dot-product
  flag (a test that holds on a Xeon with AMX, an EPYC with AVX512-BF16 and one with AVX2 only)."""
  with open('/proc/cpuinfo') as f:
    flags = set(
        next(line for line in f if line.startswith(('flags', 'Features'))).split(':')[1].split()
    )
  has_bf16 = bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})
  dtype, why = hardware.auto_dtype('cpu')
  assert dtype == ('bfloat16' if has_bf16 else 'float32') and why
  with hardware.compile_target('tpu'):  # planning for a TPU slice on this CPU
    assert hardware.compute_dtype('auto') == 'bfloat16'
    assert hardware.target_platform() == 'tpu'
  assert hardware.compute_dtype('auto') == dtype and hardware.compute_dtype('float32') == 'float32'


def test_the_presets_compute_in_auto_and_the_tasks_resolve_it(tiny_config):
  """The demo presets ask for 'auto'; the task builds its model in the resolved dtype."""
  from configs import dit as dit_config
  from configs import vitok as vitok_config
  from launch import tasks

  for preset in ('demo', 'digits', 'ucf101', 'imagenet'):
    assert vitok_config.get_config(preset).model.dtype == 'auto'
  for preset in ('demo', 'digits', 'long_digits', 'ucf101', 'imagenet'):
    assert dit_config.get_config(preset).model.dtype == 'auto'
  config = tiny_config.copy_and_resolve_references()
  config.model.dtype = 'auto'
  assert tasks.make_task(config).model_cfg.dtype == hardware.auto_dtype('cpu')[0]
  with hardware.compile_target('tpu'):
    assert tasks.make_task(config).model_cfg.dtype == 'bfloat16'


@pytest.mark.parametrize(
    'platform, tokens, dtype, expected',
    [
        ('tpu', 1024, 'bfloat16', 'splash_tpu'),
        ('tpu', 1000, 'bfloat16', 'xla'),  # the TPU kernels tile tokens by 128
        ('gpu', 1024, 'bfloat16', 'cudnn'),
        ('gpu', 1024, 'float32', 'xla'),  # cuDNN's kernel has no float32 path
        ('cpu', 1024, 'bfloat16', 'xla'),
    ],
)
def test_auto_attention_picks_the_kernel_of_the_hardware(platform, tokens, dtype, expected):
  assert hardware.auto_attention(tokens, dtype, platform)[0] == expected


def test_the_ucf101_presets_resolve_auto_attention_for_their_target():
  from configs import dit as dit_config
  from configs import vitok as vitok_config
  from launch import tasks

  for config in (vitok_config.get_config('ucf101'), dit_config.get_config('ucf101')):
    assert config.model.attention == 'auto'
    assert tasks.make_task(config).model_cfg.attention == 'xla'  # this CPU
    with hardware.compile_target('tpu'):
      assert tasks.make_task(config).model_cfg.attention == 'splash_tpu'
