"""The host's hardware as JAX sees it, and the hardware a program is compiled for.

Accelerators and JAX's backend: which accelerators are on this host (TPU chips on the PCI bus,
NVIDIA GPUs), whether JAX started the backend that drives them, and which backends JAX should not
try to start at all.

  * `check_backend_matches_hardware()`: a TPU VM or GPU host whose JAX runs on the CPU (e.g. a
    plain `pip install -e .`, which installs a CPU-only jaxlib) ends start-up with one line that
    says what was found and what to install, instead of training on the CPU without a word.
  * `skip_absent_tpu_backend()`: with libtpu installed (the `tpu` and `test` extras) on a host
    without TPU chips, JAX would still start its TPU backend, and libtpu would print errors about
    the missing TPU on stderr; this limits JAX to the backends that can start here. Compiling
    ahead of time for a TPU topology (`jax.experimental.topologies`) keeps working: it loads
    libtpu's compiler without the TPU backend.

The compile target and the compute dtype:

  * `compile_target('tpu')`: programs built inside it are meant for that platform, not for this
    process's backend (`launch.plan --topology` compiles for a TPU slice on a CPU machine), so
    the start-up checks of hardware-specific choices (`model.attention='pallas_tpu'`) and
    `model.dtype='auto'` look at the target.
  * `compute_dtype('auto')`: the dtype the target runs matmuls fastest in: bfloat16 on TPUs and
    GPUs and on CPUs whose instruction set has bfloat16 dot products (AVX512-BF16 or AMX-BF16 on
    x86, BF16 on Arm), float32 elsewhere (an AVX2-only CPU converts bfloat16 to float32 around
    every matmul: the digits tokenizer step took 0.295 s against 0.259 s in float32 there).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil

import jax

from vitok.core import config_checks

# ------------------------------------------------------------------------------------------------
# Accelerators and JAX's backend.
# ------------------------------------------------------------------------------------------------

_GOOGLE_PCI_VENDOR_ID = '0x1ae0'
# PCI device ids of TPU chips (v3, an unnamed one, v4, v5p, v5e, v6e, 7x), as in JAX's
# jax/_src/hardware_utils.py. Google's vendor id also covers non-TPU devices (e.g. gVNIC network
# cards on every GCE VM), so the vendor alone does not mean a TPU.
_TPU_PCI_DEVICE_IDS = frozenset(
    ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')
)

# What `skip_absent_tpu_backend` set jax.config's jax_platforms to: any other value is the user's.
_platforms_set_here: str | None = None


class HardwareError(config_checks.ConfigError):
  """The host has accelerators that JAX's backend does not use; the message says what to install."""


def tpu_chips_present() -> int:
  """Number of TPU chips on this host's PCI bus (0 on a host without TPUs), counted as JAX counts
  them when it decides whether to start its TPU backend."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # pylint: disable=broad-except
    # A private module of JAX: if it moves, read the PCI bus the same way here.
    return _count_tpu_chips('/sys/bus/pci/devices')


def _count_tpu_chips(pci_devices: str) -> int:
  """TPU chips among the PCI devices under `pci_devices` (sysfs: <address>/vendor and /device)."""
  chips = 0
  for vendor_path in glob.glob(os.path.join(pci_devices, '*', 'vendor')):
    try:
      if _read(vendor_path) != _GOOGLE_PCI_VENDOR_ID:
        continue
      if _read(os.path.join(os.path.dirname(vendor_path), 'device')) in _TPU_PCI_DEVICE_IDS:
        chips += 1
    except OSError:
      continue
  return chips


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def nvidia_gpus_present() -> int:
  """Number of NVIDIA GPUs on this host (0 without an NVIDIA driver or GPU)."""
  return _count_nvidia_gpus('/proc/driver/nvidia/gpus', '/dev')


def _count_nvidia_gpus(proc_gpus: str, dev: str) -> int:
  """GPUs the NVIDIA driver lists under `proc_gpus` (one entry per GPU, named by PCI address), else
  the /dev/nvidia<N> device nodes under `dev` (containers may expose those without /proc)."""
  try:
    listed = len(os.listdir(proc_gpus))
  except OSError:
    listed = 0
  if listed:
    return listed
  nodes = glob.glob(os.path.join(dev, 'nvidia[0-9]*'))  # not nvidiactl, nvidia-uvm, ...
  return len([p for p in nodes if os.path.basename(p)[len('nvidia') :].isdigit()])


def libtpu_installed() -> bool:
  """Whether JAX finds a libtpu (the libtpu package, or TPU_LIBRARY_PATH naming a file)."""
  if os.path.isfile(os.environ.get('TPU_LIBRARY_PATH', '')):
    return True
  # find_spec, not import: importing libtpu sets TPU_LIBRARY_PATH as a side effect.
  return importlib.util.find_spec('libtpu') is not None


def cuda_plugin_installed() -> bool:
  """Whether a JAX CUDA plugin is installed (`jax[cuda12]` / `jax[cuda13]` bring jax_plugins.
  xla_cuda12 / xla_cuda13, which JAX discovers as a namespace package or an entry point)."""
  try:
    entry_points = importlib.metadata.entry_points(group='jax_plugins')
    if any(e.name.startswith('xla_cuda') for e in entry_points):
      return True
    spec = importlib.util.find_spec('jax_plugins')
  except (ImportError, ValueError):
    return False
  if spec is None or not spec.submodule_search_locations:
    return False
  return any(
      m.name.startswith('xla_cuda') for m in pkgutil.iter_modules(spec.submodule_search_locations)
  )


def _platforms_chosen_by_user() -> str | None:
  """JAX_PLATFORMS as the user set it (environment or jax.config), not as this module set it."""
  if os.environ.get('JAX_PLATFORMS'):
    return os.environ['JAX_PLATFORMS']
  value = jax.config.jax_platforms
  return value if value and value != _platforms_set_here else None


def skip_absent_tpu_backend() -> str | None:
  """Limits JAX to the backends that can start on this host when libtpu is installed but there
  are no TPU chips and the user has not chosen the platforms: 'cpu', or 'cuda,cpu' where NVIDIA
  GPUs and a JAX CUDA plugin are present. Returns what it set jax_platforms to (None: nothing).

  Call it before anything starts a JAX backend (it has no effect after)."""
  global _platforms_set_here
  if (
      _platforms_chosen_by_user()
      or 'JAX_FORCE_TPU_INIT' in os.environ  # JAX's own switch for starting the TPU backend anyway
      or not libtpu_installed()
      or tpu_chips_present()
  ):
    return None
  platforms = 'cuda,cpu' if nvidia_gpus_present() and cuda_plugin_installed() else 'cpu'
  jax.config.update('jax_platforms', platforms)
  _platforms_set_here = platforms
  return platforms


def check_backend_matches_hardware(backend: str | None = None) -> None:
  """Raises HardwareError when the host has TPU chips or NVIDIA GPUs but JAX's backend (`backend`,
  default: jax.default_backend(), which starts the backends) is the CPU, unless the user chose the
  CPU (JAX_PLATFORMS=cpu)."""
  if _platforms_chosen_by_user():
    return
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return
  chips = tpu_chips_present()
  if chips:
    found, extra = f'{chips} TPU chip{"s" if chips > 1 else ""}', 'tpu'
    why = (
        "JAX's TPU backend did not start"
        if libtpu_installed()
        else 'libtpu is not installed (a plain `pip install -e .` installs a CPU-only jaxlib)'
    )
  else:
    gpus = nvidia_gpus_present()
    if not gpus:
      return
    found, extra = f'{gpus} NVIDIA GPU{"s" if gpus > 1 else ""}', 'cuda'
    why = (
        "JAX's CUDA plugin did not start (check the NVIDIA driver with nvidia-smi)"
        if cuda_plugin_installed()
        else 'no JAX CUDA plugin is installed (a plain `pip install -e .` installs a CPU-only '
        'jaxlib)'
    )
  raise HardwareError(
      f'this host has {found} but JAX runs on the CPU: {why}; install JAX for them with '
      f'`pip install -e ".[{extra}]"`, or set JAX_PLATFORMS=cpu to run on the CPU on purpose'
  )


# ------------------------------------------------------------------------------------------------
# The compile target and the compute dtype.
# ------------------------------------------------------------------------------------------------

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar('vitok_target', default=None)
# /proc/cpuinfo flags of CPUs with bfloat16 dot-product instructions (x86: AVX512-BF16's
# vdpbf16ps, AMX's tile dot products; Arm: FEAT_BF16's BFDOT / BFMMLA).
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')


@contextlib.contextmanager
def compile_target(platform: str):
  """Within: programs are built for `platform` ('tpu', 'gpu', 'cpu'), whatever this process's
  backend is."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  """The platform programs are built for: the compile target, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
  """This host's CPU feature flags (/proc/cpuinfo 'flags', or 'Features' on Arm); empty where
  they cannot be read."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def cpu_has_bf16_dot(flags: frozenset[str] | None = None) -> bool:
  """Whether a CPU with these flags (default: this host's) has bfloat16 dot-product instructions."""
  flags = cpu_flags() if flags is None else flags
  return any(flag in flags for flag in BF16_CPU_FLAGS)


def auto_dtype(platform: str | None = None, flags: frozenset[str] | None = None) -> tuple[str, str]:
  """(the compute dtype of model.dtype='auto' on `platform` (default: the target), the reason)."""
  platform = platform or target_platform()
  if platform != 'cpu':
    return 'bfloat16', f'{platform}: bfloat16 matrix units'
  flags = cpu_flags() if flags is None else flags
  found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
  if found:
    return 'bfloat16', f'CPU with bfloat16 dot products ({", ".join(found)})'
  return 'float32', 'CPU without bfloat16 dot products (no ' + '/'.join(BF16_CPU_FLAGS) + ')'


def compute_dtype(dtype: str) -> str:
  """`model.dtype` as the model computes in: 'auto' resolved for the target, others as given."""
  return auto_dtype()[0] if dtype == 'auto' else dtype


def auto_attention(tokens: int, dtype: str, platform: str | None = None) -> tuple[str, str]:
  """(the attention kernel of model.attention='auto' for `tokens` tokens computed in `dtype` on
  `platform` (default: the target), the reason): the Pallas TPU splash kernel on TPUs (token
  counts that are multiples of 128; it won the TPU compiler's plans, docs/tpu.md), cuDNN's fused
  kernel on NVIDIA GPUs in bfloat16, XLA's dense attention elsewhere."""
  platform = platform or target_platform()
  if platform == 'tpu' and tokens % 128 == 0:
    return 'splash_tpu', f'TPU, {tokens} tokens'
  if platform in ('gpu', 'cuda') and dtype == 'bfloat16':
    return 'cudnn', 'NVIDIA GPU, bfloat16'
  return 'xla', f'{platform}' + (
      f', {tokens} tokens (not a multiple of 128)' if platform == 'tpu' else ''
  )


def with_compute_dtype(fields) -> dict:
  """A model config's fields (a ConfigDict or dict) with its `dtype` resolved (compute_dtype)."""
  out = dict(fields)
  if 'dtype' in out:
    out['dtype'] = compute_dtype(out['dtype'])
  return out
