"""Checkpoints and resume: a resumed run restores exactly the saved state and continues from its
step; unfinished saves are ignored; a corrupt checkpoint fails with a clear error; launch.eval works
on a tiny checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import vitok as vitok_config
from vitok import checkpoint as ckpt_lib
from vitok import stage1, trainer
from vitok import train_state as ts
from vitok.data import builders, pipeline, video_io

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_videos(folder):
  rng = np.random.default_rng(0)
  for i in range(4):
    base = rng.integers(0, 255, (1, 4, 4, 3)).astype(np.float64)
    frames = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)            # 32x32 colour blocks
    frames = np.concatenate([np.roll(frames, t, axis=2) for t in range(10)])  # moving right
    video_io.write_mp4(os.path.join(folder, f'clip{i}.mp4'), frames.astype(np.uint8))


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
  videos = tmp_path_factory.mktemp('videos')
  _make_videos(str(videos))
  config = vitok_config.get_config('variant=Ti-Ti/2x8,channels=4,frames=4,res=32,batch=2')
  config.data.update(name='video_folder', manual_dir=str(videos), holdout_fraction=0.25,
                     data_dir=str(tmp_path_factory.mktemp('tfds')), clip_frames=8,
                     store_short_side=32, eval_batch_size=2)
  config.loss.lpips_frames = 1
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  config.update(log_every=1, ckpt_every=2, eval_every=100, num_eval_videos=1)
  return config


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


def test_resume_continues_at_the_saved_step_with_identical_state(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  config, task, state2, result = _train_two_steps(tiny_config, workdir)
  assert int(state2.step) == 2 and result['step'] == 2

  # The checkpoint holds exactly the in-memory state: step, params, Adam moments, EMA and RNG.
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == 2
  restored = checkpointer.restore(ckpt_lib.abstract_like(state2))
  assert _tree_equal(restored, state2)
  assert restored.ema_params is not None and int(restored.step) == 2
  checkpointer.close()

  # Resuming with a longer schedule starts at step 2, not 0...
  config.total_steps = 4
  state4, result = trainer.train(config, workdir, task)
  assert int(state4.step) == 4 and result['step'] == 4
  steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert steps == [2, 4]
  # ...and equals continuing the restored state by hand on the batches the resumed run draws.
  graphdef, fresh, tx, schedule = trainer.create_state(task, config, config.total_steps)
  step_fn = jax.jit(ts.make_train_step(graphdef, task.loss_fn, tx, schedule, config.optim.ema_decay))
  source = builders.prepare(config.data)[config.data.train_split]
  batches = iter(pipeline.train_dataset(config.data, seed=config.data.seed + 2, source=source))
  state = restored
  for _ in range(2):
    state, _ = step_fn(state, next(batches), task.frozen())
  assert _tree_equal(state, state4)


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


def test_missing_dataset_directory_fails_naming_the_field(tiny_config, tmp_path):
  config = tiny_config.copy_and_resolve_references()
  config.data.manual_dir = str(tmp_path / 'does-not-exist')
  with pytest.raises(ValueError, match='data.manual_dir'):
    trainer.train(config, str(tmp_path / 'run'), stage1.TokenizerTask(config))
