r"""Evaluate the latest checkpoint of a run on its held-out split with every evaluation of its family
(for a tokenizer: PSNR, SSIM, LPIPS, rFVD and rFID, each beside the pooled codec's; for a DiT: the
loss at fixed noise levels, samples, gFVD, gFID and, with a classifier, class accuracy; a metric that
cannot be computed is reported as `<metric>_unavailable` with the reason): prints the metrics
as JSON, appends them to WORKDIR/metrics.jsonl, writes them as a markdown table to
WORKDIR/eval_stepN.md (plus sample PNG/mp4 files in WORKDIR/samples).

    python -m launch.eval --workdir=/tmp/vitok-demo                      # uses the run's config.json
    python -m launch.eval --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
    python -m launch.eval --workdir=/ckpt/run --step=50000 --raw        # not the EMA parameters

The checkpoint is restored onto this job's devices whatever mesh trained it: by default a
data-parallel mesh over all devices here (--mesh=-1x1); pass --mesh for a model-sharded one.
Without --step, a damaged newest checkpoint is skipped (with a warning naming it and why) and the
newest one that restores is evaluated; the JSON says which step.
"""

import json
import os

import jax
from absl import flags

from launch import common
from vitok.core import run_dir, trainer
from vitok.core import task as task_lib

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_RAW = flags.DEFINE_bool(
    'raw',
    False,
    'Evaluate the raw parameters even when the run kept an EMA '
    '(by default the EMA is evaluated, as during training).',
)


def main(argv):
  del argv
  common.quiet_library_logs()
  run = common.open_trained_run(_STEP.value, _RAW.value)
  context = task_lib.EvalContext(
      graphdef=run.layout.graphdef,
      params=run.params,
      frozen=run.task.frozen(run.layout.mesh),
      sources=trainer.prepare_data(run.task),
      step=run.step,
      workdir=common.workdir(),
      mesh=run.layout.mesh,
  )
  result = {}
  for evaluator in run.task.evaluators():  # every evaluation the family defines
    result.update(evaluator.run(context))
  run_dir.append_metrics(common.workdir(), result)
  if jax.process_index() == 0:
    path = os.path.join(common.workdir(), f'eval_step{run.step}.md')
    with open(path, 'w') as f:
      f.write(markdown_table(result, f'{run.task.name} run {common.workdir()}, step {run.step}'))
    print(f'wrote {path}')
    print(json.dumps(result))  # last: scripts read the final line


def markdown_table(result: dict, title: str) -> str:
  """The metrics as a markdown table (numbers first, then what they were measured on)."""
  lines = [f'# {title}', '', '| metric | value |', '|---|---|']
  for key, value in result.items():
    if isinstance(value, float):
      value = f'{value:.4g}'
    elif isinstance(value, dict):
      value = '; '.join(f'{k}: {v}' for k, v in value.items())
    lines.append(f'| {key} | {value} |')
  return '\n'.join(lines) + '\n'


def _interrupted() -> str:
  return 'the evaluation was stopped'


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main, on_interrupt=_interrupted)
