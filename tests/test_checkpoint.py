"""Checkpoints and resume: a resumed run restores exactly the saved state and data position and
ends bit for bit where an uninterrupted run does (also after SIGTERM and after kill -9); a state
saved on one mesh restores on another; unfinished saves are ignored; a corrupt checkpoint fails
with a clear error; launch.eval works on a checkpoint trained on 8 devices with 1 device."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from vitok import checkpoint as ckpt_lib
from vitok import sharding, stage1, trainer
from vitok import train_state as ts

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def _train_two_steps(tiny_config, workdir):
  config = tiny_config.copy_and_resolve_references()
  config.total_steps = 2
  task = stage1.TokenizerTask(config)
  state, result = trainer.train(config, workdir, task)
  return config, task, state, result


def _train(tiny_config, workdir, total_steps):
  config = tiny_config.copy_and_resolve_references()
  config.total_steps = total_steps
  return trainer.train(config, workdir, stage1.TokenizerTask(config))


def test_resumed_run_continues_with_the_next_batch_and_ends_where_an_uninterrupted_one_does(
    tiny_config, tmp_path):
  reference, _ = _train(tiny_config, str(tmp_path / 'straight'), 4)

  workdir = str(tmp_path / 'resumed')
  state2, result = _train(tiny_config, workdir, 2)
  assert int(state2.step) == 2 and result['step'] == 2
  # The checkpoint holds exactly the in-memory state: step, params, Adam moments, EMA and RNG.
  config, task, layout = _layout(tiny_config)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == 2
  restored = checkpointer.restore(layout.abstract)
  assert _tree_equal(restored, state2)
  assert restored.ema_params is not None and int(restored.step) == 2
  checkpointer.close()

  # Resuming with a longer schedule starts at step 2, draws batches 2 and 3 (the iterator state is
  # in the checkpoint), and lands bit for bit on the uninterrupted run.
  state4, result = _train(tiny_config, workdir, 4)
  assert int(state4.step) == 4 and result['step'] == 4
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [2, 4]
  assert _tree_equal(state4, reference)


def _layout(tiny_config, mesh_shape=None):
  config = tiny_config.copy_and_resolve_references()
  if mesh_shape is not None:
    config.mesh.shape = mesh_shape
  task = stage1.TokenizerTask(config)
  devices = jax.devices()[:int(np.prod(config.mesh.shape))] if mesh_shape else None
  return config, task, trainer.create_layout(task, config, sharding.make_mesh(config.mesh, devices))


def test_state_saved_on_2x4_restores_bit_exact_on_1x8_and_on_one_device(tiny_config, tmp_path):
  config, task, layout = _layout(tiny_config, (2, 4))
  state = layout.init()
  step = ts.compile_train_step(layout, task.loss_fn, config.optim.ema_decay,
                               trainer.abstract_batch(config.data),
                               trainer.replicate(task.frozen(), layout.mesh))
  rng = np.random.default_rng(0)
  batch = {'video': rng.integers(0, 255, (8, 4, 32, 32, 3)).astype(np.uint8),
           'label': np.zeros(8, np.int32)}
  batch = trainer.global_batch(batch, sharding.batch_sharding(layout.mesh, config.sharding_rules))
  state, _ = step(state, batch, trainer.replicate(task.frozen(), layout.mesh))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(1, state)
  checkpointer.wait()
  saved = jax.device_get(state)
  for mesh_shape in ((1, 8), (1, 1)):
    _, _, target = _layout(tiny_config, mesh_shape)
    restored = checkpointer.restore(target.abstract)
    assert _tree_equal(restored, saved)
    for leaf, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(target.shardings)):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  # Parameters alone (e.g. to feed a trained tokenizer to another job), raw and EMA.
  _, _, single = _layout(tiny_config, (1, 1))
  assert _tree_equal(checkpointer.restore_params(single.abstract.params), saved.params)
  assert _tree_equal(checkpointer.restore_params(single.abstract.params, ema=True), saved.ema_params)
  checkpointer.close()


def test_unfinished_save_is_ignored_and_corrupt_checkpoint_is_reported(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  _, _, state, _ = _train_two_steps(tiny_config, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # A save that was killed half-way leaves only Orbax's temporary directory behind.
  shutil.copytree(os.path.join(ckpt_dir, '2'), os.path.join(ckpt_dir, '3.orbax-checkpoint-tmp-1'))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == 2
  assert _tree_equal(checkpointer.restore(ckpt_lib.abstract_like(state)), state)
  checkpointer.close()

  # Corrupt every data file of the good checkpoint: restoring names the checkpoint and step.
  for root, _, files in os.walk(os.path.join(ckpt_dir, '2')):
    for name in files:
      if 'metadata' not in name:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'not a checkpoint')
  checkpointer = ckpt_lib.Checkpointer(workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'could not restore checkpoint step 2 from .*checkpoints/2'):
    checkpointer.restore(ckpt_lib.abstract_like(state))


def test_eval_command_on_a_tiny_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  _train_two_steps(tiny_config, workdir)
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', 'launch.eval', f'--workdir={workdir}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ('step', 'split', 'psnr', 'ssim', 'lpips', 'baseline_psnr'):
    assert key in result
  assert result['step'] == 2 and result['split'] == 'test' and result['clips'] >= 1
  assert np.isfinite(result['psnr']) and 0 < result['ssim'] <= 1 and result['lpips'] >= 0
  assert result['baseline_floats'] <= result['latent_floats']
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 2 and json.loads(lines[-1]) == result
  samples = os.listdir(os.path.join(workdir, 'samples'))
  assert any(f.endswith('.png') for f in samples) and any(f.endswith('.mp4') for f in samples)


def test_export_of_ema_parameters_loads_as_a_tokenizer_on_any_device_count(tiny_config, tmp_path):
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  _, _, state, _ = _train_two_steps(tiny_config, workdir)          # on 8 devices
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')         # exported on 1
  done = subprocess.run([sys.executable, '-m', 'launch.export', f'--workdir={workdir}',
                         f'--out={out}'], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'exported the EMA parameters of step 2' in done.stdout
  model = stage1.load_tokenizer(out)
  exported = nnx.state(model, nnx.Param)
  assert _tree_equal(exported, state.ema_params)
  video = np.random.default_rng(0).uniform(-1, 1, (1, 4, 32, 32, 3)).astype(np.float32)
  assert model.decode(model.encode(video)).shape == video.shape


def test_missing_dataset_directory_fails_naming_the_field(tiny_config, tmp_path):
  config = tiny_config.copy_and_resolve_references()
  config.data.manual_dir = str(tmp_path / 'does-not-exist')
  with pytest.raises(ValueError, match='data.manual_dir'):
    trainer.train(config, str(tmp_path / 'run'), stage1.TokenizerTask(config))


# ------------------------------------------------------------------------------------------------
# Interrupted runs, as real processes: SIGTERM (preemption) and kill -9 between saves.
# ------------------------------------------------------------------------------------------------

INTERRUPT_STEPS = 100


def _launch(launch_train, workdir):
  """`python -m launch.train` on 2 simulated devices with the tiny config: 100 steps, a checkpoint
  every 10, LPIPS off (the interruption logic does not depend on the loss)."""
  return launch_train(workdir, devices=2, overrides={
      'loss.lpips': 0.0, 'log_every': 10, 'ckpt_every': 10, 'eval_every': 1000,
      'num_eval_videos': 0, 'total_steps': INTERRUPT_STEPS})


def _finish(process, timeout=600):
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def _wait_for_checkpoint(process, workdir, step, timeout=300):
  path = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert process.poll() is None, _finish(process)[1][-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.01)


def _final_params(tiny_config, workdir):
  _, _, layout = _layout(tiny_config, (1, 1))
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  assert checkpointer.latest_step() == INTERRUPT_STEPS
  params = checkpointer.restore_params(layout.abstract.params)
  checkpointer.close()
  return params


@pytest.fixture(scope='module')
def uninterrupted_params(tiny_config, launch_train, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  code, out = _finish(_launch(launch_train, workdir))
  assert code == 0, out[-3000:]
  return _final_params(tiny_config, workdir)


def test_sigterm_saves_the_current_step_and_the_rerun_ends_on_the_same_parameters(
    tiny_config, launch_train, tmp_path, uninterrupted_params):
  workdir = str(tmp_path / 'run')
  process = _launch(launch_train, workdir)
  _wait_for_checkpoint(process, workdir, 10)
  process.send_signal(signal.SIGTERM)
  code, out = _finish(process)
  assert code == trainer.PREEMPTED_EXIT_CODE, out[-3000:]
  saved = int(re.search(r'SIGTERM: saved step (\d+)', out).group(1))
  assert 10 <= saved < INTERRUPT_STEPS
  assert ckpt_lib.Checkpointer(workdir, create=False).latest_step() == saved

  code, out = _finish(_launch(launch_train, workdir))
  assert code == 0, out[-3000:]
  assert f'resumed from {workdir}/checkpoints/{saved}' in out
  assert _tree_equal(_final_params(tiny_config, workdir), uninterrupted_params)


def test_kill_9_between_saves_resumes_from_the_last_complete_checkpoint(
    tiny_config, launch_train, tmp_path, uninterrupted_params):
  workdir = str(tmp_path / 'run')
  process = _launch(launch_train, workdir)
  _wait_for_checkpoint(process, workdir, 10)
  process.kill()                                   # SIGKILL: no handler, no final save
  code, _ = _finish(process)
  assert code == -signal.SIGKILL
  latest = ckpt_lib.Checkpointer(workdir, create=False).latest_step()
  assert latest is not None and latest % 10 == 0 and latest < INTERRUPT_STEPS

  code, out = _finish(_launch(launch_train, workdir))
  assert code == 0, out[-3000:]
  assert f'resumed from {workdir}/checkpoints/{latest}' in out
  assert _tree_equal(_final_params(tiny_config, workdir), uninterrupted_params)
