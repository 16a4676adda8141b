r"""Train a ViTok tokenizer (stage 1), resuming from WORKDIR's latest checkpoint if there is one.

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
"""

from absl import app, flags

from launch import common
from vitok import trainer


def main(argv):
  del argv
  common.quiet_library_logs()
  if common.workdir() is None:
    raise app.UsageError('--workdir is required')
  config = common.load_config()
  task = common.make_task_or_exit(config)
  trainer.train(config, common.workdir(), task)   # prints each evaluation as it happens


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
