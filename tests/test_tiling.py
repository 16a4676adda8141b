"""Tiled reconstruction (vitok/tiling.py): tile placement, blend weights summing to one, exact
output shapes for any length and size, and equality with per-tile coding where tiles do not
overlap."""

import numpy as np
import pytest

from vitok import tiling


@pytest.mark.parametrize(
    'length,tile,overlap,expected',
    [
        (1, 8, 2, [0]),
        (8, 8, 2, [0]),
        (16, 8, 0, [0, 8]),
        (17, 8, 0, [0, 8, 9]),
        (20, 8, 2, [0, 6, 12]),
        (21, 8, 4, [0, 4, 8, 12, 13]),
    ],
)
def test_tiles_are_evenly_spaced_and_the_last_one_ends_at_the_video_end(
    length, tile, overlap, expected
):
  assert tiling.tile_starts(length, tile, overlap) == expected


@pytest.mark.parametrize('length', [1, 3, 8, 9, 13, 16, 97, 131])
@pytest.mark.parametrize('overlap', [0, 1, 3, 6])
def test_blend_weights_sum_to_one_at_every_position_and_ramp_linearly(length, overlap):
  tile = 8
  starts = tiling.tile_starts(length, tile, overlap)
  weights = tiling.blend_weights(length, tile, starts)
  total = np.zeros(max(length, tile))
  for start, weight in zip(starts, weights):
    assert weight.shape == (tile,) and (weight >= 0).all()
    total[start : start + tile] += weight
  np.testing.assert_allclose(total[:length], 1.0, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(total[length:], 0.0)  # the padding of a short video
  if len(starts) > 2 and 0 < 2 * overlap <= tile:
    # where only two tiles share `overlap` positions the first ramps down by 1 / (overlap + 1)
    shared = weights[0][tile - overlap :]
    np.testing.assert_allclose(np.diff(shared), -1 / (overlap + 1), atol=1e-12)


def _video(t, h, w, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (t, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize('frames', [1, 3, 5, 8, 9, 13, 31])  # 1, q-1, q+1 (q = 4), a prime...
@pytest.mark.parametrize('size', [(16, 16), (5, 7), (97, 131)])
def test_an_identity_codec_gives_back_exactly_the_input_whatever_its_length_and_size(frames, size):
  video = _video(frames, *size)
  plan = tiling.TilePlan.make(video.shape[:3], tile=(8, 16, 16), overlap=(2, 4, 4))
  out = np.stack(list(tiling.reconstruct_frames(plan, iter(video), lambda tiles: tiles)))
  assert out.shape == video.shape
  np.testing.assert_allclose(out, video, atol=1e-6)


def test_without_overlap_each_tile_is_coded_alone_as_a_whole_clip():
  """A codec that mixes information within a tile (each tile minus its own mean): the tiled
  result is the codec applied to every tile separately and put side by side."""
  video = _video(16, 32, 48)
  codec = lambda tiles: tiles - tiles.mean(axis=(1, 2, 3, 4), keepdims=True)
  plan = tiling.TilePlan.make(video.shape[:3], tile=(8, 16, 16), overlap=(0, 0, 0))
  assert plan.num_tiles == 2 * 2 * 3
  out = np.stack(list(tiling.reconstruct_frames(plan, iter(video), codec)))
  expected = np.zeros_like(video)
  for t in (0, 8):
    for y in (0, 16):
      for x in (0, 16, 32):
        tile = video[t : t + 8, y : y + 16, x : x + 16]
        expected[t : t + 8, y : y + 16, x : x + 16] = codec(tile[None])[0]
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_frames_are_handed_on_before_the_whole_video_is_read():
  """Working memory does not grow with the length: the first frames come out after reading
  about one tile, not the whole video."""
  video, read = _video(64, 8, 8), []

  def frames():
    for i, frame in enumerate(video):
      read.append(i)
      yield frame

  plan = tiling.TilePlan.make(video.shape[:3], tile=(8, 8, 8), overlap=(2, 0, 0))
  out = tiling.reconstruct_frames(plan, frames(), lambda tiles: tiles)
  next(out)
  assert len(read) == 8  # one tile read for the first frame
  assert len(list(out)) == 63 and len(read) == 64


def test_boundary_frames_are_the_shared_ones():
  plan = tiling.TilePlan.make((20, 8, 8), tile=(8, 8, 8), overlap=(2, 0, 0))  # starts 0, 6, 12
  np.testing.assert_array_equal(np.flatnonzero(plan.boundary_frames()), [6, 7, 12, 13])
  plan = tiling.TilePlan.make((16, 8, 8), tile=(8, 8, 8), overlap=(0, 0, 0))
  np.testing.assert_array_equal(np.flatnonzero(plan.boundary_frames()), [7, 8])


def test_bad_tiling_names_the_axis():
  with pytest.raises(ValueError, match='height: overlap 16 must be in'):
    tiling.TilePlan.make((8, 32, 32), tile=(8, 16, 16), overlap=(0, 16, 0))
  with pytest.raises(ValueError, match='0 frames'):
    tiling.TilePlan.make((0, 32, 32), tile=(8, 16, 16), overlap=(0, 0, 0))
