"""Bad configuration fails at start-up with one line naming the field: unknown fields, wrong types,
values out of range, unknown choices, and combinations that cannot work."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import vitok as vitok_config
from launch import common
from vitok.core import config_checks, trainer
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer import stage1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _out_of_range(accepted):
  """A value of the field's type that `accepted` rejects."""
  if isinstance(accepted, config_checks.OneOf):
    return 99 if isinstance(accepted.choices[0], int) else 'nope'
  if accepted.low is not None:
    return accepted.low if accepted.low_open else accepted.low - 1
  if accepted.high is not None:
    return accepted.high + 1
  return float('nan')  # any finite number is accepted


FIELDS = {**config_checks.TRAINING_FIELDS, **stage1.LOSS_FIELDS, **tokenizer.MODEL_FIELDS}


@pytest.mark.parametrize('preset', ['demo', 'ucf101', 'imagenet', ''])
def test_presets_pass_the_checks(preset):
  common.make_task(vitok_config.get_config(preset))


@pytest.mark.parametrize('field', sorted(FIELDS))
def test_every_field_with_a_range_rejects_a_value_outside_it(field):
  config = vitok_config.get_config('demo')
  *parents, leaf = field.split('.')
  node = config
  for name in parents:
    node = node[name]
  bad = _out_of_range(FIELDS[field])
  node[leaf] = type(node[leaf])(bad) if not isinstance(bad, str) else bad
  with pytest.raises(ValueError, match=rf'config\.{field}=.* it must be '):
    common.make_task(config)


def test_float_fields_reject_nan_and_infinity():
  for value in (float('nan'), float('inf')):
    config = vitok_config.get_config('demo')
    config.optim.weight_decay = value
    with pytest.raises(config_checks.ConfigError, match='optim.weight_decay'):
      common.make_task(config)


@pytest.mark.parametrize(
    'update, message',
    [
        ({'loss.lpips_frames': 9}, r'loss.lpips_frames=9 is more than the data.frames=8'),
        ({'model.logvar_min': 30.0}, r'model.logvar_min=30.0 must be below model.logvar_max'),
        (
            {'model.rope_theta': 0.0},
            r'model.rope_theta=0.0 is not accepted: it must be a number > 0',
        ),
        (
            {'keep_best': 1, 'best_metric': 'psnrr'},
            r"best_metric='psnrr' is not a metric of the vitok "
            r'evaluation \(psnr, ssim, lpips, lpips_alex, baseline_psnr, baseline_ssim\)',
        ),
    ],
)
def test_combinations_that_cannot_work(update, message):
  config = vitok_config.get_config('demo')
  for field, value in update.items():
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):  # what launch.train checks before any work
    trainer.check_best_metric(config, common.make_task(config))


def test_unknown_field_names_the_known_fields_of_its_group():
  config = vitok_config.get_config('demo')
  with config.unlocked():
    config.optim.learning_rate = 1.0
  with pytest.raises(
      config_checks.ConfigError,
      match=r'unknown config field config.optim.learning_rate; known fields of '
      r'config.optim: b1, b2, clip_norm, ema_decay, end_lr_fraction, lr,',
  ):
    common.make_task(config)


def test_shortcut_with_a_wrong_type_names_the_shortcut_and_field():
  with pytest.raises(
      ValueError, match=r"shortcut steps=abc: total_steps takes int values, got 'abc'"
  ):
    vitok_config.get_config('demo,steps=abc')
  with pytest.raises(ValueError, match=r'shortcut mesh=2xa: mesh.shape takes sizes such as 2x4'):
    vitok_config.get_config('mesh=2xa')


@pytest.mark.slow
@pytest.mark.parametrize(
    'args, line',
    [
        (
            ['--config.optim.learning_rate=1'],
            'bad flag --config.optim.learning_rate=1: unknown config field config.optim.learning_rate; '
            'known fields of config.optim: b1, b2, clip_norm, ema_decay, end_lr_fraction, lr, '
            'warmup_steps, weight_decay',
        ),
        (
            ['--config.data.batch_size=abc'],
            "bad flag --config.data.batch_size=abc: config.data.batch_size takes int values, got 'abc'",
        ),
        (
            ['--config.partitionable_rng=maybe'],
            'bad flag --config.partitionable_rng=maybe: config.partitionable_rng takes bool values, got '
            "'maybe'",
        ),
        (
            ['--workdir=/dev/null/run'],
            'bad flag --workdir=/dev/null/run: /dev/null is a file, not a directory',
        ),
        (
            ['--config.ckpt_every=0'],
            'bad config: config.ckpt_every=0 is not accepted: it must be a number >= 1',
        ),
        (
            ['--config.optim.lr=-1'],
            "bad config: config.optim.lr=-1.0 is not accepted: it must be a number >= 0 (0 = the paper's "
            'rule 1e-4 x batch / 256)',
        ),
        (
            ['--config=configs/vitok.py:demo,lrr=3'],
            "bad flag --config=configs/vitok.py:demo,lrr=3: unknown config shortcut 'lrr' in "
            'configs/vitok.py:demo,lrr=3; known: variant, channels, res, frames, batch, steps, lr, data, '
            'manual_dir, mesh, context (or use --config.<field>=value)',
        ),
        (
            ['--config=configs/nothere.py'],
            'bad flag --config=configs/nothere.py: [Errno 2] No such file or directory: '
            "'configs/nothere.py'",
        ),
        (
            ['--config.data.name=video_folder', '--config.data.manual_dir=/nonexistent'],
            "bad data: data.name='video_folder' reads its source files from data.manual_dir, but "
            "data.manual_dir='/nonexistent' is not an existing folder.",
        ),
    ],
)
def test_command_line_mistakes_are_one_line_and_touch_nothing(tmp_path, args, line):
  workdir = tmp_path / 'run'
  if not any(a.startswith('--config=') for a in args):
    args = ['--config=configs/vitok.py:demo'] + args
  if not any(a.startswith('--workdir=') for a in args):
    args = [f'--workdir={workdir}'] + args
  out = subprocess.run(
      [sys.executable, '-m', 'launch.train', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
  )
  assert out.returncode == common.USAGE_EXIT_CODE, out.stderr[-2000:]
  assert out.stderr.splitlines() == [line]
  assert not workdir.exists()


@pytest.mark.slow
def test_eval_on_a_run_whose_config_json_is_unreadable_is_one_line(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": ')
  out = subprocess.run(
      [sys.executable, '-m', 'launch.eval', f'--workdir={tmp_path}'],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
  )
  assert out.returncode == common.USAGE_EXIT_CODE
  assert out.stderr.splitlines() == [
      f"cannot read the run's config {tmp_path}/config.json: JSONDecodeError: Expecting value: "
      'line 1 column 11 (char 10); pass --config'
  ]


def test_a_saved_config_gets_the_fields_it_lacks_with_their_defaults():
  defaults = vitok_config.get_config('')
  saved = vitok_config.get_config('demo')
  del saved['num_eval_videos'], saved.model['scan']
  saved.model.channels = 7
  assert config_checks.add_missing_defaults(saved, defaults) == [
      'config.model.scan',
      'config.num_eval_videos',
  ]
  assert saved.num_eval_videos == defaults.num_eval_videos
  assert saved.model.scan == defaults.model.scan
  assert saved.model.channels == 7  # what the run saved is kept
  assert config_checks.add_missing_defaults(saved, defaults) == []


@pytest.mark.parametrize(
    'family, old, new',
    [
        (
            'vitok',
            {'eval_every': 350, 'fvd_every': 0, 'fid_every': 100},
            {'reconstruction': 350, 'rfvd': -1, 'rfid': 100},
        ),
        (
            'dit',
            {'eval_every': 50, 'sample.every': 0, 'accuracy.every': 7, 'generation.every': 0},
            {'loss': 50, 'samples': 0, 'class_accuracy': 7, 'generation': -1},
        ),
    ],
)
def test_an_older_run_s_cadences_are_read_into_config_evals(family, old, new, capsys):
  """Before config.evals: eval_every, fvd_every, ... where 0 meant 'at the end' for some and 'only
  in launch.eval' for others (-1 now)."""
  from configs import dit as dit_config
  from launch import tasks

  module = {'vitok': vitok_config, 'dit': dit_config}[family]
  saved = json.loads(module.get_config('demo').to_json())
  del saved['evals']
  for dotted, value in old.items():
    *parents, leaf = dotted.split('.')
    node = saved
    for name in parents:
      node = node[name]
    node[leaf] = value
  config = ml_collections.ConfigDict(saved)
  tasks.read_old_cadences(config, module.base_config())
  assert {name: config.evals[name].every for name in new} == new
  assert 'eval_every' not in config and 'every' not in config.get('sample', {})
  note = capsys.readouterr().out.strip().splitlines()
  assert len(note) == 1 and note[0].startswith('a config from before config.evals: read ')
