"""The independent digit classifier that judges generated moving-digit clips."""

import numpy as np
import pytest

from vitok.data import moving_digits
from vitok.evals import digit_classifier


@pytest.fixture(scope='module')
def classifier():
  return digit_classifier.DigitClassifier(frames=2, canvas=64, num_train=400)


def test_windows_follow_the_digit_wherever_it_is():
  digit = np.zeros((8, 8), np.uint8)
  digit[1:7, 3:5] = 255  # a '1'
  clips = []
  for top, left in ((0, 0), (30, 40), (40, 20)):
    frame = np.zeros((64, 64), np.uint8)
    frame[top : top + 21, left : left + 21] = np.kron(digit, np.ones((3, 3), np.uint8))[:21, :21]
    clips.append(np.repeat(frame[None, :, :, None], 3, axis=-1))
  windows = digit_classifier.digit_windows(np.stack(clips))
  assert windows.shape == (3, digit_classifier.CROP**2)
  # The same glyph in three places gives the same window.
  np.testing.assert_allclose(windows[1], windows[0], atol=1e-6)
  np.testing.assert_allclose(windows[2], windows[0], atol=1e-6)


def test_real_clips_are_the_data_sets_clips():
  clips, labels = digit_classifier.real_clips('test', 3, 4, 32)
  for i, video, label, _ in moving_digits.moving_digit_videos('test', 3, 4, 32, 0):
    np.testing.assert_array_equal(clips[i], video)
    assert labels[i] == label


def test_recognises_held_out_handwriting_and_not_wrong_labels(classifier):
  clips, labels = digit_classifier.real_clips('test', 100, 2, 64)
  assert classifier.scores(clips).shape == (100, 10)
  assert classifier.accuracy(clips, labels) >= 0.85
  # The same clips under shuffled labels: chance level (a judge that cannot fail would pass this).
  assert classifier.accuracy(clips, np.roll(labels, 1)) <= 0.25
  # Blank and noise clips are not confidently one digit: they do not pass for all classes.
  noise = np.random.default_rng(0).integers(0, 255, (10, 2, 64, 64, 3), dtype=np.uint8)
  assert classifier.accuracy(noise, np.arange(10)) <= 0.3
