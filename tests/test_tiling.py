"""Tiled reconstruction (vitok/tokenizer/tiling.py): tile placement, blend weights summing to one, exact
output shapes for any length and size, and equality with per-tile coding where tiles do not
overlap."""

import numpy as np
import pytest

from vitok.tokenizer import tiling


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


# ----------------------------------------------------------------------------------------------
# Latents of long videos, with a real (untrained) tokenizer: q = 2, 4-frame 16 x 16 clips.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_tokenizer():
  import jax
  from flax import nnx

  from vitok.tokenizer import model as tokenizer

  cfg = tokenizer.TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4)
  model = tokenizer.ViTok(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  encode = jax.jit(lambda clips: nnx.merge(graphdef, params).encode(clips))
  decode = jax.jit(lambda z: nnx.merge(graphdef, params).decode(z))
  return model, encode, decode


def test_tiled_encode_equals_whole_clip_encode_of_every_tile(tiny_tokenizer):
  model, encode, _ = tiny_tokenizer
  video = _video(12, 16, 16)  # three 4-frame clips
  latents = tiling.encode_video(video, clip_frames=4, q=2, encode=encode)
  assert latents.shape == (6, 2, 2, 4)
  for i in range(3):
    whole = np.asarray(model.encode(video[None, 4 * i : 4 * i + 4]))[0]
    np.testing.assert_allclose(latents[2 * i : 2 * i + 2], whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('frames', [1, 3, 5, 13])  # 1, 2q - 1, 2q + 1, a prime
def test_latent_sequences_of_any_length_decode_to_exactly_their_frames(tiny_tokenizer, frames):
  _, encode, decode = tiny_tokenizer
  video = _video(frames, 16, 16)
  latents = tiling.encode_video(video, clip_frames=4, q=2, encode=encode)
  assert latents.shape[0] == -(-frames // 2)
  for overlap in (0, 1):
    out = list(tiling.decode_latents(latents, 2, overlap, q=2, decode=decode, frames=frames))
    assert np.stack(out).shape == video.shape


def test_latent_windows_without_overlap_decode_as_separate_clips(tiny_tokenizer):
  model, encode, decode = tiny_tokenizer
  latents = tiling.encode_video(_video(8, 16, 16), clip_frames=4, q=2, encode=encode)
  out = np.stack(list(tiling.decode_latents(latents, 2, 0, q=2, decode=decode)))
  expected = np.concatenate([np.asarray(model.decode(latents[None, i : i + 2]))[0] for i in (0, 2)])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_overlapping_latent_windows_blend_linearly_across_the_shared_frames():
  """A stand-in decoder that paints every frame of window k with the value k: the output ramps
  from one window's value to the next over the shared frames and is exact elsewhere."""
  calls = []

  def decode(window):
    calls.append(len(calls))
    return np.full((1, 8, 1, 1, 3), float(calls[-1]), np.float32)

  latents = np.zeros((7, 1, 1, 4), np.float32)  # windows of 4 latent frames, sharing 1: starts 0, 3
  out = np.stack(list(tiling.decode_latents(latents, 4, 1, q=2, decode=decode)))[:, 0, 0, 0]
  assert out.shape == (14,)
  np.testing.assert_allclose(out[:6], 0.0)
  np.testing.assert_allclose(out[6:8], [1 / 3, 2 / 3], atol=1e-6)  # the two shared frames
  np.testing.assert_allclose(out[8:], 1.0)


def test_encode_video_rejects_a_clip_length_the_tubelet_does_not_divide():
  with pytest.raises(ValueError, match='clip_frames=5 is not divisible by the tubelet size q=2'):
    tiling.encode_video(_video(8, 16, 16), 5, 2, lambda clips: clips)
