"""Long video (dit/long_video.py, dit/known_frames.py): the hierarchical and autoregressive plans
(which frames each call generates, every frame once, conditions before use), reachable lengths,
the training masks, and sampling a plan (known frames untouched, determinism by seed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit import known_frames
from dit import long_video as L

STRIDES = (1, 3, 9)  # windows of K = 4 latent frames: each stride 3 x the next


def _generated(plan):
  """Per call, the sorted latent frames it generates."""
  return [
      sorted(int(p) for w in call for p, k in zip(w.positions, w.known) if not k) for call in plan
  ]


def test_the_hierarchy_generates_keyframes_then_fills_each_level_between_neighbours():
  plan = L.hierarchical_plan(64, 4, STRIDES)  # 256 frames of 4-frame tubelets
  generated = _generated(plan)
  # Level 1: 8 keyframes at stride 9 spanning the video, in 3 continuation windows of 4.
  assert sorted(sum(generated[:3], [])) == list(range(0, 64, 9))
  assert generated[:3] == [[0, 9, 18, 27], [36, 45, 54], [63]]
  assert [w.stride for call in plan[:3] for w in call] == [9, 9, 9]
  # Level 2: between each pair of keyframes (9 apart) the two frames at stride 3, in one call.
  assert generated[3] == [p for p in range(64) if p % 3 == 0 and p % 9]
  assert len(plan[3]) == 7 and all(w.known == (True, False, False, True) for w in plan[3])
  # Level 3: everything else at stride 1, 21 windows in one call, both ends known.
  assert generated[4] == [p for p in range(64) if p % 3]
  assert len(plan[4]) == 21 and all(w.stride == 1 and w.known[0] and w.known[-1] for w in plan[4])
  owner = L.generated_by(plan, 64)  # every frame exactly once, conditions before use
  assert (owner >= 0).all()
  assert L.sequential_calls(plan) == 5
  assert L.levels(plan) == [
      {'stride': 9, 'calls': 3, 'windows': 3},
      {'stride': 3, 'calls': 1, 'windows': 7},
      {'stride': 1, 'calls': 1, 'windows': 21},
  ]


@pytest.mark.parametrize('length', [10, 13, 28, 37, 64, 82])
def test_every_reachable_length_is_covered_once_by_both_methods(length):
  assert L.reachable(length, 4, STRIDES, 'hierarchical')
  for method in L.METHODS:
    plan = L.make_plan(method, length, 4, STRIDES, context=1)
    owner = L.generated_by(plan, length)
    assert sorted(set(owner.tolist())) == list(range(sum(len(c) for c in plan)))
  hierarchical = L.hierarchical_plan(length, 4, STRIDES)
  autoregressive = L.autoregressive_plan(length, 4)
  assert L.sequential_calls(hierarchical) < L.sequential_calls(autoregressive)


def test_the_coarsest_stride_that_fits_is_the_top_level():
  # 28 = 3 x 9 + 1: keyframes at stride 9 (4 of them, one window); 16 = 5 x 3 + 1: stride 3.
  assert L.top_stride(28, 4, STRIDES) == 9
  assert L.top_stride(16, 4, STRIDES) == 3
  assert L.top_stride(19, 4, STRIDES) == 3  # 3 keyframes at stride 9 are fewer than a window
  assert L.top_stride(7, 4, STRIDES) is None  # 6 / 3 = 2 gaps: fewer than one window


def test_autoregressive_windows_continue_from_the_last_context_frames():
  plan = L.autoregressive_plan(10, 4, context=2)
  assert [(w.start, w.known) for call in plan for w in call] == [
      (0, (False,) * 4),
      (2, (True, True, False, False)),
      (4, (True, True, False, False)),
      (6, (True, True, False, False)),
  ]
  # The last window moves back to end at the video's end (conditioned on more frames).
  plan = L.autoregressive_plan(11, 4, context=1)
  assert [(w.start, w.known) for call in plan for w in call][-1] == (7, (True, True, True, False))


def test_an_unreachable_frame_count_names_the_nearest_reachable_ones():
  assert L.latent_length(256, 4, 4, STRIDES, 'hierarchical') == 64
  assert L.latent_length(253, 4, 4, STRIDES, 'hierarchical') == 64  # the last tubelet cropped
  with pytest.raises(ValueError, match='nearest reachable frame counts are 241-244 and 253-256'):
    L.latent_length(250, 4, 4, STRIDES, 'hierarchical')
  assert L.latent_length(250, 4, 4, STRIDES, 'autoregressive') == 63
  with pytest.raises(ValueError, match='nearest reachable frame counts are 13-16'):
    L.latent_length(7, 4, 4, STRIDES, 'autoregressive')


@pytest.mark.parametrize(
    'strides,window,message',
    [
        ((3, 9), 4, 'must include 1'),
        ((1, 4, 9), 4, '9 is not 3 x 4'),
        ((1, 2), 2, 'leave no frame between'),
    ],
)
def test_strides_that_do_not_form_a_hierarchy_are_refused(strides, window, message):
  with pytest.raises(ValueError, match=message):
    L.check_strides(strides, window)


def test_segment_boundaries_are_where_consecutive_frames_change_window():
  plan = L.autoregressive_plan(7, 4, context=1)  # windows generate 0-3 and 4-6
  boundary = L.boundary_transitions(L.generated_by(plan, 7), q=2, frames=13)
  assert boundary.shape == (12,)
  assert np.flatnonzero(boundary).tolist() == [7]  # frame 7 (latent 3) -> frame 8 (latent 4)


# ----------------------------------------------------------------------------------------------
# Sampling a plan.
# ----------------------------------------------------------------------------------------------


def _fake_sampler(calls):
  """Writes key-dependent noise into every frame (known ones too): run_plan must keep only the
  unknown ones. Records what each call was given."""

  def sample(values, known, strides, labels, key):
    calls.append((values.copy(), known.copy(), strides.copy(), labels.copy()))
    noise = np.asarray(jax.random.normal(key, values.shape))
    return noise + labels[:, None, None, None, None]

  return sample


def test_a_plan_keeps_every_known_frame_and_batches_the_windows_of_a_call():
  plan = L.hierarchical_plan(10, 4, STRIDES)  # keyframes 0, 3, 6, 9; then 3 windows at stride 1
  calls = []
  labels = np.array([1, 5])
  videos = L.run_plan(plan, _fake_sampler(calls), labels, 10, (2, 2, 1), jax.random.PRNGKey(0))
  assert videos.shape == (2, 10, 2, 2, 1)
  assert len(calls) == 2
  values, known, strides, given_labels = calls[1]
  assert values.shape == (2 * 3, 4, 2, 2, 1)  # 2 videos x 3 windows in one call
  assert given_labels.tolist() == [1, 1, 1, 5, 5, 5] and strides.tolist() == [1] * 6
  # The windows were given the keyframes the first call generated, and those are unchanged.
  keyframes = videos[:, [0, 3, 6, 9]]
  np.testing.assert_array_equal(values.reshape(2, 3, 4, 2, 2, 1)[:, :, 0], keyframes[:, :3])
  np.testing.assert_array_equal(values.reshape(2, 3, 4, 2, 2, 1)[:, :, 3], keyframes[:, 1:])
  first_values, first_known, _, _ = calls[0]
  assert not first_known.any()
  # Same seed, same videos; another seed, other videos.
  again = L.run_plan(plan, _fake_sampler([]), labels, 10, (2, 2, 1), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(again, videos)
  other = L.run_plan(plan, _fake_sampler([]), labels, 10, (2, 2, 1), jax.random.PRNGKey(1))
  assert not np.allclose(other, videos)


def test_a_call_runs_in_chunks_of_at_most_max_windows_with_the_same_conditions():
  plan = L.hierarchical_plan(10, 4, STRIDES)
  labels = np.array([1, 5])
  sizes = []

  def keyless(values, known, strides, labels, key):  # a sampler that ignores its key
    sizes.append(len(labels))
    return values + 1.0 + labels[:, None, None, None, None]

  whole = L.run_plan(plan, keyless, labels, 10, (1, 1, 1), jax.random.PRNGKey(0))
  assert sizes == [2, 6]
  sizes.clear()
  chunked = L.run_plan(plan, keyless, labels, 10, (1, 1, 1), jax.random.PRNGKey(0), max_windows=4)
  assert sizes == [2, 4, 2]
  np.testing.assert_array_equal(chunked, whole)


# ----------------------------------------------------------------------------------------------
# Training masks.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('frames', [1, 2, 4, 7])
def test_each_kind_of_training_mask_has_its_shape_and_leaves_a_frame_to_generate(frames):
  key = jax.random.PRNGKey(3)
  for mode, name in enumerate(known_frames.MODES):
    weights = np.eye(len(known_frames.MODES))[mode]
    masks = np.asarray(known_frames.training_masks(key, 256, frames, weights))
    assert masks.shape == (256, frames) and masks.dtype == bool
    assert (~masks).any(axis=1).all(), name  # at least one frame generated in every clip
    if frames == 1 or name == 'none':
      assert not masks.any()
    elif name == 'prefix':  # k known frames then none: a prefix of length 1..t-1
      counts = masks.sum(1)
      np.testing.assert_array_equal(masks, np.arange(frames)[None] < counts[:, None])
      assert counts.min() == 1 and counts.max() == frames - 1
    elif name == 'ends':
      expected = np.zeros(frames, bool)
      expected[[0, -1] if frames > 2 else [0]] = True
      np.testing.assert_array_equal(masks, np.broadcast_to(expected, masks.shape))
    elif name == 'sparse' and frames > 2:
      assert 0.3 < masks.mean() < 0.55  # each frame with probability 1/2, one kept unknown


def test_the_mask_kinds_are_drawn_in_proportion_to_their_weights():
  masks = np.asarray(known_frames.training_masks(jax.random.PRNGKey(0), 4000, 4, [1, 0, 3, 0]))
  ends = (masks == np.array([True, False, False, True])).all(axis=1)
  assert not (masks.any(axis=1) & ~ends).any()  # only 'none' and 'ends'
  assert abs(ends.mean() - 0.75) < 0.03


def test_known_frames_reach_the_model_as_a_mask_channel_and_values_stay_in_place():
  from dit import diffusion

  known = diffusion.Known(jnp.array([[True, False]]), jnp.ones((1, 2, 1, 1, 1)))
  x = jnp.zeros((1, 2, 1, 1, 1))
  np.testing.assert_array_equal(known.apply(x)[0, :, 0, 0, 0], [1.0, 0.0])


# ----------------------------------------------------------------------------------------------
# Coherence measures (dit/long_evaluation.py).
# ----------------------------------------------------------------------------------------------


def _moving_square(frames=10, speed=3, teleport=None):
  video = np.zeros((1, frames, 48, 48, 3), np.uint8)
  for t in range(frames):
    x = 2 + speed * t + (8 if teleport is not None and t > teleport else 0)
    video[0, t, 10:16, x : x + 6] = 255
  return video


def test_centroid_jumps_are_the_digit_moves_at_seams_and_inside_segments():
  from dit import long_evaluation

  steady = long_evaluation.centroid_jumps(_moving_square())
  assert steady['jump_mean'] == pytest.approx(3.0, abs=1e-3)
  boundary = np.zeros(9, bool)
  boundary[4] = True  # the change from frame 4 to frame 5
  jumped = long_evaluation.centroid_jumps(_moving_square(teleport=4), boundary)
  assert jumped['jump_boundary'] == pytest.approx(11.0, abs=1e-3)
  assert jumped['jump_inside'] == pytest.approx(3.0, abs=1e-3)
  # One segment (a video generated in one pass): every move is inside, none at a seam.
  one_pass = long_evaluation.centroid_jumps(_moving_square(teleport=4), np.zeros(9, bool))
  assert one_pass['jump_boundary'] is None
  assert one_pass['jump_inside'] == pytest.approx((8 * 3 + 11) / 9, abs=1e-3)


def test_the_long_report_has_a_row_per_method_and_no_seams_for_one_pass():
  from launch import long_demo

  method = lambda boundary: {
      'sequential_calls': 1, 'sequential_dit_evaluations': 30, 'windows': 1,
      'seconds_one_video': 1.0, 'seconds_all_videos': 2.0, 'class_consistency_first_quarter': 0.5,
      'class_consistency_last_quarter': 0.25, 'jump_boundary': boundary, 'jump_inside': 3.0,
      'levels': [{'stride': 1, 'calls': 1, 'windows': 1}],
  }  # fmt: skip
  real = {'class_consistency_first_quarter': 1.0, 'class_consistency_last_quarter': 1.0,
          'jump_boundary_autoregressive': 2.9, 'jump_inside_autoregressive': 2.8,
          'jump_boundary_direct': None, 'jump_inside_direct': 2.85}  # fmt: skip
  long = {'methods': ('autoregressive', 'direct'), 'autoregressive': method(6.5),
          'direct': method(None), 'real': real, 'real_reconstructed': real, 'videos': 20,
          'frames': 256, 'dit_step': 400, 'mixer': 'mate', 'window_latent_frames': 32,
          'strides': [1], 'sampler': 'euler, 30 steps', 'guidance': 4.0, 'context': 1}  # fmt: skip
  text = long_demo.report_text(long, {'psnr': 28.0}, None, {'long': 1})
  assert '| autoregressive | 1 | 30 | 1 | 1.00 | 2.00 | 50.0% | 25.0% | 6.50 | 3.00 |' in text
  assert '| direct | 1 | 30 | 1 | 1.00 | 2.00 | 50.0% | 25.0% | - | 3.00 |' in text
  assert '| real videos | | | | | | 100.0% | 100.0% | 2.90 / - | 2.80 / 2.85 |' in text


def test_real_long_videos_keep_their_class_and_move_by_the_generators_physics():
  """The references of the long-video demo: the classifier's per-frame ceiling on real 64-frame
  videos, and their centroid jumps (speed canvas / 32 to canvas / 16 pixels a frame)."""
  from dit import long_evaluation

  videos, labels = long_evaluation.real_videos(20, 64, 64)
  assert videos.shape == (20, 64, 64, 64, 3)
  measured = long_evaluation.coherence(videos, labels, None)
  assert measured['class_consistency_first_quarter'] > 0.85
  assert measured['class_consistency_last_quarter'] > 0.85
  assert 2.0 <= measured['jump_mean'] <= 4.0 + 1e-6


def test_direct_generation_is_one_window_over_the_whole_length():
  for length in (1, 7, 64):
    assert L.reachable(length, 4, STRIDES, 'direct')
    plan = L.make_plan('direct', length, 4, STRIDES)
    assert L.sequential_calls(plan) == 1 and len(plan[0]) == 1
    assert (L.generated_by(plan, length) == 0).all()
    assert plan[0][0].stride == 1 and not any(plan[0][0].known)
  assert L.latent_length(257, 4, 4, STRIDES, 'direct') == 65  # any length: no nearest to name
  with pytest.raises(ValueError, match='stride 1'):
    L.make_plan('direct', 10, 4, (9, 3))


def test_a_model_without_coarse_strides_cannot_generate_hierarchically_and_says_so():
  with pytest.raises(ValueError, match='needs a stride > 1'):
    L.latent_length(256, 4, 32, (1,), 'hierarchical')
