"""A real multi-process run: two `launch.train` processes on localhost joined by jax.distributed
(2 CPU devices each, one 4-device mesh) train the tiny tokenizer and end with the parameters of a
single process that drives all 4 devices itself on the same global batches."""

import json
import os
import re
import signal
import socket
import time

import jax
import pytest
from training_equality import assert_same_training

from vitok.core import checkpoint as ckpt_lib
from vitok.core import sharding, trainer
from vitok.tokenizer import stage1

pytestmark = pytest.mark.slow

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _single_device_layout(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.mesh.shape = (1, 1)
  trainer.configure_runtime(config)
  task = stage1.TokenizerTask(config)
  return trainer.create_layout(task, config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def _final_state(layout, workdir):
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  assert checkpointer.latest_step() == STEPS
  state = checkpointer.restore(layout.abstract)
  checkpointer.close()
  return jax.device_get(state)


def test_two_processes_match_one_process_on_the_same_global_batches(
    tiny_config, launch_train, tmp_path
):
  # A 2x2 data x fsdp mesh: batch rows and parameter shards both cross the process boundary.
  # L2 + KL only: LPIPS's gradient is not continuous in its input (VGG's ReLUs and max-pools
  # switch), so a reduction-order difference in a reconstruction can move it by far more than
  # reduction order. Measured on one set of test videos: the two runs agreed to 5.7e-8 of their
  # change after 2 steps and 2.4e-4 after step 3 with LPIPS (2.3e-3 after 6: the limit is 1e-3),
  # and to 7.0e-7 / 8.6e-7 after 3 / 6 steps without it. LPIPS across processes is compared in
  # the evaluation below, where it is only a forward pass.
  overrides = {
      'loss.lpips': 0.0,
      'total_steps': STEPS,
      'ckpt_every': 3,
      'log_every': 3,
      'evals.reconstruction.every': STEPS,
      'mesh.shape': '(2,2)',
      'num_eval_videos': 1,
  }
  single = launch_train(str(tmp_path / 'single'), devices=4, overrides=overrides)
  out, _ = single.communicate(timeout=600)
  assert single.returncode == 0, out[-3000:]

  workdir = str(tmp_path / 'multi')
  address = f'localhost:{_free_port()}'
  processes = [
      launch_train(
          workdir,
          devices=2,
          overrides=overrides,
          flags_=[f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert '2 process(es), 4 devices' in outputs[0]

  layout = _single_device_layout(tiny_config)
  reference = _final_state(layout, str(tmp_path / 'single'))
  state = _final_state(layout, workdir)
  assert int(state.step) == STEPS
  # The same training up to reduction order (see training_equality): parameters, Adam moments, EMA
  # compared by what each run changed; step counters and RNG keys bit for bit.
  assert_same_training(state, reference, initial=layout.init())
  # Both runs evaluated the same held-out clips; only process 0 wrote files.
  evals = [
      [json.loads(line) for line in open(os.path.join(d, 'metrics.jsonl'))]
      for d in (str(tmp_path / 'single'), workdir)
  ]
  assert len(evals[1]) == 1 and evals[1][0]['clips'] == evals[0][0]['clips']
  for metric in ('psnr', 'ssim', 'lpips'):
    assert evals[1][0][metric] == pytest.approx(evals[0][0][metric], abs=1e-3), metric
  # The data position of each process is in the checkpoint.
  data_files = os.listdir(os.path.join(workdir, 'checkpoints', str(STEPS), 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data_files)


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_the_run_resumes(
    tiny_config, launch_train, tmp_path
):
  # A maintenance event or preemption notice may reach a single host: JAX's coordination service
  # propagates it, and both processes save at one agreed step before exiting. That checkpoint is
  # then damaged: both processes skip it together and resume from the one before.
  workdir = str(tmp_path / 'run')
  overrides = {
      'total_steps': 200,
      'ckpt_every': 10,
      'log_every': 10,
      'evals.reconstruction.every': 1000,
      'loss.lpips': 0.0,
      'num_eval_videos': 0,
      'mesh.shape': '(2,2)',
  }

  def start():
    address = f'localhost:{_free_port()}'
    return [
        launch_train(
            workdir,
            devices=2,
            overrides=overrides,
            flags_=[f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
        )
        for i in range(2)
    ]

  processes = start()
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '20')):
    assert all(p.poll() is None for p in processes), processes[0].communicate()[0][-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [trainer.PREEMPTED_EXIT_CODE] * 2, outputs[0][-3000:]
  saved = int(re.search(r'SIGTERM: saved step (\d+)', outputs[0]).group(1))
  assert 20 <= saved < 200
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  assert checkpointer.latest_step() == saved
  previous = checkpointer.all_steps()[-2]
  data_files = set(os.listdir(os.path.join(workdir, 'checkpoints', str(saved), 'data')))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= data_files

  os.remove(os.path.join(workdir, 'checkpoints', str(saved), 'state', 'manifest.ocdbt'))
  overrides['total_steps'] = saved + 5
  processes = start()
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:]
  assert f'checkpoint step {saved} is damaged' in outputs[0]
  assert f'resumed from {workdir}/checkpoints/{previous}' in outputs[0]
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', str(saved)))
  assert _final_step(workdir) == saved + 5


def _final_step(workdir):
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step
