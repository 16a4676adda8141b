r"""Evaluate the latest checkpoint of a run on its held-out split: prints the metrics as JSON and
appends them to WORKDIR/metrics.jsonl (plus sample PNG/mp4 files in WORKDIR/samples).

    python -m launch.eval --workdir=/tmp/vitok-demo                      # uses the run's config.json
    python -m launch.eval --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
    python -m launch.eval --workdir=/ckpt/run --step=50000 --raw        # not the EMA parameters

The checkpoint is restored onto this job's devices whatever mesh trained it: by default a
data-parallel mesh over all devices here (--mesh=-1x1); pass --mesh for a model-sharded one.
"""

import json

import jax
from absl import flags

from launch import common
from vitok import trainer

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_RAW = flags.DEFINE_bool('raw', False, 'Evaluate the raw parameters even when the run kept an EMA '
                        '(by default the EMA is evaluated, as during training).')


def main(argv):
  del argv
  common.quiet_library_logs()
  config, task, layout, checkpointer, step = common.open_trained_run(_STEP.value)
  # Only the parameters are read: no optimizer state is allocated for an evaluation.
  use_ema = config.optim.ema_decay > 0 and not _RAW.value
  params = checkpointer.restore_params(layout.abstract.params, step, ema=use_ema)
  sources = trainer.prepare_sources(config.data)
  result = task.evaluate(layout.graphdef, params, trainer.replicate(task.frozen(), layout.mesh),
                         sources[config.data.eval_split], step, common.workdir(), layout.mesh)
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main)
