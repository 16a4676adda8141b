"""Multi-process start-up: JAX's own multi-controller runtime (`jax.distributed`), nothing home-made.

Call `initialize()` first thing in a launch script, before anything touches JAX devices. It picks:

1. an explicit coordinator (`initialize('host0:1234', num_processes, process_id)`), e.g. tests and
   hand-launched multi-process CPU runs;
2. SLURM with more than one task, launched with `srun` (JAX's SLURM detection reads SLURM_JOB_ID,
   SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; on GPUs it then gives each
   process the single GPU number SLURM_LOCALID, i.e. one process per GPU);
3. a multi-worker Cloud TPU VM / multi-slice TPU (JAX's GCE/GKE TPU detection: worker list from
   TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES or the GCE metadata server);
4. otherwise a single process: nothing to do.

Multi-process CPU (jax 0.10.2, checked by tests/test_distributed.py): cross-process collectives
need `jax_cpu_collectives_implementation='gloo'`, which is already the default in this version
(with it unset to None a multi-process jit fails with "Multiprocess computations aren't
implemented on the CPU backend"); we set it when it is unset, for older versions.
"""

from __future__ import annotations

import os
import urllib.request
import warnings

import jax

_SLURM_VARS = (
    'SLURM_JOB_ID',
    'SLURM_STEP_NODELIST',
    'SLURM_NTASKS',
    'SLURM_PROCID',
    'SLURM_LOCALID',
)
_done = False


def _running_in_cloud_tpu_vm() -> bool:
  """What JAX decided when it was imported (libtpu present and TPU chips on the PCI bus)."""
  try:
    from jax._src import cloud_tpu_init

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except Exception:  # private module moved: fall back to JAX's hardware probe
    try:
      from jax._src import hardware_utils

      return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:
      return False


def _gce_metadata(key: str, timeout: float = 5.0) -> str | None:
  host = os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(
      f'http://{host}/computeMetadata/v1/instance/attributes/{key}',
      headers={'Metadata-Flavor': 'Google'},
  )
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.read().decode()
  except Exception:
    return None


def _tpu_worker_count(env) -> int:
  """Number of TPU VM workers (hosts) of this job; 1 when not a multi-host TPU job."""
  if not _running_in_cloud_tpu_vm():
    return 1
  if env.get('MEGASCALE_COORDINATOR_ADDRESS') or int(env.get('MEGASCALE_NUM_SLICES', '1') or 1) > 1:
    return 2  # multi-slice: always a multi-process job
  for var in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):  # GKE
    if env.get(var):
      return len([h for h in env[var].split(',') if h.strip()])
  if env.get('TPU_SKIP_MDS_QUERY') is not None:
    return 1
  endpoints = _gce_metadata('worker-network-endpoints')  # GCE TPU VM (gcloud tpu-vm create)
  return len([w for w in endpoints.split(',') if w.strip()]) if endpoints else 1


def plan(
    coordinator_address: str = '', num_processes: int = 0, process_id: int = -1, env=None
) -> tuple[str, dict]:
  """(how, kwargs for jax.distributed.initialize): how is 'explicit', 'slurm', 'tpu' or 'single'."""
  env = os.environ if env is None else env
  if coordinator_address:
    return 'explicit', {
        'coordinator_address': coordinator_address,
        'num_processes': num_processes if num_processes > 0 else None,
        'process_id': process_id if process_id >= 0 else None,
    }
  ntasks = int(env.get('SLURM_NTASKS', '1') or 1) if 'SLURM_JOB_ID' in env else 1
  if ntasks > 1:
    if all(var in env for var in _SLURM_VARS):
      return 'slurm', {}
    warnings.warn(
        f'SLURM_NTASKS={ntasks} but no SLURM step variables: start the job with `srun` '
        'to run one process per task; continuing as a single process.'
    )
  if _tpu_worker_count(env) > 1:
    return 'tpu', {}
  return 'single', {}


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> None:
  """Starts JAX's multi-controller runtime where the job has several processes (see the module
  docstring); a no-op for a single process and on a second call. Must run before anything touches
  JAX devices. Prints `process i/n, local devices, global devices` on process 0."""
  global _done
  if _done:
    return
  how, kwargs = plan(coordinator_address, num_processes, process_id)
  if how != 'single' and not jax.distributed.is_initialized():
    try:  # older jax defaulted to no CPU collectives: multi-process CPU jits would then fail
      if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    except AttributeError:
      pass
    jax.distributed.initialize(**kwargs)  # raises if the backend is already initialised
  _done = True
  if is_main_process():
    print(
        f'distributed ({how}): process {jax.process_index()}/{jax.process_count()}, '
        f'local devices {jax.local_device_count()}, global devices {jax.device_count()}',
        flush=True,
    )


def is_main_process() -> bool:
  return jax.process_index() == 0
