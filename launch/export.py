r"""Export a run's parameters for inference or for another job (e.g. a DiT that needs the tokenizer):
the EMA parameters when the run kept an EMA (else the raw ones), without optimizer state.

    python -m launch.export --workdir=/ckpt/sb4x8 --out=/models/sb4x8            # latest step
    python -m launch.export --workdir=/ckpt/sb4x8 --out=/models/sb4x8 --step=50000 --raw

OUT holds `params/` (an Orbax checkpoint of the parameters alone, with their manifest) and
`config.json` (the run's config, which fixes the architecture). Load it on any device count with
`vitok.tokenizer.frozen_tokenizer.load_tokenizer(OUT)`.
"""

import os

import jax
from absl import flags

from launch import common
from vitok.core import export, run_dir

_OUT = flags.DEFINE_string('out', None, 'Directory to write the exported parameters to.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
_RAW = flags.DEFINE_bool('raw', False, 'Export the raw parameters even when the run has an EMA.')


def main(argv):
  del argv
  common.quiet_library_logs()
  out = common.directory_flag('out')
  run = common.open_trained_run(_STEP.value, _RAW.value)
  export.export_params(run.params, os.path.join(out, 'params'))
  if jax.process_index() == 0:
    run_dir.write_config(run.config, out)  # the config the parameters were restored with
    print(f'exported the {"EMA" if run.ema else "raw"} parameters of step {run.step} to {out}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  flags.mark_flag_as_required('out')
  common.run(main)
