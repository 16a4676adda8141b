r"""Evaluate the latest checkpoint of a run on its held-out split: prints the metrics as JSON and
appends them to WORKDIR/metrics.jsonl (plus sample PNG/mp4 files in WORKDIR/samples).

    python -m launch.eval --workdir=/tmp/vitok-demo                      # uses the run's config.json
    python -m launch.eval --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
"""

import json

from absl import app, flags

from launch import common
from vitok import checkpoint as ckpt_lib
from vitok import train_state as ts
from vitok import trainer
from vitok.data import builders

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')


def main(argv):
  del argv
  common.quiet_library_logs()
  config = common.load_config(allow_workdir_config=True)
  task = common.make_task_or_exit(config)
  checkpointer = ckpt_lib.Checkpointer(common.workdir(), create=False)
  step = _STEP.value if _STEP.value is not None else checkpointer.latest_step()
  if step is None:
    raise SystemExit(f'no checkpoint in {checkpointer.directory}: train first')
  graphdef, state, _, _ = trainer.create_state(task, config, config.total_steps)
  state = checkpointer.restore(ckpt_lib.abstract_like(state), step)
  sources = builders.prepare(config.data)
  result = task.evaluate(graphdef, ts.eval_params(state), task.frozen(),
                         sources[config.data.eval_split], step, common.workdir())
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
