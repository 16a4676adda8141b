"""Sweeps: member lists (grid / list / zip) and their names, the runner's resume and failure rules,
the emitted cluster scripts, the results table, the log2-E fit and the plots; end to end, a sweep
of two tiny runs through `python -m launch.sweep`."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY

from launch import sweep as sweep_cli
from launch import sweep_emit
from vitok.sweeps import report as sweep_report
from vitok.sweeps import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep_config(members, base=f'configs/vitok.py:{TINY}', dit=''):
  import ml_collections

  c = ml_collections.ConfigDict()
  c.base, c.members, c.dit = base, members, dit
  return c


# --- member lists and names ---


def test_grid_zip_list_and_chain_expand_to_the_expected_members():
  grid = sweep.product(sweep.sweep('a', [1, 2]), sweep.sweep('b', ['x', 'y']))
  assert grid == [{'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
  assert sweep.zipped(sweep.sweep('a', [1, 2]), sweep.sweep('b', [3, 4])) == [
      {'a': 1, 'b': 3},
      {'a': 2, 'b': 4},
  ]
  plain = [{'c': 5}]
  assert sweep.chain(grid[:1], plain) == [{'a': 1, 'b': 'x'}, {'c': 5}]
  with pytest.raises(ValueError, match='equal length'):
    sweep.zipped(sweep.sweep('a', [1, 2]), sweep.sweep('b', [3]))
  with pytest.raises(ValueError, match=r"set the same field twice: \['a'\]"):
    sweep.product(sweep.sweep('a', [1]), sweep.sweep('a', [2]))


def test_names_show_the_fields_that_vary_readably_and_uniquely():
  members = [
      {'model.variant': 'cpu128-cpu128/4x8', 'model.channels': 4, 'total_steps': 600},
      {'model.variant': 'cpu128-cpu256/4x8', 'model.channels': 4, 'total_steps': 600},
      {'model.variant': 'cpu128-cpu128/4x8', 'model.channels': 16, 'total_steps': 600},
  ]
  assert sweep.member_names(members) == [
      'variant-cpu128-cpu128-4x8_channels-4',
      'variant-cpu128-cpu256-4x8_channels-4',
      'variant-cpu128-cpu128-4x8_channels-16',
  ]
  # Two varying fields with the same leaf keep their full paths.
  same_leaf = [
      {'model.channels': 4, 'tokenizer.channels': 4},
      {'model.channels': 8, 'tokenizer.channels': 16},
  ]
  assert sweep.member_names(same_leaf) == [
      'model-channels-4_tokenizer-channels-4',
      'model-channels-8_tokenizer-channels-16',
  ]
  assert sweep.member_names([{'a': 1}]) == ['base']
  with pytest.raises(ValueError, match='identical members: a-1'):
    sweep.member_names([{'a': 1}, {'a': 1}, {'a': 2}])


def test_member_configs_apply_the_fields_and_name_a_bad_one():
  config = _sweep_config([{'model.channels': 8, 'data.res': 64}])
  (member,) = sweep.members(config)
  built = sweep.member_config(config, member)
  assert (
      built.model.channels == 8
      and built.data.res == 64
      and built.model.variant == 'cpu128-cpu128/2x8'
  )
  bad = sweep.Member('m', {'model.chanels': 8})
  with pytest.raises(ValueError, match=r'member m: unknown config field config.model.chanels'):
    sweep.member_config(config, bad)
  with pytest.raises(ValueError, match=r"member m: config.model.channels='eight'"):
    sweep.member_config(config, sweep.Member('m', {'model.channels': 'eight'}))


def test_steps_are_the_launch_commands_with_a_dit_chained():
  config = _sweep_config([{'model.channels': 8, 'dit.sample.guidance': 2.0}], dit='digits,steps=20')
  (member,) = sweep.members(config)
  steps = sweep.steps(config, member, '/runs')
  assert [s.name for s in steps] == ['train', 'eval', 'encode', 'dit', 'dit_eval']
  assert steps[0].args == (
      '-m', 'launch.train', f'--config=configs/vitok.py:{TINY}', '--config.model.channels=8',
      '--workdir=/runs/base/tokenizer',
  )  # fmt: skip
  assert steps[2].args[-2:] == ('--tokenizer=/runs/base/tokenizer', '--out=/runs/base/latents')
  assert '--config.latents.dir=/runs/base/latents' in steps[3].args
  assert '--config.sample.guidance=2.0' in steps[3].args  # a 'dit.' field goes to the DiT
  assert sweep.member_dit_config(config, member).sample.guidance == 2.0
  assert sweep.member_config(config, member).model.channels == 8


# --- emitted scripts ---


@pytest.mark.parametrize('kind', sweep_emit.FORMATS)
def test_emitted_scripts_pass_bash_n_and_hold_one_command_per_run(kind, tmp_path):
  members = sweep.product(
      sweep.sweep('model.channels', [4, 8]),
      sweep.sweep('model.variant', ['cpu128-cpu128/2x8', 'cpu128-cpu256/2x8']),
  )
  config = _sweep_config(members)
  path = sweep_emit.write(
      kind, config, sweep.members(config), str(tmp_path / 'my sweep'), 'x.py:demo'
  )
  assert subprocess.run(['bash', '-n', path], capture_output=True).returncode == 0
  text = open(path).read()
  if kind == 'commands':
    lines = [line for line in text.splitlines() if line and not line.startswith('#')]
    assert len(lines) == 4
    for line, member in zip(lines, sweep.members(config)):
      train, evaluate = (shlex.split(part) for part in line.split(' && '))
      assert train[:3] == ['python', '-m', 'launch.train']
      assert f'--workdir={tmp_path}/my sweep/{member.name}/tokenizer' in train
      assert f'--config.model.channels={member.fields["model.channels"]}' in train
      assert evaluate == [
          'python',
          '-m',
          'launch.eval',
          f'--workdir={tmp_path}/my sweep/{member.name}/tokenizer',
      ]
  elif kind == 'slurm':
    assert '#SBATCH --array=0-3' in text
    # The array's commands, read back by bash itself.
    script = text.split('RUNS=(')[1].split('\n)\n')[0]
    out = subprocess.run(
        ['bash', '-c', f'RUNS=({script}\n); printf "%s\\n" "${{RUNS[@]}}"'],
        capture_output=True,
        text=True,
    )
    runs = out.stdout.splitlines()
    assert len(runs) == 4 and all(
        r.startswith('srun --kill-on-bad-exit=1 python -m launch.train') for r in runs
    )
  else:
    calls = [line for line in text.splitlines() if line.startswith('gcloud')]
    assert len(calls) == 4 and all('--worker=all' in c for c in calls)
    # What the remote shell receives, with REPO_DIR filled in by this one.
    remote = subprocess.run(
        ['bash', '-c', f'REPO_DIR=/r; printf "%s" {calls[0].split("--command=", 1)[1]}'],
        capture_output=True,
        text=True,
    ).stdout
    assert remote.startswith('set -e; cd /r && python -m launch.train ')


# --- the runner ---


def _fake_steps(script_by_step):
  """sweep.steps stand-in: each step a python one-liner (exit code and a marker file)."""

  def steps(sweep_config, member, directory):
    return [
        sweep.Step(name, ('-c', code.format(dir=os.path.join(directory, member.name))))
        for name, code in script_by_step(member).items()
    ]

  return steps


def test_the_runner_skips_finished_steps_records_failures_and_stops_on_a_saved_signal(
    tmp_path, monkeypatch
):
  marker = "open(r'{dir}/ran_%s', 'a').write('x')"
  behaviour = {'a': 0, 'b': 1, 'c': 130}  # member -> exit code of its train step

  def script(member):
    code = behaviour[member.fields['k']]
    return {
        'train': marker % 'train'
        + f"; print('line one'); print('the last line'); raise SystemExit({code})",
        'eval': marker % 'eval',
    }

  monkeypatch.setattr(sweep, 'steps', _fake_steps(script))
  config = _sweep_config(sweep.sweep('k', ['a', 'b', 'c']))
  a, b, c = sweep.members(config)
  stop = sweep_cli.Stop()
  try:
    assert sweep_cli.run_member(config, a, str(tmp_path), stop) == 'done'
    assert sweep_cli.run_member(config, b, str(tmp_path), stop) == 'failed'
    assert sweep_cli.run_member(config, c, str(tmp_path), stop) == 'stopped'
  finally:
    stop.close()
  status = lambda m: json.load(open(tmp_path / m.name / 'status.json'))
  assert status(a)['state'] == 'done' and status(a)['steps_done'] == ['train', 'eval']
  assert status(b)['state'] == 'failed'
  assert status(b)['error'] == 'train exited with 1: line one | the last line'
  assert not (tmp_path / b.name / 'ran_eval').exists()  # a failed step ends the member
  assert status(c)['state'] == 'stopped' and status(c)['steps_done'] == []
  # Rerun: the stopped member resumes at its unfinished step; finished steps are not rerun.
  behaviour['c'] = 0
  assert sweep_cli.run_member(config, c, str(tmp_path), stop) == 'done'
  assert open(tmp_path / c.name / 'ran_train').read() == 'xx'
  assert open(tmp_path / c.name / 'ran_eval').read() == 'x'
  assert sweep_cli.run_member(config, a, str(tmp_path), stop) == 'done'
  assert open(tmp_path / a.name / 'ran_train').read() == 'x'  # nothing ran again


def test_a_signal_to_the_sweep_reaches_the_running_command_once(tmp_path):
  stop = sweep_cli.Stop()
  try:
    child = subprocess.Popen(
        [sys.executable, '-c', 'import signal, sys, time\n'
         'signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\nprint("ready", flush=True)\ntime.sleep(60)'],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert child.stdout.readline().strip() == 'ready'
    stop.child = child
    os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C to the sweep
    assert child.wait(timeout=30) == 130 and stop.received == signal.SIGINT
  finally:
    stop.close()


# --- results ---


def test_the_fit_equals_numpy_on_known_points():
  e = np.array([128, 256, 512, 1024, 2048])
  a, b, r2 = sweep_report.fit(e, 3.0 + 2.0 * np.log2(e))
  assert (a, b) == pytest.approx((3.0, 2.0), abs=1e-9) and r2 == pytest.approx(1.0, abs=1e-12)
  y = np.array([20.1, 21.5, 21.2, 23.0, 23.4])
  a, b, r2 = sweep_report.fit(e, y)
  slope, intercept = np.polyfit(np.log2(e), y, 1)
  assert (a, b) == pytest.approx((intercept, slope), rel=1e-9)
  assert r2 == pytest.approx(np.corrcoef(np.log2(e), y)[0, 1] ** 2, rel=1e-9)


def _fake_run(directory, member, config, psnr, baseline, steps=10, evaluated=True):
  """A finished (or unfinished) tokenizer run's files, as launch.train and launch.eval write them."""
  workdir = os.path.join(directory, member.name, 'tokenizer')
  os.makedirs(workdir)
  config.total_steps = steps
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': steps // 2, 'psnr': 1.0}) + '\n')
    if evaluated:
      record = dict(step=steps, clips=3, psnr=psnr, ssim=0.5, lpips=0.3, baseline_psnr=baseline,
                    baseline_ssim=0.4, baseline_floats=96)  # fmt: skip
      f.write(json.dumps(record) + '\n')


def test_collect_aggregates_partial_results_into_table_and_plots(tmp_path):
  variants = ['cpu128-cpu128/2x8', 'cpu128-cpu128/4x8']
  members = sweep.chain(
      sweep.product(sweep.sweep('model.variant', variants), sweep.sweep('model.channels', [2, 4, 8])),
      [{'model.variant': 'cpu256-cpu128/2x8', 'model.channels': 4},
       {'model.variant': 'cpu128-cpu256/2x8', 'model.channels': 4},
       {'model.variant': 'cpu128-cpu128/4x8', 'model.channels': 16}],
  )  # fmt: skip
  config = _sweep_config(members)
  runs = sweep.members(config)
  directory = str(tmp_path)
  failed, unevaluated, pending = runs[3], runs[2], runs[8]
  for i, member in enumerate(runs):
    if member not in (failed, pending):
      built = sweep.member_config(config, member)
      _fake_run(directory, member, built, 20.0 + i, 19.0, evaluated=member != unevaluated)
  os.makedirs(tmp_path / failed.name)
  (tmp_path / failed.name / 'status.json').write_text(
      json.dumps({'state': 'failed', 'error': 'train exited with 2: bad data'})
  )
  rows = {r['name']: r for r in sweep_report.collect(config, runs, directory, sweep_cli.describe)}
  assert rows[unevaluated.name]['state'] == 'running'  # trained, not evaluated at its last step
  (tmp_path / unevaluated.name / 'status.json').write_text(json.dumps({'state': 'done'}))
  rows = {r['name']: r for r in sweep_report.collect(config, runs, directory, sweep_cli.describe)}
  assert rows[unevaluated.name]['state'] == 'no evaluation at step 10'
  first = rows[runs[0].name]
  assert first['state'] == 'done' and first['E'] == 32 * 2  # 2x8 tubelets of 4x32x32: 32 tokens
  assert first['psnr_margin'] == pytest.approx(20.0 - 19.0)
  assert first['ssim_margin'] == pytest.approx(0.5 - 0.4)
  assert first['tubelet'] == '2x8' and first['encoder'] == 'cpu128' and first['decoder'] == 'cpu128'
  assert first['steps'] == 10 and first['params_total_M'] > 0 and first['gmacs_per_clip'] > 0
  assert rows[runs[6].name]['params_encoder_M'] > first['params_encoder_M']
  assert rows[runs[6].name]['params_decoder_M'] == first['params_decoder_M']
  assert rows[failed.name]['state'] == 'failed'
  assert rows[failed.name]['error'] == 'train exited with 2: bad data'
  assert rows[pending.name]['state'] == 'pending'

  written = sweep_report.write(config, runs, directory, sweep_cli.describe)
  csv_rows = open(written['csv']).read().splitlines()
  assert len(csv_rows) == 1 + len(runs)
  table = open(written['md']).read()
  done = [r for r in rows.values() if r['state'] == 'done']
  assert len(done) == 6
  for name, row in rows.items():
    assert (f'\n| {name} |' in table) == (row['state'] == 'done'), name
  assert f'- {pending.name}: pending' in table
  assert f'- {failed.name}: failed (train exited with 2: bad data)' in table
  a, b, r2, n = sweep_report.fits(list(rows.values()))['psnr']
  expected = sweep_report.fit([r['E'] for r in done], [r['psnr'] for r in done])
  assert (a, b, r2) == pytest.approx(expected) and n == len(done)
  assert f'| psnr | {a:.4g} + {b:.4g} log2 E | {b:.4g} | {r2:.3f} | 6 |' in table
  for key in ('psnr_vs_E', 'ssim_vs_E', 'lpips_vs_E', 'encoder_size', 'decoder_size'):
    with open(written[key], 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', key


# --- end to end ---


@pytest.mark.slow
def test_a_sweep_runs_its_members_goes_on_after_a_failure_and_a_rerun_skips_them(
    tiny_config, tmp_path
):
  c = tiny_config
  fields = {
      'data.name': 'video_folder', 'data.manual_dir': c.data.manual_dir, 'data.data_dir': c.data.data_dir,
      'data.holdout_fraction': c.data.holdout_fraction, 'data.clip_frames': c.data.clip_frames,
      'data.store_short_side': c.data.store_short_side, 'data.eval_batch_size': c.data.eval_batch_size,
      'loss.lpips_frames': 1, 'optim.warmup_steps': 1, 'total_steps': 2, 'evals.reconstruction.every': 2, 'ckpt_every': 2,
  }  # fmt: skip
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(textwrap.dedent(f"""
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.base = 'configs/vitok.py:{TINY}'
        c.dit = ''
        fields = {fields!r}
        c.members = [dict(fields, **{{'model.channels': 4}}),
                     dict(fields, **{{'model.channels': 8, 'data.manual_dir': '{tmp_path}/no_videos'}})]
        return c
  """))  # fmt: skip
  directory = tmp_path / 'sweep'
  env = dict(
      os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', VITOK_FID_WEIGHTS=str(tmp_path / 'none.npz')
  )
  args = [sys.executable, '-m', 'launch.sweep', f'--config={sweep_file}', f'--workdir={directory}']
  first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
  good, bad = sweep.member_names(
      [dict(fields, **{'model.channels': 4}),
       dict(fields, **{'model.channels': 8, 'data.manual_dir': f'{tmp_path}/no_videos'})]
  )  # fmt: skip
  assert '1 of 2 runs done' in first.stdout
  assert first.stderr.strip().splitlines()[-1] == f'failed: {bad} (see their status.json and logs)'
  status = json.load(open(directory / bad / 'status.json'))
  assert status['state'] == 'failed' and 'no_videos' in status['error']
  evaluation = json.loads(
      open(directory / good / 'tokenizer' / 'metrics.jsonl').read().splitlines()[-1]
  )
  assert evaluation['step'] == 2 and 'rfid_unavailable' in evaluation  # launch.eval's record
  table = open(directory / 'results.md').read()
  assert f'| {good} |' in table and f'- {bad}: failed (train exited with 2' in table
  assert (directory / 'plots' / 'psnr_vs_E.png').exists()

  second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 1
  assert f'[1/2] {good}: done earlier' in second.stdout and f'[2/2] {bad}\n' in second.stdout
  assert json.load(open(directory / good / 'status.json'))['steps_done'] == ['train', 'eval']
