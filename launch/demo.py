r"""The whole system in one command: videos of handwritten digits in, generated videos out.

    python -m launch.demo --workdir=/tmp/vitok-dit-demo

On the offline moving-digits set (real handwriting from scikit-learn, bouncing on a 64 x 64
canvas, 8 frames, 10 classes), stage by stage:

  1. tokenizer  trains ViTok (configs/vitok.py:digits)               -> WORKDIR/tokenizer
  2. latents    encodes every clip once with it (as launch.encode)   -> WORKDIR/latents
  3. dit        trains a class-conditional DiT on the latents (configs/dit.py:digits); during
                training an independent digit classifier, trained on real frames only, labels
                clips generated for every class with and without guidance -> WORKDIR/dit
  4. report     WORKDIR/report.md (next to the final sample grid) and WORKDIR/metrics.jsonl

Every stage is the same code as its own command (launch.train, launch.encode), and resumable: a
finished stage is skipped, an interrupted one resumes from its checkpoint. --tokenizer and --dit
take the argument of their config file (e.g. --dit=digits,steps=3000); any other field is set with
the separate commands.

    python -m launch.demo --long --workdir=/tmp/vitok-long-demo

The long-video demo: the same tokenizer; every 128-frame moving-digits video encoded clip after
clip into a latent sequence (stage 2); a DiT trained on windows of those sequences at several
strides, with known frames (configs/dit.py:long_digits, stage 3); then (stage 4, `long`)
--frames-frame videos of every digit generated hierarchically (diffusion over diffusion) and
autoregressively, with their wall times, sequential DiT evaluations, class consistency and motion
continuity against real videos (launch/long_demo.py), into WORKDIR/long/, the report and
metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import flags

from configs import dit as dit_configs
from configs import vitok as vitok_configs
from dit import encoding
from launch import common, long_demo
from vitok.core import checkpoint as ckpt_lib
from vitok.core import run_dir, signals, trainer
from vitok.sweeps import chain as chain_lib
from vitok.sweeps import sweep

_TOKENIZER = flags.DEFINE_string(
    'tokenizer', 'digits', 'Argument of configs/vitok.py for the tokenizer stage.'
)
_DIT = flags.DEFINE_string(
    'dit',
    '',
    "Argument of configs/dit.py for the DiT stage ('': digits, or long_digits with --long).",
)
_LONG = flags.DEFINE_bool('long', False, 'The long-video demo (see above) instead.')
_FRAMES = flags.DEFINE_integer('frames', 256, '--long: frames of each generated video.')
_PER_CLASS = flags.DEFINE_integer('per_class', 2, '--long: generated videos per digit class.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', "Where the moving-digits data set is built (default: the config's)."
)

STAGES = chain_lib.STAGES  # the tokenizer -> latents -> DiT chain a sweep member runs too
LONG_STAGES = STAGES + ('long',)


def _finished_step(workdir: str) -> int | None:
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return None
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step


def _train(config, workdir: str) -> str:
  """Trains `config` in `workdir` unless it already reached its last step; says which."""
  if _finished_step(workdir) == config.total_steps:
    print(f'done earlier: {workdir} holds step {config.total_steps} of {config.total_steps}')
    return 'done earlier'
  task = common.make_task_or_exit(config)
  result = trainer.train(config, workdir, task)
  if result.stopped_by:  # Ctrl-C or SIGTERM: the step was saved; rerunning resumes it
    raise SystemExit(signals.EXIT_CODES[result.stopped_by])
  return 'trained'


def _read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def report(workdir: str, seconds: dict) -> dict:
  """WORKDIR/report.md and one summary line in WORKDIR/metrics.jsonl, from the stages' own
  metrics.jsonl files."""
  tokenizer_eval = _read_metrics(os.path.join(workdir, 'tokenizer'))[-1]
  dit_dir = os.path.join(workdir, 'dit')
  accuracy = [m for m in _read_metrics(dit_dir) if 'accuracy_guided' in m]
  # One line per evaluated step (a rerun of an evaluation keeps the last).
  by_step = {m['step']: m for m in accuracy}
  final = by_step[max(by_step)]
  summary = {
      'stage': 'demo',
      'tokenizer_psnr': tokenizer_eval['psnr'],
      'tokenizer_baseline_psnr': tokenizer_eval.get('baseline_psnr'),
      'dit_step': final['step'],
      'accuracy_guided': final['accuracy_guided'],
      'accuracy_unguided': final['accuracy_unguided'],
      'accuracy_real': final['accuracy_real'],
      'accuracy_reconstructed': final['accuracy_reconstructed'],
      'guidance': final['guidance'],
      'accuracy_during_training': [
          [step, by_step[step]['accuracy_guided'], by_step[step]['accuracy_unguided']]
          for step in sorted(by_step)
      ],
      'seconds': seconds,
  }
  run_dir.append_metrics(workdir, summary)
  grid = os.path.join('dit', 'samples', f'step{final["step"]:07d}_grid.png')
  rows = '\n'.join(
      f'| {step} | {guided:.0%} | {unguided:.0%} |'
      for step, guided, unguided in summary['accuracy_during_training']
  )
  times = ', '.join(
      f'{stage} {"done earlier" if value is None else value}' for stage, value in seconds.items()
  )
  text = f"""# ViTok + DiT demo: moving handwritten digits

Generated clips of every digit class, labelled by an independent digit classifier that was trained
on real frames only (`vitok/evals/digit_classifier.py`): the share labelled as the class they were
generated for.

| clips | class accuracy |
|---|---|
| real held-out clips (the classifier's ceiling) | {final['accuracy_real']:.1%} |
| the same clips reconstructed by the tokenizer | {final['accuracy_reconstructed']:.1%} |
| generated, guidance {final['guidance']:g} | **{final['accuracy_guided']:.1%}** |
| generated, no guidance | {final['accuracy_unguided']:.1%} |

{final['clips']} generated clips per setting ({final['clips'] // 10} per class) at DiT step
{final['step']}; {final['real_clips']} real clips.

During DiT training:

| DiT step | guided | unguided |
|---|---|---|
{rows}

Tokenizer: held-out PSNR {tokenizer_eval['psnr']:.2f} dB (pooled-codec baseline
{tokenizer_eval.get('baseline_psnr', float('nan')):.2f} dB at no more floats).

Samples (a row per class; each clip's frames side by side): [{grid}]({grid}); one mp4 per clip
beside it.

Stage times (s): {times}.
"""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
      f.write(text)
  return summary


def main(argv):
  del argv
  common.quiet_library_logs()
  workdir = common.workdir()
  # Both config arguments are read before any work, and the tokenizer's config is checked: a bad
  # one is one line and nothing runs. (The DiT's is checked in full once its latents exist.)
  tokenizer_config = _load(vitok_configs, _TOKENIZER.value, 'tokenizer')
  dit_config = _load(dit_configs, _DIT.value or ('long_digits' if _LONG.value else 'digits'), 'dit')
  if _DATA_DIR.value:
    tokenizer_config.data.data_dir = _DATA_DIR.value
    dit_config.data.data_dir = _DATA_DIR.value
  common.make_task_or_exit(tokenizer_config)
  stages = LONG_STAGES if _LONG.value else STAGES
  chain = chain_lib.Chain(workdir)
  paths = {stage: chain.dir(stage) for stage in stages}
  sweep.set_fields(dit_config, chain.dit_fields, 'the demo')
  seconds = {}

  started = time.perf_counter()
  _stage(1, 'tokenizer', paths['tokenizer'])
  outcome = _train(tokenizer_config, paths['tokenizer'])
  seconds['tokenizer'] = round(time.perf_counter() - started) if outcome == 'trained' else None

  started = time.perf_counter()
  _stage(2, 'latents', paths['latents'])
  # The clips the tokenizer trained on, or (--long) the DiT config's long videos, clip by clip.
  data = dit_config.data if _LONG.value else tokenizer_config.data
  encoding.encode(paths['tokenizer'], paths['latents'], data, batch=64)
  seconds['latents'] = round(time.perf_counter() - started)

  started = time.perf_counter()
  _stage(3, 'dit', paths['dit'])
  outcome = _train(dit_config, paths['dit'])
  seconds['dit'] = round(time.perf_counter() - started) if outcome == 'trained' else None

  if _LONG.value:
    started = time.perf_counter()
    _stage(4, 'long', paths['long'])
    long = long_demo.measure(paths['dit'], paths['long'], _FRAMES.value, _PER_CLASS.value)
    seconds['long'] = round(time.perf_counter() - started)
    summary = long_report(workdir, long, seconds)
  else:
    summary = report(workdir, seconds)
  print(json.dumps(summary), flush=True)
  print(f'report: {os.path.join(workdir, "report.md")}', flush=True)


def _load(module, argument: str, flag: str):
  try:
    return module.get_config(argument)
  except ValueError as e:
    common.fail(f'bad flag --{flag}={argument}: {e}')


def _stage(number: int, name: str, path: str) -> None:
  total = len(LONG_STAGES if _LONG.value else STAGES)
  print(f'--- stage {number}/{total}: {name} -> {path}', flush=True)


def long_report(workdir: str, long: dict, seconds: dict) -> dict:
  """WORKDIR/report.md and a summary line in WORKDIR/metrics.jsonl for the long-video demo."""
  tokenizer_eval = _read_metrics(os.path.join(workdir, 'tokenizer'))[-1]
  accuracy = [m for m in _read_metrics(os.path.join(workdir, 'dit')) if 'accuracy_guided' in m]
  summary = {'stage': 'long_demo', **long, 'tokenizer_psnr': tokenizer_eval['psnr']}
  summary['seconds'] = seconds
  if accuracy:
    summary['accuracy_guided'] = accuracy[-1]['accuracy_guided']
    summary['accuracy_unguided'] = accuracy[-1]['accuracy_unguided']
  run_dir.append_metrics(workdir, summary)
  text = long_demo.report_text(long, tokenizer_eval, accuracy[-1] if accuracy else None, seconds)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
      f.write(text)
  return summary


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  common.run(main)
