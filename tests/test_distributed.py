"""vitok.core.distributed: a real 2-process JAX run on localhost CPU, and the launch-mode decision.

The recipe for a multi-process CPU run (reused by multi-process training tests), jax 0.10.2:
  * each process gets its own environment: JAX_PLATFORMS=cpu and
    XLA_FLAGS=--xla_force_host_platform_device_count=<local devices> (replacing the 8 of conftest);
  * `vitok.core.distributed.initialize(f'localhost:{port}', num_processes, process_id)` before any other
    JAX call, with a free port chosen by the parent;
  * CPU collectives: gloo, already JAX's default here (initialize() sets it only if unset).
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from vitok.core import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import sys
    from vitok.core import distributed
    port, pid = sys.argv[1], int(sys.argv[2])
    distributed.initialize(f'localhost:{port}', 2, pid)
    distributed.initialize(f'localhost:{port}', 2, pid)   # a second call is a no-op

    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert (jax.process_index(), jax.process_count()) == (pid, 2)
    assert (jax.local_device_count(), jax.device_count()) == (2, 4)
    assert distributed.is_main_process() == (pid == 0)
    mesh = jax.make_mesh((4,), ('data',), axis_types=(AxisType.Auto,))
    rows = np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * pid   # this process's 2 rows
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), rows)
    assert x.shape == (4, 3)
    replicated = NamedSharding(mesh, P())
    total, mean = jax.jit(lambda x: (jnp.sum(x), jnp.mean(x, axis=0)),
                          out_shardings=(replicated, replicated))(x)
    print('RESULT', float(total), ' '.join(str(float(v)) for v in np.asarray(mean)), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_cpu(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
      PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])),
  )
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, str(script), str(port), str(i)],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out}'
    # rows 0..5 (sum 15) on process 0, 100..105 (sum 615) on process 1; column means of
    # [[0,1,2],[3,4,5],[100,101,102],[103,104,105]].
    result = [line for line in out.splitlines() if line.startswith('RESULT')]
    assert result == ['RESULT 630.0 51.5 52.5 53.5'], out
  assert 'process 0/2, local devices 2, global devices 4' in outputs[0]
  assert 'distributed (' not in outputs[1]  # only process 0 prints the summary


SLURM_STEP = {
    'SLURM_JOB_ID': '123',
    'SLURM_STEP_NODELIST': 'node[001-002]',
    'SLURM_NTASKS': '16',
    'SLURM_PROCID': '3',
    'SLURM_LOCALID': '3',
}


def test_plan_picks_the_launch_mode(monkeypatch):
  monkeypatch.setattr(distributed, '_running_in_cloud_tpu_vm', lambda: False)
  how, kwargs = distributed.plan('10.0.0.1:1234', 2, 1, env={})
  assert how == 'explicit'
  assert kwargs == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
  assert distributed.plan(env={}) == ('single', {})
  assert distributed.plan(env=SLURM_STEP) == ('slurm', {})
  assert distributed.plan(env={**SLURM_STEP, 'SLURM_NTASKS': '1'}) == ('single', {})
  batch_script = {k: v for k, v in SLURM_STEP.items() if k != 'SLURM_STEP_NODELIST'}
  with pytest.warns(UserWarning, match='srun'):
    assert distributed.plan(env=batch_script) == ('single', {})
  # TPU variables mean nothing off a Cloud TPU VM ...
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'a,b'}) == ('single', {})
  # ... and on one, a worker list of more than one host means a multi-host pod.
  monkeypatch.setattr(distributed, '_running_in_cloud_tpu_vm', lambda: True)
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == ('tpu', {})
  assert distributed.plan(env={'TPU_WORKER_HOSTNAMES': 'a', 'TPU_SKIP_MDS_QUERY': '1'}) == (
      'single',
      {},
  )
  assert distributed.plan(env={'MEGASCALE_COORDINATOR_ADDRESS': 'a:1'}) == ('tpu', {})
  monkeypatch.setattr(
      distributed,
      '_gce_metadata',
      lambda key: 'w0,w1' if key == 'worker-network-endpoints' else None,
  )
  assert distributed.plan(env={}) == ('tpu', {})
  monkeypatch.setattr(distributed, '_gce_metadata', lambda key: 'w0')
  assert distributed.plan(env={}) == ('single', {})
