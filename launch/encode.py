r"""Encode a video dataset once with a trained tokenizer, for DiT training (a latent cache).

    python -m launch.encode --tokenizer=/tmp/vitok-run --out=/tmp/latents
    python -m launch.encode --tokenizer=/models/sb4x8 --config=configs/dit.py:ucf101 \
        --out=/data/ucf101-latents

--tokenizer is an export of `launch.export` or a tokenizer training workdir (its newest checkpoint
that restores; the EMA when the run kept one). The dataset is the --config's data fields (any
config file: a DiT config names the videos its latents come from), or the tokenizer run's own.
Every example of the train and eval splits is encoded once, centre-cropped (no augmentation),
to its posterior mean and log-variance; see dit/latents.py for the format. Rerunning resumes
(finished chunks are kept) and a finished cache is left as it is. Multi-process runs encode their
rows of every batch, with the tokenizer sharded by its rules.
"""

import json

import jax
from absl import flags

from dit import encoding
from launch import common
from vitok.data import DataError
from vitok.tokenizer import frozen as frozen_tokenizer

_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer export or training workdir.')
_OUT = flags.DEFINE_string('out', None, 'Directory of the latent cache to write.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Clips per encoding batch (all devices together).')


def main(argv):
  del argv
  common.quiet_library_logs()
  out = common.directory_flag('out')
  common.init_distributed()
  if flags.FLAGS['config'].present:
    data_cfg = common.load_config().data
  else:
    data_cfg = frozen_tokenizer.read_tokenizer_config(_TOKENIZER.value).data
  try:
    result = encoding.encode(_TOKENIZER.value, out, data_cfg, _BATCH.value)
  except DataError as e:
    common.fail(f'bad data: {e}')
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('tokenizer')
  flags.mark_flag_as_required('out')
  common.run(main)
