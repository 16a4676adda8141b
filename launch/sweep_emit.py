"""A sweep's launch commands written out for a cluster (`python -m launch.sweep --emit=...`).

Each member's steps (vitok/sweeps/sweep.py) become one shell line joined by `&&`, so a member that
fails stops at that step, and every step resumes where it stopped when the line is run again.

  commands  DIR/commands.sh       one line per member, for any scheduler or a plain shell
  slurm     DIR/sweep.sbatch      a SLURM job array, one array task per member; every launch
                                  command runs under `srun` with one process per GPU, as in
                                  launch/slurm.sbatch (preemption: SIGTERM saves, the task requeues)
  tpu       DIR/tpu_commands.sh   one `gcloud compute tpus tpu-vm ssh --worker=all` line per member,
                                  for an existing TPU VM (TPU_NAME, ZONE, REPO_DIR from the
                                  environment, as in launch/tpu_pod.sh)

DIR must be storage every node sees; `--collect` then reads the results from it.
"""

from __future__ import annotations

import os
import shlex

from vitok.sweeps import sweep

FORMATS = ('commands', 'slurm', 'tpu')
FILES = {'commands': 'commands.sh', 'slurm': 'sweep.sbatch', 'tpu': 'tpu_commands.sh'}


def member_line(sweep_config, member: sweep.Member, directory: str, prefix: str = '') -> str:
  """The member's launch commands as one shell line (`prefix` before each python)."""
  return ' && '.join(
      prefix + s.command('python') for s in sweep.steps(sweep_config, member, directory)
  )


def _collect_hint(config_argument: str, directory: str) -> str:
  command = shlex.join(
      ['python', '-m', 'launch.sweep', f'--config={config_argument}', f'--workdir={directory}']
  )
  return f'# Results of whatever has finished: {command} --collect\n'


def commands_script(sweep_config, members, directory: str, config_argument: str) -> str:
  lines = [
      '#!/usr/bin/env bash',
      f'# The {len(members)} runs of the sweep {config_argument}, one line each (from the',
      '# repository root). Rerunning a line resumes it; the lines are independent.',
      _collect_hint(config_argument, directory).rstrip('\n'),
  ]
  lines += [member_line(sweep_config, m, directory) for m in members]
  return '\n'.join(lines) + '\n'


def slurm_script(sweep_config, members, directory: str, config_argument: str) -> str:
  runs = '\n'.join(
      f'  {shlex.quote(member_line(sweep_config, m, directory, "srun --kill-on-bad-exit=1 "))}'
      for m in members
  )
  names = ' '.join(shlex.quote(m.name) for m in members)
  return f"""#!/usr/bin/env bash
# The {len(members)} runs of the sweep {config_argument} as a SLURM job array:
#
#   sbatch {os.path.join(directory, FILES['slurm'])}        (from the repository root)
#
# One array task per run; each launch command runs under srun, one process per GPU (see
# launch/slurm.sbatch for the node layout, preemption and shared storage). A preempted task saves
# its step on SIGTERM and is requeued; the rerun resumes it.
{_collect_hint(config_argument, directory).rstrip()}
#SBATCH --job-name=vitok-sweep
#SBATCH --array=0-{len(members) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={directory}/slurm-%A_%a.out
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
export PYTHONUNBUFFERED=1
NAMES=({names})
RUNS=(
{runs}
)
echo "sweep run ${{NAMES[$SLURM_ARRAY_TASK_ID]}}"
status=0
bash -c "${{RUNS[$SLURM_ARRAY_TASK_ID]}}" || status=$?
if [[ $status -eq 143 ]]; then
  echo "the run saved its step on SIGTERM; requeueing ${{SLURM_JOB_ID}}" >&2
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $status
"""


def tpu_script(sweep_config, members, directory: str, config_argument: str) -> str:
  lines = [
      '#!/usr/bin/env bash',
      f'# The {len(members)} runs of the sweep {config_argument} on an existing Cloud TPU VM, one',
      '# line per run; every worker runs the same command (see launch/tpu_pod.sh). DIR must be',
      '# storage shared by all workers.',
      '#   TPU_NAME=my-v4-32 ZONE=us-central2-b REPO_DIR=~/vitok bash tpu_commands.sh',
      _collect_hint(config_argument, directory).rstrip('\n'),
      'set -euo pipefail',
      ': "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"',
      'REPO_DIR="${REPO_DIR:-~/vitok}"',
  ]
  for m in members:
    remote = shlex.quote(f'set -e; cd $REPO_DIR && {member_line(sweep_config, m, directory)}')
    # The remote command is single-quoted except $REPO_DIR, which this shell fills in.
    remote = remote.replace('$REPO_DIR', '\'"$REPO_DIR"\'')
    lines.append(
        'gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
        f'--command={remote}'
    )
  return '\n'.join(lines) + '\n'


def write(kind: str, sweep_config, members, directory: str, config_argument: str) -> str:
  """Writes the `kind` script into `directory`; returns its path."""
  text = {'commands': commands_script, 'slurm': slurm_script, 'tpu': tpu_script}[kind](
      sweep_config, members, directory, config_argument
  )
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, FILES[kind])
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path
