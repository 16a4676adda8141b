"""A DiT trained on windows of long latent sequences (configs/dit.py:long_digits at toy scale):
windows at several strides, known-frame masks in the loss, stride conditioning reaching the
model, ExVideo-style post-tuning of the time parameters only, and long generation with exact
frame counts, reproducible by seed."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit as dit_config
from dit import encoding, long_video
from dit import latents as latents_lib
from launch import tasks
from vitok.core import config_checks, sharding, trainer

LENGTH, SPATIAL, CHANNELS, CLASSES = 24, (2, 2), 4, 3


def _write_long_cache(directory, n_train=12, n_test=4):
  """Latent sequences of 24 frames whose content drifts with time at a class-dependent rate."""
  rng = np.random.default_rng(0)
  patterns = rng.standard_normal((CLASSES, *SPATIAL, CHANNELS)).astype(np.float32)
  splits = {}
  for split, n in (('train', n_train), ('test', n_test)):
    records = []
    for i in range(n):
      k = i % CLASSES
      t = np.arange(LENGTH, dtype=np.float32)[:, None, None, None]
      mean = (
          patterns[k] + 0.1 * (k + 1) * t + 0.05 * rng.standard_normal((LENGTH, *SPATIAL, CHANNELS))
      )
      records.append(latents_lib.to_record(mean, np.full(mean.shape, -6.0, np.float32), k))
    latents_lib.write_chunk(os.path.join(directory, split, 'c00000.array_record'), records)
    splits[split] = n
  metadata = latents_lib.Metadata(
      grid=(LENGTH, *SPATIAL),
      channels=CHANNELS,
      num_classes=CLASSES,
      splits=splits,
      channel_mean=(),
      channel_std=(),
      tokenizer='',
      data={},
      clip_latents=2,  # encoded in tokenizer clips of 2 latent frames
  )
  train = latents_lib.LatentSource(directory, 'train', metadata)
  mean, std = latents_lib.channel_statistics((train[i] for i in range(n_train)), CHANNELS)
  latents_lib.write_metadata(
      directory,
      dataclasses.replace(
          metadata, channel_mean=tuple(map(float, mean)), channel_std=tuple(map(float, std))
      ),
  )


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('long_latents'))
  _write_long_cache(directory)
  return directory


def _config(cache_dir, steps=30, window=4, frame_positions=4):
  config = dit_config.get_config(f'long_digits,latents={cache_dir},steps={steps}')
  config.model.update(variant='DiT-cpu64/1', strides='1,3', frame_positions=frame_positions)
  config.latents.window = window
  config.tokenizer.update(variant='cpu128-cpu128/2x8', channels=CHANNELS)
  config.data.update(frames=4, res=16, batch_size=8, eval_batch_size=8)
  config.sample.update(steps=4, per_class=1)
  config.accuracy.classifier = ''
  config.optim.update(lr=3e-3, warmup_steps=5, ema_decay=0.9)
  config.update(log_every=10, ckpt_every=steps)
  config.evals.loss.every = steps
  return config


def test_windows_come_from_the_long_sequences_at_every_stride(cache):
  source = latents_lib.LatentSource(cache, 'train')
  windows = latents_lib.LatentWindows(4, (1, 3))
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(40):
    sequence = source[i % len(source)]
    window = windows.random_map(sequence, rng)
    stride = int(window['stride'])
    seen.add(stride)
    # Find the start: the window is sequence[start::stride][:4] for exactly one start.
    starts = [
        s
        for s in range(LENGTH - 3 * stride)
        if np.array_equal(window['mean'], sequence['mean'][s : s + 3 * stride + 1 : stride])
    ]
    assert len(starts) == 1 and window['label'] == sequence['label']
    np.testing.assert_array_equal(
        window['logvar'], sequence['logvar'][starts[0] : starts[0] + 3 * stride + 1 : stride]
    )
  assert seen == {1, 3}
  first = windows.first(source[0])
  assert int(first['stride']) == 1
  np.testing.assert_array_equal(first['mean'], source[0]['mean'][:4])


@pytest.fixture(scope='module')
def trained(cache, tmp_path_factory):
  config = _config(cache)
  task = tasks.make_task(config)
  assert task.abstract_batch()['stride'].shape == (8,)
  assert task.model_cfg.grid == (4, *SPATIAL) and task.model_cfg.frame_mask
  workdir = str(tmp_path_factory.mktemp('long_dit') / 'run')
  result = trainer.train(config, workdir, task)
  return config, task, workdir, result


def test_a_windowed_dit_with_known_frames_trains_through_the_shared_loop(trained):
  _, _, workdir, result = trained
  assert int(result.state.step) == 30 and np.isfinite(result.last_eval['eval_mse'])
  assert 'step0000030_grid.png' in os.listdir(os.path.join(workdir, 'samples'))


def test_the_stride_and_the_known_frames_reach_the_loss(trained, cache):
  _, task, _, result = trained
  mesh = sharding.make_mesh(task.config.mesh, jax.devices()[:1])
  frozen = {'stats': task.frozen(mesh)['stats']}
  graphdef = trainer.create_layout(task, task.config, mesh).graphdef
  from flax import nnx

  model = nnx.merge(graphdef, jax.device_get(result.state.params))
  source = latents_lib.LatentSource(cache, 'train')
  batch = {
      k: jnp.stack([source[i][k][:4] if k != 'label' else source[i][k] for i in range(8)])
      for k in ('mean', 'logvar', 'label')
  }
  key = jax.random.PRNGKey(0)
  losses = {}
  for stride in (1, 3):
    batch['stride'] = jnp.full((8,), stride, jnp.int32)
    losses[stride] = float(task.loss_fn(model, batch, key, frozen)[0])
  assert losses[1] != losses[3]  # the stride embedding trained away from zero
  # What the loss hands the model: each clip's stride, and the mask of its known frames (here
  # always 'ends'), whose values are the clean latents.
  seen = {}

  def spy(x, t, labels, known=None, stride=None):
    seen.update(x=x, known=known, stride=stride)
    return jnp.zeros_like(x)

  task.known_weights = (0.0, 0.0, 1.0, 0.0)
  batch['stride'] = jnp.array([1, 3] * 4, jnp.int32)
  certain = dict(batch, logvar=jnp.full_like(batch['logvar'], -60.0))  # z = the posterior mean
  task.loss_fn(spy, certain, key, frozen)
  np.testing.assert_array_equal(seen['stride'], batch['stride'])
  np.testing.assert_array_equal(seen['known'], np.tile([1.0, 0.0, 0.0, 1.0], (8, 1)))
  clean = task.normalized_latents(certain, frozen)
  np.testing.assert_allclose(seen['x'][:, [0, 3]], clean[:, [0, 3]], atol=1e-5)
  assert not np.allclose(seen['x'][:, 1], clean[:, 1])  # the others are noised


def test_post_tuning_trains_only_the_time_parameters_and_extends_the_frame_table(
    trained, cache, tmp_path
):
  _, _, first_dir, first = trained
  config = _config(cache, steps=6, window=8, frame_positions=8)
  config.finetune.update(start=first_dir, trainable='time')
  task = tasks.make_task(config)
  workdir = str(tmp_path / 'posttune')
  result = trainer.train(config, workdir, task)
  report = task.trainable_report
  width = 64  # DiT-cpu64
  assert report['trainable_params'] == 2 * width + 8 * width  # 2 strides, 8 frames
  assert report['trainable_parts'] == {'stride_embed': 2 * width, 'frame_embed': 8 * width}
  start = jax.device_get(first.state.ema_params)
  end = jax.device_get(result.state.params)
  flat_start = dict(jax.tree_util.tree_flatten_with_path(start)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(end)[0]:
    names = ''.join(map(str, path))
    if 'stride_embed' in names or 'frame_embed' in names:
      continue
    np.testing.assert_array_equal(value, flat_start[path], err_msg=names)  # frozen bit for bit
  old_table = start['frame_embed']['embedding'][...]
  new_table = end['frame_embed']['embedding'][...]
  assert new_table.shape == (8, width) and not np.allclose(new_table[:4], old_table)
  # Before training, the longer table was the old one repeated cyclically (ExVideo).
  fresh = trainer.create_layout(task, config).init().params
  warm = jax.device_get(task.warm_start(fresh, sharding.make_mesh(config.mesh)))
  np.testing.assert_array_equal(warm['frame_embed']['embedding'][...][4:], old_table)
  np.testing.assert_array_equal(warm['frame_embed']['embedding'][...][:4], old_table)


def test_a_mate_dit_post_tunes_from_short_windows_to_long_ones(cache, tmp_path):
  """LinGen's progressive training as post-tuning: a MATE DiT trained on windows of 4 latent
  frames continues on windows of 8, every parameter starting as the short run's; a run of the
  other mixer is refused in one line."""
  short = _config(cache, steps=6, frame_positions=0)
  short.model.update(mixer='mate', window='2,2,2', ssd_chunk=8, ssd_state=8)
  short_dir = str(tmp_path / 'short')
  first = trainer.train(short, short_dir, tasks.make_task(short))
  long = _config(cache, steps=4, window=8, frame_positions=0)
  long.model.update(mixer='mate', window='2,2,2', ssd_chunk=8, ssd_state=8)
  long.finetune.update(start=short_dir, trainable='all')
  task = tasks.make_task(long)
  fresh = trainer.create_layout(task, long).init().params
  warm = jax.device_get(task.warm_start(fresh, sharding.make_mesh(long.mesh)))
  jax.tree.map(np.testing.assert_array_equal, warm, jax.device_get(first.state.ema_params))
  result = trainer.train(long, str(tmp_path / 'long'), task)
  assert int(result.state.step) == 4 and np.isfinite(result.last_eval['eval_mse'])
  other = _config(cache, steps=4, window=8, frame_positions=0)
  other.finetune.update(start=short_dir, trainable='all')
  with pytest.raises(config_checks.ConfigError, match="model.mixer='mate'"):
    tasks.make_task(other).warm_start(fresh, sharding.make_mesh(other.mesh))


def test_long_generation_has_exactly_the_frames_asked_and_is_reproducible_by_seed(trained):
  _, task, _, result = trained
  mesh = sharding.make_mesh(task.config.mesh)
  frozen = task.frozen(mesh)
  graphdef = trainer.create_layout(task, task.config, mesh).graphdef
  params = result.state.ema_params
  labels = np.array([0, 2], np.int32)
  sampler = long_video.window_sampler(task, graphdef, params, mesh)
  make = lambda frames, method, seed: long_video.generate(
      task, graphdef, params, frozen, mesh, labels, frames, method, seed=seed, sampler=sampler
  )
  # Windows of 4 at strides 3 and 1 with q = 2: 10 latent frames (keyframes 0, 3, 6, 9) give
  # 19 or 20 frames hierarchically.
  first = make(19, 'hierarchical', seed=0)
  assert first.videos.shape == (2, 19, 16, 16, 3) and first.videos.dtype == np.uint8
  assert first.latents.shape == (2, 10, *SPATIAL, CHANNELS)
  assert long_video.sequential_calls(first.plan) == 2
  np.testing.assert_array_equal(make(19, 'hierarchical', seed=0).latents, first.latents)
  assert not np.allclose(make(19, 'hierarchical', seed=1).latents, first.latents)
  autoregressive = make(15, 'autoregressive', seed=0)
  assert (
      autoregressive.videos.shape[1] == 15 and long_video.sequential_calls(autoregressive.plan) == 3
  )
  # In one pass: the whole length (here the frame table's 4 latent frames) in one sampler call.
  direct = make(8, 'direct', seed=0)
  assert direct.videos.shape == (2, 8, 16, 16, 3) and long_video.sequential_calls(direct.plan) == 1


def test_long_video_config_errors_name_the_field(cache):
  def error(**changes):
    config = _config(cache)
    for field, value in changes.items():
      node = config
      *parents, leaf = field.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
    with pytest.raises(config_checks.ConfigError) as e:
      tasks.make_task(config)
    return str(e.value)

  assert 'config.latents.window' in error(**{'latents.window': 0})
  assert 'spans 25 latent frames' in error(**{'latents.window': 25})
  assert 'model.frame_mask=True' in error(**{'model.frame_mask': False})
  assert 'config.finetune.start' in error(**{'finetune.trainable': 'time'})
  assert 'must be comma-separated integers' in error(**{'model.strides': '1;3'})


def test_long_videos_are_encoded_clip_after_clip_as_the_tokenizer_was_trained():
  """encoding.in_clips (the cache of long videos) equals encoding each clip on its own."""
  code = lambda clips: clips[:, ::2] * 2.0  # a stand-in coder: (B, 4, ...) -> (B, 2, ...)
  video = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)
  out = encoding.in_clips(code, video, 4)
  expected = jnp.concatenate([code(video[:, i : i + 4]) for i in (0, 4, 8)], axis=1)
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match='do not split into clips of 5'):
    encoding.in_clips(code, video, 5)


@pytest.mark.slow
def test_sample_long_writes_videos_and_names_the_nearest_reachable_lengths(trained, tmp_path):
  import json
  import subprocess
  import sys

  from tests.conftest import REPO
  from vitok.data import video_io

  _, _, workdir, _ = trained
  out = str(tmp_path / 'long')

  def run(*flags):
    return subprocess.run(
        [sys.executable, '-m', 'launch.sample_long', f'--workdir={workdir}', f'--out={out}']
        + list(flags),
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
        capture_output=True,
        text=True,
        timeout=600,
    )

  bad = run('--frames=21', '--method=hierarchical')
  assert bad.returncode != 0
  assert 'nearest reachable frame counts are 19-20 and 25-26' in bad.stderr + bad.stdout
  done = run('--class=0,2', '--frames=20', '--method=hierarchical', '--steps=2', '--filmstrip=5')
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['sequential_calls'] == 2 and summary['sequential_dit_evaluations'] == 4
  assert summary['levels'] == [
      {'stride': 3, 'calls': 1, 'windows': 1},
      {'stride': 1, 'calls': 1, 'windows': 3},
  ]
  for label in (0, 2):
    name = os.path.join(out, f'hierarchical_class{label}_{label // 2}')
    assert video_io.probe(name + '.mp4')[:3] == (20, 16, 16)
    assert os.path.exists(name + '.png')
  with open(os.path.join(out, 'hierarchical.json')) as f:
    assert json.load(f) == summary
