r"""Train a ViTok tokenizer (stage 1), resuming from WORKDIR's latest checkpoint if there is one.

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo

Multi-process: the same command on every process. TPU pods (launch/tpu_pod.sh) and SLURM jobs
(launch/slurm.sbatch) are detected; elsewhere pass --coordinator_address=host:port
--num_processes=N --process_id=i. On SIGTERM the run saves its current step and exits with
status 143; rerunning the command resumes from there.
"""

import sys

from absl import flags

from launch import common
from vitok import trainer


def main(argv):
  del argv
  common.quiet_library_logs()
  if common.workdir() is None:
    common.fail('--workdir is required')
  config = common.load_config()
  common.init_distributed()
  common.mesh_override(config)                    # --mesh=AxB, if given
  task = common.make_task_or_exit(config)
  mesh = common.make_mesh_or_exit(config)         # a mesh that does not fit fails before any work
  try:
    trainer.check_batch_fits(config, mesh)
  except ValueError as e:
    common.fail(f'bad config: {e}')
  state, _ = trainer.train(config, common.workdir(), task)   # prints each evaluation
  if int(state.step) < config.total_steps:        # stopped by SIGTERM after saving
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main)
