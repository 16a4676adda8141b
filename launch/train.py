r"""Train a ViTok tokenizer (stage 1), resuming from WORKDIR's latest checkpoint if there is one.

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
"""

from absl import app, flags, logging

from launch import common
from vitok import trainer


def main(argv):
  del argv
  if common.workdir() is None:
    raise app.UsageError('--workdir is required')
  config = common.load_config()
  task = common.make_task_or_exit(config)
  _, result = trainer.train(config, common.workdir(), task)
  if result:
    logging.info('final evaluation: %s', result)


if __name__ == '__main__':
  # Orbax and tfds log every step of every save at INFO; --verbosity=0 brings them back.
  flags.FLAGS.set_default('verbosity', logging.WARNING)
  flags.mark_flag_as_required('workdir')
  app.run(main)
