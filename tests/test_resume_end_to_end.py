"""Checkpoints and resume: a resumed run restores exactly the saved state and data position and
ends bit for bit where an uninterrupted run does (also after SIGTERM, Ctrl-C and kill -9); a state
saved on one mesh restores on another; unfinished saves are ignored; a damaged newest checkpoint is
skipped (and moved aside by training); a config that does not match the checkpoints fails at
start-up and changes nothing; launch.eval works on a checkpoint trained on 8 devices with 1."""

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

from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, sharding, signals, trainer
from vitok.core import train_state as ts
from vitok.tokenizer import evaluation as tok_evaluation
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import stage1

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def _train(tiny_config, workdir, total_steps, **overrides):
  config = tiny_config.copy_and_resolve_references()
  config.total_steps = total_steps
  if 'eval_every' in overrides:
    config.evals.reconstruction.every = overrides.pop('eval_every')
  config.update(overrides)
  return trainer.train(config, workdir, stage1.TokenizerTask(config))


@pytest.fixture(scope='module')
def four_steps(tiny_config, tmp_path_factory):
  """One uninterrupted run of 4 steps (checkpoints at 2 and 4, an evaluation at 4): its directory,
  which tests copy before changing anything, and its final state."""
  workdir = str(tmp_path_factory.mktemp('four_steps') / 'run')
  state, _, _ = _train(tiny_config, workdir, 4)
  return workdir, jax.device_get(state)


def _copy(run: str, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(run, workdir)
  return workdir


def test_resumed_run_continues_with_the_next_batch_and_ends_where_an_uninterrupted_one_does(
    tiny_config, tmp_path, four_steps
):
  workdir = str(tmp_path / 'resumed')
  state2, result, stopped_by = _train(tiny_config, workdir, 2)
  assert int(state2.step) == 2 and result['step'] == 2 and stopped_by is None
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
  state4, result, _ = _train(tiny_config, workdir, 4)
  assert int(state4.step) == 4 and result['step'] == 4
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [2, 4]
  assert _tree_equal(state4, four_steps[1])


def _layout(tiny_config, mesh_shape=None):
  config = tiny_config.copy_and_resolve_references()
  if mesh_shape is not None:
    config.mesh.shape = mesh_shape
  task = stage1.TokenizerTask(config)
  devices = jax.devices()[: int(np.prod(config.mesh.shape))] if mesh_shape else None
  return config, task, trainer.create_layout(task, config, sharding.make_mesh(config.mesh, devices))


def test_state_saved_on_2x4_restores_bit_exact_on_1x8_and_on_one_device(tiny_config, tmp_path):
  config, task, layout = _layout(tiny_config, (2, 4))
  state = layout.init()
  step = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), task.frozen(layout.mesh)
  )
  rng = np.random.default_rng(0)
  batch = {
      'video': rng.integers(0, 255, (8, 4, 32, 32, 3)).astype(np.uint8),
      'label': np.zeros(8, np.int32),
  }
  batch = trainer.global_batch(batch, sharding.batch_sharding(layout.mesh, config.sharding_rules))
  state, _ = step(state, batch, task.frozen(layout.mesh))
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
  assert _tree_equal(
      checkpointer.restore_params(single.abstract.params, ema=True), saved.ema_params
  )
  checkpointer.close()


def test_unfinished_save_is_ignored(tiny_config, tmp_path, four_steps):
  workdir = _copy(four_steps[0], tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # A save that was killed half-way leaves only Orbax's temporary directory behind.
  shutil.copytree(os.path.join(ckpt_dir, '4'), os.path.join(ckpt_dir, '5.orbax-checkpoint-tmp-1'))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == 4
  assert _tree_equal(checkpointer.restore(_layout(tiny_config)[2].abstract), four_steps[1])
  checkpointer.close()


# A line logged by the C++ runtime (XLA, TensorStore): severity letter, MMDD, time.
GLOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')


def _damage(step_dir):
  """Makes checkpoint `step_dir` unreadable: the OCDBT manifest of its arrays deleted."""
  os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))


def test_resume_skips_a_damaged_checkpoint_moves_it_aside_and_checks_the_data_position(
    tiny_config, tmp_path, four_steps, capsys
):
  workdir = _copy(four_steps[0], tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  _damage(os.path.join(ckpt_dir, '4'))
  # Step 2's data position edited into a valid but wrong one: it does not match the step.
  data_file = os.path.join(ckpt_dir, '2', 'data', 'process_0-of-1.json')
  with open(data_file) as f:
    position = json.load(f)
  assert position == {'next_index': 2}
  with open(data_file, 'w') as f:
    json.dump({'next_index': 7}, f)

  state, _, _ = _train(tiny_config, workdir, 4)
  out = capsys.readouterr().out
  assert re.search(
      r'checkpoint step 4 is damaged \(ValueError: .*\); moved to '
      rf'{re.escape(workdir)}/damaged_checkpoints/4 for inspection',
      out,
  )
  assert f'resumed from {ckpt_dir}/2' in out
  assert "data-iterator state {'next_index': 7} does not match its step 2" in out
  # Batches 2 and 3 again, from the step: bit for bit the uninterrupted run.
  assert _tree_equal(state, four_steps[1])
  assert os.listdir(os.path.join(workdir, 'damaged_checkpoints', '4'))  # kept, not deleted
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']  # 4 written again


def test_eval_and_export_skip_a_damaged_newest_checkpoint(tiny_config, tmp_path, four_steps):
  workdir = _copy(four_steps[0], tmp_path)
  _damage(os.path.join(workdir, 'checkpoints', '4'))
  # A run saved before num_eval_videos and model.scan existed reads back with their defaults.
  config_path = os.path.join(workdir, 'config.json')
  saved = json.load(open(config_path))
  del saved['num_eval_videos'], saved['model']['scan']
  json.dump(saved, open(config_path, 'w'))
  missing = str(tmp_path / 'no_fid_weights.npz')
  # 8 devices trained, 1 reads; the FID weights are missing
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', VITOK_FID_WEIGHTS=missing)
  out = subprocess.run(
      [sys.executable, '-m', 'launch.eval', f'--workdir={workdir}'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'SKIPPED checkpoint step 4 in .* is damaged: ValueError', out.stderr)
  assert (
      f'{config_path} predates config.model.scan, config.num_eval_videos: their defaults are used'
      in (out.stdout)
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in (
      'step',
      'split',
      'psnr',
      'ssim',
      'lpips',
      'lpips_alex',
      'baseline_psnr',
      'baseline_ssim',
  ):
    assert key in result
  assert result['step'] == 2 and result['split'] == 'test' and result['clips'] >= 1
  assert (
      np.isfinite(result['psnr'])
      and 0 < result['ssim'] <= 1
      and result['lpips'] >= 0
      and result['lpips_alex'] >= 0
      and 0 < result['baseline_ssim'] <= 1
  )
  assert result['baseline_floats'] <= result['latent_floats']
  # Unavailable metrics are reported with the reason: rFVD on a held-out split of one clip, rFID
  # (one feature vector per frame: enough rows) for want of its weights, naming the file.
  assert result['clips'] == 1 and 'rfvd' not in result and 'rfid' not in result
  assert result['rfvd_unavailable'].startswith('rfvd needs at least 2 feature vectors')
  assert result['rfid_unavailable'].startswith(
      f'MissingWeightsError: the FID Inception-v3 weights {missing} do not exist'
  )
  assert 'python -m launch.fid_weights' in result['rfid_unavailable']
  table = open(os.path.join(workdir, 'eval_step2.md')).read()
  assert (
      '| rfvd_unavailable | rfvd needs at least 2 feature vectors' in table and '| psnr |' in table
  )
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 2 and json.loads(lines[-1]) == result
  samples = os.listdir(os.path.join(workdir, 'samples'))
  assert any(f.endswith('.png') for f in samples) and any(f.endswith('.mp4') for f in samples)
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))  # eval moves nothing
  # An explicit --step is never replaced by another one.
  out = subprocess.run(
      [sys.executable, '-m', 'launch.eval', f'--workdir={workdir}', '--step=4'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 1
  # One line of ours (a loaded machine may add C++ runtime log lines, e.g. XLA's slow-operation
  # warnings, in glog format: those are not the command's output).
  ours = [line for line in out.stderr.splitlines() if not GLOG_LINE.match(line)]
  assert len(ours) == 1 and re.fullmatch(
      r'checkpoint step 4 in .* is damaged: ValueError: .*', ours[0]
  ), out.stderr[-3000:]


def test_export_of_ema_parameters_loads_as_a_tokenizer_on_any_device_count(tmp_path, four_steps):
  out = str(tmp_path / 'export')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')  # exported on 1 device
  done = subprocess.run(
      [sys.executable, '-m', 'launch.export', f'--workdir={four_steps[0]}', f'--out={out}'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'exported the EMA parameters of step 4' in done.stdout
  model = frozen_tokenizer.load_tokenizer(out)
  exported = nnx.state(model, nnx.Param)
  assert _tree_equal(exported, four_steps[1].ema_params)
  video = np.random.default_rng(0).uniform(-1, 1, (1, 4, 32, 32, 3)).astype(np.float32)
  assert model.decode(model.encode(video)).shape == video.shape


def _snapshot(directory):
  """Every path below `directory` with its size and modification time."""
  return {
      os.path.join(root, name): (
          os.path.getsize(os.path.join(root, name)),
          os.path.getmtime(os.path.join(root, name)),
      )
      for root, _, names in os.walk(directory)
      for name in names
  }


def test_a_config_that_does_not_match_the_checkpoints_fails_at_start_up_and_changes_nothing(
    tiny_config, tmp_path, four_steps
):
  workdir = _copy(four_steps[0], tmp_path)
  before = _snapshot(workdir)
  config = tiny_config.copy_and_resolve_references()
  config.model.channels = 8
  config.total_steps = 6
  with pytest.raises(config_checks.ConfigError) as failure:
    trainer.train(config, workdir, stage1.TokenizerTask(config))
  message = str(failure.value)
  assert re.search(
      r'does not match the checkpoints of the run in .*: checkpoint step 4 .* holds '
      r'other arrays than this config builds: params/from_latent/kernel: saved '
      r'\(4, 128\) float32, requested \(8, 128\) float32; .* \(12 in all\)',
      message,
  ), message
  assert "differ from the run's config.json: model.channels: 4 -> 8; total_steps: 4 -> 6" in message
  assert _snapshot(workdir) == before  # config.json and checkpoints untouched


def test_start_up_failures_leave_no_workdir_behind(tiny_config, tmp_path):
  config = tiny_config.copy_and_resolve_references()
  config.data.manual_dir = str(tmp_path / 'does-not-exist')
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='data.manual_dir'):
    trainer.train(config, workdir, stage1.TokenizerTask(config))
  assert not os.path.exists(workdir)
  open(workdir, 'w').close()
  with pytest.raises(config_checks.ConfigError, match=r'--workdir=.*/run is a file'):
    trainer.train(tiny_config, workdir, stage1.TokenizerTask(tiny_config))


def test_ctrl_c_during_an_evaluation_abandons_it_and_saves_the_step(
    tiny_config, tmp_path, monkeypatch, capsys
):
  # The evaluation gets Ctrl-C while it runs (here: at its start, then it would take 10 minutes).
  def slow_evaluation(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(600)

  monkeypatch.setattr(tok_evaluation, 'evaluate_reconstruction', slow_evaluation)
  workdir = str(tmp_path / 'run')
  # What the run must restore: Python's default, or SIG_IGN where the shell started the tests in
  # the background (`... &` without job control ignores SIGINT in the child).
  handler_before = signal.getsignal(signal.SIGINT)
  started = time.time()
  state, last_eval, stopped_by = _train(tiny_config, workdir, 4, eval_every=1, ckpt_every=100)
  assert time.time() - started < 300
  assert stopped_by == 'SIGINT' and last_eval is None and int(state.step) == 1
  out = capsys.readouterr().out
  assert (
      f'SIGINT: the evaluation of step 1 was abandoned (for it: python -m launch.eval '
      f'--workdir={workdir} --step=1)'
  ) in out
  assert f'SIGINT: saved step 1 to {workdir}/checkpoints' in out
  assert ckpt_lib.Checkpointer(workdir, create=False).latest_step() == 1
  assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored


def test_ctrl_c_outside_the_loop_is_one_line():
  code = (
      'from launch import common\n'
      'def main(argv):\n  raise KeyboardInterrupt\n'
      "common.run(main, on_interrupt=lambda: 'nothing was written')\n"
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
  )
  assert out.returncode == signals.EXIT_CODES['SIGINT']
  assert out.stderr == 'interrupted (Ctrl-C): nothing was written\n'


# ------------------------------------------------------------------------------------------------
# Interrupted runs, as real processes: SIGTERM (preemption), Ctrl-C and kill -9 between saves.
# ------------------------------------------------------------------------------------------------

INTERRUPT_STEPS = 100


def _launch(launch_train, workdir):
  """`python -m launch.train` on 2 simulated devices with the tiny config: 100 steps, a checkpoint
  every 10, LPIPS off (the interruption logic does not depend on the loss)."""
  return launch_train(
      workdir,
      devices=2,
      overrides={
          'loss.lpips': 0.0,
          'log_every': 10,
          'ckpt_every': 10,
          'evals.reconstruction.every': 1000,
          'num_eval_videos': 0,
          'total_steps': INTERRUPT_STEPS,
      },
  )


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


def _stop(process, name, workdir) -> tuple[int, str]:
  """Sends `name` to the training process and waits for it: it exits with the signal's code
  after saving the step it reached, which becomes the newest checkpoint. (A terminal's Ctrl-C
  sends SIGINT to its foreground process group; with data.num_workers=0 the run is this one
  process, so the signal sent to it is the whole of what Ctrl-C would deliver.) Returns the saved
  step and the process's output."""
  process.send_signal(getattr(signal, name))
  code, out = _finish(process)
  assert code == signals.EXIT_CODES[name], out[-3000:]
  saved = int(re.search(rf'{name}: saved step (\d+)', out).group(1))
  assert ckpt_lib.Checkpointer(workdir, create=False).latest_step() == saved
  return saved, out


def test_sigterm_and_ctrl_c_save_the_current_step_and_the_reruns_end_on_the_same_parameters(
    tiny_config, launch_train, tmp_path, uninterrupted_params
):
  """One run stopped twice and rerun each time: SIGTERM (preemption), then Ctrl-C (SIGINT) in
  the resumed run, then a rerun to the end. Each stop saves the step it reached; the last run
  ends bit for bit on the parameters of the run that was never interrupted (one chain keeps the
  test at three launches, as one resume per signal would need four)."""
  workdir = str(tmp_path / 'run')
  process = _launch(launch_train, workdir)
  _wait_for_checkpoint(process, workdir, 10)
  after_sigterm, _ = _stop(process, 'SIGTERM', workdir)
  assert 10 <= after_sigterm < INTERRUPT_STEPS - 10

  process = _launch(launch_train, workdir)
  _wait_for_checkpoint(process, workdir, (after_sigterm // 10 + 1) * 10)  # it trains on
  after_ctrl_c, out = _stop(process, 'SIGINT', workdir)
  assert f'resumed from {workdir}/checkpoints/{after_sigterm}' in out
  assert after_sigterm < after_ctrl_c < INTERRUPT_STEPS

  code, out = _finish(_launch(launch_train, workdir))
  assert code == 0, out[-3000:]
  assert f'resumed from {workdir}/checkpoints/{after_ctrl_c}' in out
  assert _tree_equal(_final_params(tiny_config, workdir), uninterrupted_params)


def test_kill_9_between_saves_resumes_from_the_last_complete_checkpoint(
    tiny_config, launch_train, tmp_path, uninterrupted_params
):
  workdir = str(tmp_path / 'run')
  process = _launch(launch_train, workdir)
  _wait_for_checkpoint(process, workdir, 10)
  process.kill()  # SIGKILL: no handler, no final save
  code, _ = _finish(process)
  assert code == -signal.SIGKILL
  latest = ckpt_lib.Checkpointer(workdir, create=False).latest_step()
  assert latest is not None and latest % 10 == 0 and latest < INTERRUPT_STEPS

  code, out = _finish(_launch(launch_train, workdir))
  assert code == 0, out[-3000:]
  assert f'resumed from {workdir}/checkpoints/{latest}' in out
  assert _tree_equal(_final_params(tiny_config, workdir), uninterrupted_params)
