"""launch.reconstruct: a tokenizer over a video of any length and size, exact output shapes, and
the seam figures (boundary vs interior frames) against closed forms."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from launch import reconstruct
from tests.conftest import REPO
from vitok.core import export, run_dir
from vitok.data import video_io
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import stage1, tiling


@pytest.fixture(scope='module')
def tokenizer_export(tiny_config, tmp_path_factory):
  """An export (as `launch.export` writes it) of a freshly initialised tiny tokenizer: 4-frame
  32 x 32 clips, tubelets 2 x 8."""
  directory = str(tmp_path_factory.mktemp('tokenizer') / 'export')
  config = tiny_config.copy_and_resolve_references()
  model = stage1.TokenizerTask(config).create_model(nnx.Rngs(0))
  export.export_params(nnx.state(model, nnx.Param), os.path.join(directory, 'params'))
  run_dir.write_config(config, directory)
  return directory


def _random_frames(t, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.mark.slow
def test_an_odd_sized_video_of_a_prime_length_comes_back_at_exactly_its_shape(
    tokenizer_export, tmp_path
):
  video, out = str(tmp_path / 'in.mp4'), str(tmp_path / 'out' / 'recon.mp4')
  with video_io.Mp4Writer(video, fps=10, crf=0, exact_size=True) as writer:
    for frame in _random_frames(13, 97, 131):
      writer.write(frame)
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'launch.reconstruct',
          f'--tokenizer={tokenizer_export}',
          f'--video={video}',
          f'--out={out}',
      ],
      cwd=REPO,
      env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert video_io.probe(out) == (13, 97, 131, 10.0)
  assert (result['frames'], result['height'], result['width']) == (13, 97, 131)
  # 4-frame tiles sharing 1 (starts 0, 3, 6, 9); 32-pixel tiles sharing 8: 4 rows (0, 24, 48, 65) x 6 columns.
  assert result['tile'] == [4, 32, 32] and result['overlap'] == [1, 8, 8]
  assert result['tiles'] == 4 * 4 * 6
  assert result['boundary_frames'] == 3  # frames 3, 6 and 9
  for name in ('psnr', 'ssim', 'lpips', 'flicker'):
    for suffix in ('', '_boundary', '_interior'):
      assert np.isfinite(result[name + suffix]), name + suffix
  assert result['peak_rss_mib'] > 0


def test_a_one_frame_video_goes_through_the_trained_clip_size(tokenizer_export):
  frozen = frozen_tokenizer.open_tokenizer(tokenizer_export)
  plan = tiling.TilePlan.make((1, 32, 40), tile=(4, 32, 32), overlap=(1, 8, 8))
  frames = list(
      tiling.reconstruct_frames(
          plan, iter(_random_frames(1, 32, 40)), reconstruct.make_codec(frozen)
      )
  )
  assert len(frames) == 1 and frames[0].shape == (32, 40, 3)
  assert np.isfinite(frames[0]).all()


def test_seam_figures_match_closed_forms():
  """Errors placed on known frames: a constant offset d on the boundary frames only gives the
  boundary frames PSNR -10 log10((d/2)^2) and the interior ones none; the flicker of a change
  t-1 -> t is the mean absolute difference of the two frames' errors, in [0, 1] units."""
  T, H, W = 8, 16, 16
  boundary = np.zeros(T, bool)
  boundary[[3, 4]] = True
  measure = reconstruct.FrameMetrics(H, W, with_lpips=False, chunk=3)  # chunks 3, 3, 2
  real = np.full((H, W, 3), 128, np.uint8)
  unit = 128 / 127.5 - 1
  offset = 0.2
  for t in range(T):
    recon = np.full((H, W, 3), unit + (offset if boundary[t] else 0.0), np.float32)
    measure.add(real, recon)
  result = measure.summary(boundary)
  expected_boundary = -10 * np.log10((offset / 2) ** 2)
  np.testing.assert_allclose(result['psnr_boundary'], expected_boundary, rtol=1e-5)
  np.testing.assert_allclose(result['psnr'], -10 * np.log10((offset / 2) ** 2 * 2 / 8), rtol=1e-5)
  assert result['psnr_interior'] > 100  # exact: the 1e-20 floor
  # Changes 2->3 and 4->5 jump by the offset; 3->4 does not; the interior changes are exact.
  np.testing.assert_allclose(result['flicker_boundary'], (offset / 2) * 2 / 3, rtol=1e-5)
  assert result['flicker_interior'] == 0.0
  np.testing.assert_allclose(result['flicker'], (offset / 2) * 2 / 7, rtol=1e-5)
  assert result['ssim_interior'] == pytest.approx(1.0, abs=1e-6)
  assert 'lpips' not in result


def test_bad_video_and_overlap_are_one_line_each(tokenizer_export, tmp_path):
  def run(*args):
    return subprocess.run(
        [sys.executable, '-m', 'launch.reconstruct', f'--tokenizer={tokenizer_export}', *args],
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
        capture_output=True,
        text=True,
        timeout=300,
    )

  broken = tmp_path / 'broken.mp4'
  broken.write_bytes(b'not a video')
  done = run(f'--video={broken}', f'--out={tmp_path / "o.mp4"}')
  assert done.returncode == 2
  assert (
      done.stderr.strip().splitlines()[-1].startswith(f'bad flag --video: Cannot decode {broken}')
  )
  good = str(tmp_path / 'in.mp4')
  video_io.write_mp4(good, _random_frames(4, 32, 32), crf=0)
  done = run(f'--video={good}', f'--out={tmp_path / "o.mp4"}', '--overlap_frames=4')
  assert done.returncode == 2
  assert 'frames: overlap 4 must be in [0, tile size 4)' in done.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / 'o.mp4')
