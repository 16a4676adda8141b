"""launch.plan reproduces the paper's sizes and costs; the command line reports bad configs."""

import json
import os
import subprocess
import sys

import pytest

from configs import vitok as vitok_config
from launch import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    'arg, params_m, gmacs',
    [
        ('variant=S-B/16,frames=1,res=256', 129.0, 34.8),  # 256 tokens
        ('variant=S-L/16,frames=1,res=256', 426.8, 113.4),
        ('variant=S-B/16,frames=1,res=512', 129.0, 160.8),  # 1024 tokens
        ('variant=S-B/4x8,frames=16,res=128', 129.0, 160.8),  # 1024 tokens of video
    ],
)
def test_plan_reproduces_the_paper(arg, params_m, gmacs):
  out = plan.plan(vitok_config.get_config(arg))
  assert out['params_total_M'] == pytest.approx(params_m, rel=0.01)
  assert out['gmacs_per_clip'] == pytest.approx(gmacs, rel=0.05)


def test_plan_latent_accounting():
  out = plan.plan(vitok_config.get_config('variant=S-B/4x8,frames=16,res=128,channels=8'))
  assert out['tokens_per_clip'] == 4 * 16 * 16
  assert out['E'] == 1024 * 8
  assert out['pixels_per_latent_float'] == pytest.approx(16 * 128 * 128 * 3 / (1024 * 8))
  assert out['latent'] == [4, 16, 16, 8]
  assert out['params_encoder_M'] == pytest.approx(43.3, rel=0.01)
  assert out['params_decoder_M'] == pytest.approx(85.8, rel=0.01)


def _run(*args):
  return subprocess.run(
      [sys.executable, '-m', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS=''),
  )


@pytest.mark.slow
def test_plan_command_prints_json_and_rejects_bad_configs():
  out = _run(
      'launch.plan',
      '--config=configs/vitok.py:variant=S-L/4x8,res=128,frames=16',
      '--config.model.channels=8',
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert result['params_total_M'] == pytest.approx(426.8, rel=0.01) and result['E'] == 8192
  bad = _run('launch.plan', '--config=configs/vitok.py:demo', '--config.data.res=60')
  assert bad.returncode != 0 and 'data.res=60' in bad.stderr
  bad = _run('launch.plan', '--config=configs/vitok.py:demo', '--config.optim.lrr=3')
  assert bad.returncode != 0 and 'lrr' in bad.stderr
  bad = _run('launch.plan', '--config=configs/vitok.py:variant=S-Z/4x8')
  assert bad.returncode != 0 and 'model.variant' in bad.stderr


@pytest.mark.slow
def test_plan_compiles_for_a_mesh_of_simulated_devices():
  out = _run('launch.plan', '--config=configs/vitok.py:demo,batch=16,context=2', '--mesh=4x2x2')
  assert out.returncode == 0, out.stderr[-2000:]
  compiled = json.loads(out.stdout)['compiled']
  assert compiled['devices'] == 16 and compiled['mesh'] == {'data': 4, 'fsdp': 2, 'context': 2}
  # Each clip's tokens over 'context': all-to-alls over that axis (two per attention layer
  # forward, q/k/v in and the output back, and two backward, in the 4 + 4 blocks of
  # cpu128-cpu256, unless XLA combines some), at least one per layer.
  by_kind = {(c['kind'], c['axes']): c for c in compiled['collectives']}
  assert by_kind[('all-to-all', 'context')]['instructions'] >= 8
  # fsdp x context = 4: each device holds about a quarter of the 4.25M float32 parameters, and
  # Adam's two moments twice that.
  params_gib = 4.25e6 * 4 / 2**30
  assert params_gib / 4 <= compiled['params_GiB_per_device'] < 1.2 * params_gib / 4
  assert compiled['optimizer_GiB_per_device'] == pytest.approx(
      2 * compiled['params_GiB_per_device'], rel=0.01
  )
  assert compiled['temp_GiB_per_device'] > 0
  assert compiled['xla_TFLOP_per_step_per_device'] >= compiled['model_TFLOP_per_step_per_device']


@pytest.mark.slow
def test_a_mesh_that_does_not_fit_the_devices_fails_at_start_up_naming_both_numbers(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'launch.train',
          '--config=configs/vitok.py:demo',
          '--config.mesh.shape=(3,3)',
          f'--workdir={tmp_path}',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
  )
  assert out.returncode != 0
  assert 'config.mesh.shape=(3, 3) needs 9 devices but 8 are available' in out.stderr


def test_bench_reports_step_time_throughput_and_mfu():
  from launch import bench
  from vitok.core import sharding

  config = vitok_config.get_config('variant=cpu128-cpu128/2x8,channels=4,frames=4,res=32,batch=8')
  config.loss.lpips = 0.0
  config.mesh.shape = (2, 4)
  row = bench.bench(config, sharding.make_mesh(config.mesh), steps=3, warmup=1, profile_steps=1)
  assert len(row['step_times_s']) == 3 and row['step_time_s'] > 0 and row['compile_s'] > 0
  # The median of the 3 timed steps, which are listed rounded to 0.1 ms.
  step = row['step_time_s']
  assert round(step, 4) == sorted(row['step_times_s'])[1]
  # By hand: 32 tokens per clip (4/2 x 32/8 x 32/8 tubelets); two stacks (encoder, decoder) of 4
  # blocks of width 128, per block and token q/k/v + output projection 4 x 128^2 MACs, the gated
  # MLP (hidden int(2.67 x 128) = 341) 3 x 128 x 341, and the attention products 2 x 32 x 128;
  # the tubelets (2 x 8 x 8 x 3 = 384 values) embedded to 128 and decoded from it, the encoder's
  # 128 -> 2 x 4 (latent mean, log-variance) and the decoder's 4 -> 128.
  stack = 4 * 32 * (4 * 128**2 + 3 * 128 * 341 + 2 * 32 * 128)
  macs = 32 * (384 * 128 + 128 * 8) + stack + 32 * (4 * 128 + 128 * 384) + stack
  assert macs == 55_590_912
  # Forward + backward = 3 forward passes, 2 FLOPs per MAC; 8 clips on 8 devices: 1 per device.
  flops = 6 * macs * 8 / 8
  assert row['model_tflop_per_step_per_device'] == pytest.approx(flops / 1e12, rel=1e-12)
  assert row['clips_per_s_per_device'] == pytest.approx(8 / 8 / step, rel=1e-12)
  assert row['tokens_per_s_per_device'] == pytest.approx(32 * 8 / 8 / step, rel=1e-12)
  assert row['tflops_per_device'] == pytest.approx(flops / step / 1e12, rel=1e-12)
  # MFU against the measured peak of this machine (no closed form): its definition.
  assert row['mfu'] == pytest.approx(flops / step / (row['peak_tflops'] * 1e12), rel=1e-12)
  assert row['peak_source'].startswith('measured matmul') and row['peak_memory_GiB'] > 0
  # The traced step, split by part: the model's attention, matmuls and the AdamW update all ran;
  # LPIPS is off. RoPE's few elementwise ops may be fused by XLA into the attention's layout
  # copies (then their time counts there), so its share may be 0 (tests/test_profile.py checks
  # its classification).
  shares = row['profile']['share']
  assert sum(shares.values()) == pytest.approx(1.0)
  assert all(shares[p] > 0 for p in ('attention', 'matmul', 'optimizer'))
  assert shares['lpips'] == 0


@pytest.mark.parametrize(
    'name,facebook_dit_params', [('dit-s2', 32_865_056), ('dit-b2', 130_315_808)]
)
def test_the_pytorch_comparison_runs_facebookresearch_dits_network(name, facebook_dit_params):
  """launch.compare_pytorch's DiT configs give this project's DiT the parameters of
  facebookresearch/DiT's model (counted there with torch: trainable parameters of
  DiT_models['DiT-S/2'](input_size=32, in_channels=4) and ['DiT-B/2'](input_size=64, ...))."""
  from configs import dit as dit_config
  from dit import model as dit_model
  from dit import task as dit_task
  from launch import compare_pytorch

  arg, fields = compare_pytorch.dit_config_overrides(name, 'float32', 'xla')
  config = dit_config.get_config(arg)
  for key, value in fields.items():
    section, field = key.split('.')
    config[section][field] = value
  task = dit_task.DiTTask(config)
  assert task.model_cfg.variant == compare_pytorch.DIT_CONFIGS[name][0]
  assert dit_model.count_params(task.model_cfg) == facebook_dit_params


def test_compare_pytorch_names_a_missing_dit_clone():
  out = _run('launch.compare_pytorch', '--torch_python=python', '--configs=dit-s2')
  assert out.returncode == 2 and '--dit_repo is required' in out.stderr
  out = _run('launch.compare_pytorch', '--torch_python=python', '--configs=huge')
  assert out.returncode == 2 and "unknown 'huge'" in out.stderr


def test_bench_times_dit_sampling():
  import jax

  from configs import dit as dit_config
  from launch import bench
  from vitok.core import sharding

  config = dit_config.get_config('demo,variant=DiT-cpu64/1,batch=4,guidance=2.0')
  config.model.num_classes = 3
  config.tokenizer.update(variant='cpu128-cpu128/2x8', channels=4)
  config.data.update(frames=4, res=32)
  config.mesh.shape = (1, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  result = bench.bench_sampling(config, mesh, sampler_steps=3, repeats=2)
  assert result['clips'] == 4 and result['sampler'] == 'euler'
  assert result['network_evaluations_per_clip'] == 6  # guided: conditional + unconditional
  assert result['samples_per_s'] == pytest.approx(4 / result['seconds'], rel=1e-2)


def test_bench_length_compares_the_mixers_and_names_the_crossover():
  from tests.conftest import REPO

  done = subprocess.run(
      [sys.executable, '-m', 'launch.bench_length', '--variant=DiT-cpu64/1', '--spatial=4x4',
       '--frames=2,64', '--window=2,2,2', '--ssd_chunk=16', '--time_limit=5', '--steps=1'],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  assert '| mixer | latent frames | tokens |' in done.stdout
  result = json.loads(done.stdout.strip().splitlines()[-1])
  rows = {(r['mixer'], r['frames']): r for r in result['rows']}
  assert set(rows) == {('attention', 2), ('attention', 64), ('mate', 2), ('mate', 64)}
  for r in rows.values():
    assert r['tokens'] == r['frames'] * 16 and r['step_s'] > 0
    assert r['xla_gflop'] == pytest.approx(r['model_gflop'], rel=0.3)  # two independent counts
  # MATE costs more on 32 tokens and less on 1024: the crossover is the longer clip.
  assert rows['mate', 2]['xla_gflop'] > rows['attention', 2]['xla_gflop']
  assert result['mate_cheaper_from_frames'] == 64
  assert result['attention_longest_fitting_frames'] == 64
