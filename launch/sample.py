r"""Generate clips with a trained DiT and decode them with its tokenizer.

    python -m launch.sample --workdir=/tmp/dit --classes=0,3,7 --per_class=4 --guidance=2.0 \
        --steps=50 --seed=0 --out=/tmp/dit-samples

Restores the DiT of --workdir (the EMA unless --raw; the newest checkpoint that restores unless
--step) and the tokenizer its run names (config.json: `tokenizer.dir`, else the one its latent
cache was encoded with), on this job's devices whatever mesh trained it, and writes into --out one
mp4 per clip, a PNG grid with a row per class, and samples.json (the classes, the settings, the
step). The latent statistics come from the run's config.json: the cache is not needed.
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags

from dit import evaluation as dit_evaluation
from launch import common

_OUT = flags.DEFINE_string('out', None, 'Directory to write the samples to.')
_CLASSES = flags.DEFINE_string('classes', '', 'Class ids, e.g. 0,3,7 (default: every class).')
_PER_CLASS = flags.DEFINE_integer('per_class', None, "Clips per class (default: the config's).")
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Classifier-free guidance scale (1 = none).')
_STEPS = flags.DEFINE_integer('steps', None, "Sampler steps (default: the config's).")
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed: the same seed gives the same clips.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest that restores).')
_RAW = flags.DEFINE_bool('raw', False, 'Sample with the raw parameters instead of the EMA.')


def _adjust(config) -> None:
  if config.get('task') != 'dit':
    common.fail(
        f'--workdir={common.workdir()} is a {config.get("task", "vitok")} run, not a DiT run'
    )
  if _CLASSES.value:
    config.sample.classes = _CLASSES.value
  for field, flag in (('per_class', _PER_CLASS), ('guidance', _GUIDANCE), ('steps', _STEPS)):
    if flag.value is not None:
      config.sample[field] = type(config.sample[field])(flag.value)


def main(argv):
  del argv
  common.quiet_library_logs()
  out = common.directory_flag('out')
  run = common.open_trained_run(_STEP.value, _RAW.value, adjust=_adjust)
  task = run.task
  mesh = run.layout.mesh
  frozen = task.frozen(mesh)
  classes = list(task.sample_classes)
  labels = np.repeat(np.asarray(classes, np.int32), task.config.sample.per_class)
  started = time.perf_counter()
  videos = task.generate(run.layout.graphdef, run.params, frozen, labels, mesh, seed=_SEED.value)
  seconds = time.perf_counter() - started
  if jax.process_index() == 0:
    dit_evaluation.write_sample_grid(videos, labels, out, 'samples')
    s = task.config.sample
    summary = {
        'step': run.step,
        'ema': run.ema,
        'classes': classes,
        'per_class': s.per_class,
        'guidance': s.guidance,
        'sampler': s.sampler,
        'steps': s.steps,
        'seed': _SEED.value,
        'clips': int(len(labels)),
        'seconds_with_compile': round(seconds, 2),
    }
    with open(os.path.join(out, 'samples.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  flags.mark_flag_as_required('out')
  common.run(main)
