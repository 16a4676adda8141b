r"""Train a model of the family `config.task` names (see launch/tasks.py), resuming from WORKDIR's
latest checkpoint if there is one.

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo

Multi-process: the same command on every process. TPU pods (launch/tpu_pod.sh) and SLURM jobs
(launch/slurm.sbatch) are detected; elsewhere pass --coordinator_address=host:port
--num_processes=N --process_id=i. On SIGTERM (or Ctrl-C) the run saves its current step and exits
with status 143 (130); rerunning the command resumes from there.
"""

import os
import sys

from absl import flags

from launch import common
from vitok.core import signals, trainer


def main(argv):
  del argv
  common.quiet_library_logs()
  if common.workdir() is None:
    common.fail('--workdir is required')
  config = common.load_config()
  common.init_distributed()
  common.mesh_override(config)  # --mesh=AxB, if given
  task = common.make_task_or_exit(config)
  # Start-up checks the mesh, the batch split and the best-checkpoint metric before it writes
  # anything into the workdir; a bad config ends in one line (common.run).
  result = trainer.train(config, common.workdir(), task)  # prints each evaluation
  if result.stopped_by:  # SIGTERM or Ctrl-C: the step was saved
    sys.exit(signals.EXIT_CODES[result.stopped_by])


def _interrupted() -> str:
  """What a Ctrl-C outside the training loop (start-up, or a second Ctrl-C) leaves behind."""
  directory = os.path.join(common.workdir() or '', 'checkpoints')
  steps = (
      sorted(int(d) for d in os.listdir(directory) if d.isdigit())
      if os.path.isdir(directory)
      else []
  )
  return 'stopped without saving; ' + (
      f'the newest checkpoint in {directory} is step {steps[-1]}'
      if steps
      else 'no checkpoint was written'
  )


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main, on_interrupt=_interrupted)
