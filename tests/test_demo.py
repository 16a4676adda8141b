"""`python -m launch.demo`: every stage from moving-digit videos to generated clips and the report,
at a few steps; a rerun skips the finished stages."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """One directory for the file's tests: the long-video demo reuses the demo's tokenizer and
  data sets when the demo's test ran first (else it builds its own)."""
  return tmp_path_factory.mktemp('demos')


def test_demo_runs_every_stage_and_a_rerun_skips_them(shared):
  tmp_path = shared
  workdir = str(tmp_path / 'demo')
  args = [
      sys.executable,
      '-m',
      'launch.demo',
      f'--workdir={workdir}',
      f'--data_dir={tmp_path / "tfds"}',
      '--tokenizer=digits,steps=20',
      '--dit=digits,steps=20,batch=16',
  ]
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')

  def run():
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout

  first = run()
  for stage in ('tokenizer', 'latents', 'dit'):
    assert os.path.isdir(os.path.join(workdir, stage)), stage
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    summary = json.loads(f.read().splitlines()[-1])
  assert summary['dit_step'] == 20
  for key in ('accuracy_guided', 'accuracy_unguided', 'accuracy_reconstructed'):
    assert 0.0 <= summary[key] <= 1.0, key
  # The ceiling: the classifier on real held-out clips (it is trained on real train clips).
  assert summary['accuracy_real'] >= 0.9
  assert summary['accuracy_during_training'] == [
      [20, summary['accuracy_guided'], summary['accuracy_unguided']]
  ]
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  grid = 'dit/samples/step0000020_grid.png'
  assert f'({grid})' in report and os.path.exists(os.path.join(workdir, grid))
  assert (
      f'| real held-out clips (the classifier\'s ceiling) | {summary["accuracy_real"]:.1%} |'
      in (report)
  )
  assert 'done earlier' not in first

  from dit import latents as latents_lib

  chunks = latents_lib.chunk_files(os.path.join(workdir, 'latents'), 'train')
  before = {f: os.path.getmtime(f) for f in chunks}
  second = run()
  # The finished latent cache is left as it is.
  assert before == {f: os.path.getmtime(f) for f in chunks}
  assert second.count('done earlier') == 2  # the tokenizer and the DiT
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    again = json.loads(f.read().splitlines()[-1])
  assert {k: v for k, v in again.items() if k != 'seconds'} == {
      k: v for k, v in summary.items() if k != 'seconds'
  }
  assert again['seconds']['tokenizer'] is None and again['seconds']['dit'] is None


def test_the_long_video_demo_generates_both_ways_and_reports_them(shared):
  import shutil

  workdir = shared / 'long'
  tokenizer = shared / 'demo' / 'tokenizer'
  if tokenizer.is_dir():  # the same tokenizer stage: skipped as "done earlier"
    shutil.copytree(tokenizer, workdir / 'tokenizer')
  args = [
      sys.executable,
      '-m',
      'launch.demo',
      '--long',
      f'--workdir={workdir}',
      f'--data_dir={shared / "tfds"}',
      '--tokenizer=digits,steps=20',
      '--dit=long_digits,steps=20,batch=16',
      '--per_class=1',
      '--frames=40',
  ]
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '--- stage 4/4: long' in out.stdout
  with open(workdir / 'metrics.jsonl') as f:
    summary = json.loads(f.read().splitlines()[-1])
  assert summary['stage'] == 'long_demo' and summary['frames'] == 40 and summary['videos'] == 10
  # 40 frames = 10 latent frames: keyframes 0, 3, 6, 9 at stride 3, then stride 1 (windows of 4).
  hierarchical, autoregressive = summary['hierarchical'], summary['autoregressive']
  assert hierarchical['sequential_calls'] == 2 and autoregressive['sequential_calls'] == 3
  assert hierarchical['sequential_dit_evaluations'] < autoregressive['sequential_dit_evaluations']
  for method in (hierarchical, autoregressive, summary['real'], summary['real_reconstructed']):
    for key in ('class_consistency_first_quarter', 'class_consistency_last_quarter'):
      assert 0.0 <= method[key] <= 1.0
  for method in (hierarchical, autoregressive):
    assert method['jump_boundary'] >= 0 and method['seconds_one_video'] > 0
  # Real videos: the classifier's ceiling and the generator's physics (2 to 4 pixels a frame).
  assert summary['real']['class_consistency'] > 0.85
  assert 2.0 <= summary['real']['jump_inside_hierarchical'] <= 4.0
  for method in ('hierarchical', 'autoregressive'):
    for label in range(10):
      assert (workdir / 'long' / method / f'class{label}.png').exists()
  report = (workdir / 'report.md').read_text()
  assert '| hierarchical | 2 |' in report and '| autoregressive | 3 |' in report
