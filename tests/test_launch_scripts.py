"""launch/tpu_pod.sh and launch/slurm.sbatch, run end to end against fake `gcloud`, `srun`,
`scontrol`, `git` and `python` executables placed first on PATH: each records its argv, so the tests
see what the scripts would run on a TPU pod or a SLURM cluster (no network, no pip install)."""

import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SLURM = os.path.join(REPO, 'launch', 'slurm.sbatch')

# Each fake appends one line to $FAKE_LOG (its name and its arguments, tab-separated) and one to
# $FAKE_LOG.cwd (the directory it ran in), then exits with $FAKE_STATUS_<name> (default 0).
_FAKE = """#!/usr/bin/env bash
name="${0##*/}"
{ printf '%s' "$name"; printf '\\t%s' "$@"; printf '\\n'; } >> "$FAKE_LOG"
pwd >> "$FAKE_LOG.cwd"
printf '%s\\n' "${LIBTPU_INIT_ARGS-}" >> "$FAKE_LOG.tpu_flags"
status_var="FAKE_STATUS_${name//[^a-zA-Z0-9]/_}"
exit "${!status_var:-0}"
"""
_FAKES = ('gcloud', 'srun', 'scontrol', 'git', 'python', 'python3')
# The scripts' own variables: none comes from the environment the tests run in.
_SCRIPT_VARIABLES = (
    'TPU_NAME ZONE WORKDIR PROJECT CONFIG REPO_DIR GIT_REF PYTHON INSTALL LIBTPU_INIT_ARGS'.split()
)


@pytest.fixture
def fake(tmp_path):
  """(bin dir, log path, environment with the fakes first on PATH and nothing of the scripts' own
  variables inherited from this process)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in _FAKES:
    path = bin_dir / name
    path.write_text(_FAKE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  log = tmp_path / 'calls.log'
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in _SCRIPT_VARIABLES and not k.startswith('SLURM_')
  }
  env.update(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', FAKE_LOG=str(log))
  return bin_dir, log, env


def _calls(log) -> list[list[str]]:
  """The fakes' calls in order, each as [name, *argv]."""
  if not log.exists():
    return []
  return [line.split('\t') for line in log.read_text().splitlines()]


def _cwds(log) -> list[str]:
  """The directory each of the fakes' calls ran in, in order."""
  return log.with_name(log.name + '.cwd').read_text().splitlines()


def _bash(script, args, env, cwd=None):
  return subprocess.run(
      ['bash', script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
  )


@pytest.mark.parametrize('script', [TPU_POD, SLURM])
def test_scripts_parse(script):
  out = subprocess.run(['bash', '-n', script], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------------
# launch/tpu_pod.sh
# ------------------------------------------------------------------------------------------------


def _remote_command(gcloud_call: list[str]) -> str:
  commands = [a for a in gcloud_call if a.startswith('--command=')]
  assert len(commands) == 1, gcloud_call
  return commands[0][len('--command=') :]


def _run_remote(remote: str, fake, cwd) -> list[list[str]]:
  """Runs the command a worker would run, here, with the fakes: what it calls, in order."""
  _, log, env = fake
  log.unlink(missing_ok=True)
  log.with_name(log.name + '.cwd').unlink(missing_ok=True)
  out = subprocess.run(
      ['bash', '-c', remote], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  return _calls(log)


def test_pod_script_installs_the_tpu_extra_then_trains_on_every_worker(fake, tmp_path):
  _, log, env = fake
  checkout = tmp_path / 'checkout'
  checkout.mkdir()
  env.update(PROJECT='my-project', REPO_DIR=str(checkout), CONFIG='configs/vitok.py:demo')
  workdir = '/mnt/shared/runs/run 1'  # a space: the remote shell must get it as one argument
  extra = ['--config.optim.lr=3e-4', "--config.name=it's a run"]
  out = _bash(TPU_POD, ['my-v4-32', 'us-central2-b', workdir, *extra], env)
  assert out.returncode == 0, out.stderr

  (call,) = _calls(log)
  assert call[:-1] == (
      'gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --project=my-project '
      '--worker=all'
  ).split(' ')
  remote = _remote_command(call)
  syntax = subprocess.run(['bash', '-n', '-c', remote], capture_output=True, text=True)
  assert syntax.returncode == 0, (remote, syntax.stderr)

  # What a worker runs: the install of the tpu extra, then training, in the checkout.
  assert _run_remote(remote, fake, cwd=tmp_path) == [
      'python3 -m pip install --quiet -e .[tpu]'.split(' '),
      ['python3', '-m', 'launch.train', '--config=configs/vitok.py:demo', f'--workdir={workdir}']
      + extra,
  ]
  assert _cwds(log) == [str(checkout)] * 2


def test_pod_script_default_checkout_is_expanded_by_the_remote_shell(fake, tmp_path):
  _, log, env = fake
  (tmp_path / 'home' / 'vitok').mkdir(parents=True)
  out = _bash(TPU_POD, ['tpu', 'zone', '/shared/run'], env)
  assert out.returncode == 0, out.stderr
  (call,) = _calls(log)
  assert '--project' not in ' '.join(call)  # PROJECT unset: gcloud's own default project
  env['HOME'] = str(tmp_path / 'home')  # ~ is the worker's home, expanded there
  assert _run_remote(_remote_command(call), fake, cwd=tmp_path)[1] == (
      'python3 -m launch.train --config=configs/vitok.py --workdir=/shared/run'.split(' ')
  )
  assert _cwds(log) == [str(tmp_path / 'home' / 'vitok')] * 2


def test_pod_script_with_install_0_only_trains(fake, tmp_path):
  bin_dir, log, env = fake
  env.update(INSTALL='0', REPO_DIR=str(tmp_path), PYTHON=str(bin_dir / 'python'))
  out = _bash(TPU_POD, ['tpu', 'zone', '/shared/run', '--config.seed=1'], env)
  assert out.returncode == 0, out.stderr
  remote = _remote_command(_calls(log)[0])
  assert 'pip' not in remote
  train = 'python -m launch.train --config=configs/vitok.py --workdir=/shared/run --config.seed=1'
  assert _run_remote(remote, fake, cwd='/') == [train.split(' ')]


def test_pod_script_passes_the_tpu_compiler_flags_to_every_worker(fake, tmp_path):
  bin_dir, log, env = fake
  flags = "--xla_tpu_enable_async_collective_fusion=true --xla_name='a b'"
  env.update(INSTALL='0', REPO_DIR=str(tmp_path), LIBTPU_INIT_ARGS=flags)
  out = _bash(TPU_POD, ['tpu', 'zone', '/shared/run'], env)
  assert out.returncode == 0, out.stderr
  remote = _remote_command(_calls(log)[0])
  del env['LIBTPU_INIT_ARGS']  # a worker's own environment has none
  assert len(_run_remote(remote, fake, cwd='/')) == 1
  assert log.with_name(log.name + '.tpu_flags').read_text().splitlines()[-1] == flags


def test_pod_script_checks_out_git_ref_before_installing(fake, tmp_path):
  _, log, env = fake
  env.update(REPO_DIR=str(tmp_path), GIT_REF='v1.2')
  out = _bash(TPU_POD, ['tpu', 'zone', '/shared/run'], env)
  assert out.returncode == 0, out.stderr
  calls = _run_remote(_remote_command(_calls(log)[0]), fake, cwd=tmp_path)
  assert [c[:3] for c in calls] == [
      ['git', 'fetch', '--all'],
      ['git', 'checkout', '--quiet'],
      ['python3', '-m', 'pip'],
      ['python3', '-m', 'launch.train'],
  ]
  assert calls[1][-1] == 'v1.2'


@pytest.mark.parametrize(
    'args, variables',
    [
        ([], {}),
        (['tpu', 'zone'], {}),  # no WORKDIR
        (['--config.seed=1'], {'TPU_NAME': 'tpu', 'ZONE': 'zone'}),
    ],
)
def test_pod_script_without_its_arguments_prints_the_usage_and_exits_2(fake, args, variables):
  _, log, env = fake
  env.update(variables)
  out = _bash(TPU_POD, args, env)
  assert out.returncode == 2
  assert 'Usage:' in out.stderr and 'TPU_NAME, ZONE, WORKDIR   required' in out.stderr
  usage = out.stderr
  assert all(name in usage for name in _SCRIPT_VARIABLES)  # the whole environment block
  assert usage.rstrip().endswith('asynchronous-collective flags)')  # ... to its last line
  assert _calls(log) == []  # gcloud never ran


@pytest.mark.parametrize(
    'args, variables, message',
    [
        (['--config=configs/vitok.py'], {}, 'pass the config as CONFIG=configs/vitok.py'),
        ([], {'INSTALL': 'no'}, 'INSTALL=no: expected 1'),
    ],
)
def test_pod_script_rejects_a_config_flag_and_a_bad_install_value(fake, args, variables, message):
  _, log, env = fake
  env.update(variables)
  out = _bash(TPU_POD, ['tpu', 'zone', '/shared/run', *args], env)
  assert out.returncode == 2 and message in out.stderr
  assert _calls(log) == []


# ------------------------------------------------------------------------------------------------
# launch/slurm.sbatch
# ------------------------------------------------------------------------------------------------

FLAGS = ['--config=configs/vitok.py:demo', '--workdir=/shared/runs/run 1', '--config.seed=2']


def _slurm_env(fake, tmp_path, **variables):
  _, log, env = fake
  env.update(SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=str(tmp_path), **variables)
  return env


def test_slurm_script_installs_the_cuda_extra_once_then_runs_srun(fake, tmp_path):
  _, log, _ = fake
  out = _bash(SLURM, FLAGS, _slurm_env(fake, tmp_path), cwd='/')
  assert out.returncode == 0, out.stderr
  assert _calls(log) == [
      'python -m pip install --quiet -e .[cuda]'.split(' '),
      'srun --kill-on-bad-exit=1 python -m launch.train'.split(' ') + FLAGS,
  ]


def test_slurm_script_runs_in_the_submit_directory_with_the_given_python(fake, tmp_path):
  bin_dir, log, _ = fake
  python = str(bin_dir / 'python3')
  env = _slurm_env(fake, tmp_path, PYTHON=python)
  out = _bash(SLURM, FLAGS, env, cwd='/')
  assert out.returncode == 0, out.stderr
  assert _calls(log) == [
      'python3 -m pip install --quiet -e .[cuda]'.split(' '),
      ['srun', '--kill-on-bad-exit=1', python, '-m', 'launch.train'] + FLAGS,
  ]
  assert _cwds(log) == [str(tmp_path)] * 2  # pip install -e resolves '.' there


def test_slurm_script_with_install_0_only_runs_srun(fake, tmp_path):
  _, log, _ = fake
  out = _bash(SLURM, FLAGS, _slurm_env(fake, tmp_path, INSTALL='0'))
  assert out.returncode == 0, out.stderr
  assert [c[0] for c in _calls(log)] == ['srun']


def test_slurm_script_requeues_a_run_stopped_by_sigterm_and_exits_143(fake, tmp_path):
  _, log, _ = fake
  out = _bash(SLURM, FLAGS, _slurm_env(fake, tmp_path, FAKE_STATUS_srun='143'))
  assert out.returncode == 143
  assert [c[0] for c in _calls(log)] == ['python', 'srun', 'scontrol']
  assert _calls(log)[-1] == ['scontrol', 'requeue', '4242']
  assert 'requeueing job 4242' in out.stderr


@pytest.mark.parametrize('status', [1, 137])
def test_slurm_script_passes_other_failures_through_without_requeueing(fake, tmp_path, status):
  _, log, _ = fake
  out = _bash(SLURM, FLAGS, _slurm_env(fake, tmp_path, FAKE_STATUS_srun=str(status)))
  assert out.returncode == status
  assert [c[0] for c in _calls(log)] == ['python', 'srun']


def test_slurm_script_stops_when_the_install_fails(fake, tmp_path):
  _, log, _ = fake
  out = _bash(SLURM, FLAGS, _slurm_env(fake, tmp_path, FAKE_STATUS_python='1'))
  assert out.returncode == 1
  assert [c[0] for c in _calls(log)] == ['python']  # srun never ran


def test_slurm_script_without_arguments_prints_the_usage_and_exits_2(fake, tmp_path):
  _, log, _ = fake
  out = _bash(SLURM, [], _slurm_env(fake, tmp_path))
  assert out.returncode == 2
  assert 'sbatch launch/slurm.sbatch --config=' in out.stderr
  assert out.stderr.rstrip().splitlines()[-1].lstrip('# ').startswith('INSTALL')
  assert '#SBATCH' not in out.stderr
  assert _calls(log) == []
