"""The DiT on the shared infrastructure: the latent cache round trip and its statistics, training
through the same loop (both objectives: the loss falls, the evaluators run on the EMA, sample grids
are written), a tiny DiT overfitting one batch so that sampling lands on it, and a sharded DiT step
equal to one device."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from training_equality import assert_same_training

from configs import dit as dit_config
from dit import diffusion
from dit import evaluation as dit_evaluation
from dit import latents as latents_lib
from launch import tasks
from vitok.core import checkpoint as ckpt_lib
from vitok.core import run_dir, sharding, trainer
from vitok.core import train_state as ts
from vitok.data import pixels

GRID, CHANNELS, CLASSES = (1, 4, 4), 4, 3


def _write_cache(directory, n_train=24, n_test=8, seed=0):
  """A latent cache of class-dependent latents: class k has mean pattern k plus small noise."""
  rng = np.random.default_rng(seed)
  patterns = rng.standard_normal((CLASSES, *GRID, CHANNELS)).astype(np.float32) * 2.0 + 1.0
  splits = {}
  for split, n in (('train', n_train), ('test', n_test)):
    labels = np.arange(n) % CLASSES
    records = [
        latents_lib.to_record(
            patterns[k] + 0.05 * rng.standard_normal(patterns[k].shape),
            np.full(patterns[k].shape, -6.0, np.float32),
            k,
        )
        for k in labels
    ]
    # Two chunks, to read across files.
    latents_lib.write_chunk(
        os.path.join(directory, split, 'c00000.array_record'), records[: n // 2]
    )
    latents_lib.write_chunk(
        os.path.join(directory, split, 'c00001.array_record'), records[n // 2 :]
    )
    splits[split] = n
  metadata = latents_lib.Metadata(
      grid=GRID,
      channels=CHANNELS,
      num_classes=CLASSES,
      splits=splits,
      channel_mean=(),
      channel_std=(),
      tokenizer='',
      data={},
  )
  train = latents_lib.LatentSource(directory, 'train', metadata)
  mean, std = latents_lib.channel_statistics((train[i] for i in range(n_train)), CHANNELS)
  import dataclasses

  metadata = dataclasses.replace(
      metadata, channel_mean=tuple(map(float, mean)), channel_std=tuple(map(float, std))
  )
  latents_lib.write_metadata(directory, metadata)
  return patterns


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('latents'))
  return directory, _write_cache(directory)


def _config(cache_dir, objective='flow', steps=40):
  config = dit_config.get_config(f'demo,latents={cache_dir},objective={objective},steps={steps}')
  config.model.variant = 'DiT-cpu64/1'
  config.tokenizer.update(variant='cpu128-cpu128/1x8', channels=CHANNELS)
  config.data.update(frames=1, res=32, batch_size=8, eval_batch_size=8)
  config.sample.update(sampler='euler' if objective == 'flow' else 'ddim', steps=8, per_class=1)
  config.optim.update(lr=3e-3, warmup_steps=5, ema_decay=0.9)
  config.update(log_every=10, ckpt_every=20)
  config.evals.loss.every = 20
  return config


def test_the_latent_cache_round_trips_with_its_statistics(cache):
  directory, patterns = cache
  metadata = latents_lib.read_metadata(directory)
  source = latents_lib.LatentSource(directory, 'train')
  assert len(source) == 24 and metadata.grid == GRID and metadata.num_classes == CLASSES
  example = source[13]
  assert example['mean'].shape == (*GRID, CHANNELS) and example['label'] == 13 % CLASSES
  np.testing.assert_allclose(example['mean'], patterns[13 % CLASSES], atol=0.3)
  np.testing.assert_array_equal(example['logvar'], -6.0)
  # Statistics: the per-channel moments of z = mean + sigma eps, exactly.
  means = np.stack([source[i]['mean'] for i in range(24)]).reshape(-1, CHANNELS).astype(np.float64)
  np.testing.assert_allclose(metadata.channel_mean, means.mean(0), rtol=1e-6)
  np.testing.assert_allclose(metadata.channel_std, np.sqrt(means.var(0) + np.exp(-6.0)), rtol=1e-6)
  record = latents_lib.to_record(example['mean'], example['logvar'], 2)
  back = latents_lib.from_record(record, (*GRID, CHANNELS))
  np.testing.assert_array_equal(back['mean'], example['mean'])
  assert back['label'] == 2


def test_a_cache_that_lost_a_chunk_is_refused(cache, tmp_path):
  import shutil

  directory = str(tmp_path / 'latents')
  shutil.copytree(cache[0], directory)
  os.remove(os.path.join(directory, 'train', 'c00001.array_record'))
  with pytest.raises(ValueError, match=r"split 'train' holds 12 records, its latents.json says 24"):
    latents_lib.LatentSource(directory, 'train')


def test_the_dit_trains_through_the_shared_loop(cache, tmp_path):
  # The loop does not depend on the objective; the DDPM step runs sharded in a test below.
  config = _config(cache[0], 'flow', steps=20)
  config.update(ckpt_every=10)
  config.evals.loss.every = 10
  task = tasks.make_task(config)
  workdir = str(tmp_path / 'run')
  result = trainer.train(config, workdir, task)
  assert int(result.state.step) == 20 and result.stopped_by is None
  assert {'eval_mse', 'eval_mse_10', 'eval_mse_50', 'eval_mse_90', 'samples'} <= set(
      result.last_eval
  )
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines] == [10, 20] and 'samples' in lines[-1]
  assert lines[-1]['eval_mse'] == result.last_eval['eval_mse']
  samples = os.listdir(os.path.join(workdir, 'samples'))
  assert 'step0000020_grid.png' in samples
  # The 'loss' evaluator read the EMA: recompute it from the final state's EMA and raw params.
  mesh = sharding.make_mesh(config.mesh)
  layout = trainer.create_layout(task, config, mesh)
  frozen = task.frozen(mesh)
  sources = task.prepare_data()
  from vitok.core import task as task_lib

  def loss_with(params):
    context = task_lib.EvalContext(layout.graphdef, params, frozen, sources, 20, workdir, mesh)
    return dit_evaluation.evaluate_loss(task, context)['eval_mse']

  assert loss_with(result.state.ema_params) == pytest.approx(result.last_eval['eval_mse'], rel=1e-5)
  assert loss_with(result.state.params) != pytest.approx(result.last_eval['eval_mse'], rel=1e-3)


def _overfit(cache_dir, objective, steps, lr):
  """Trains a tiny DiT on one fixed batch (one latent per class) with a plain jitted step."""
  config = _config(cache_dir, objective)
  config.optim.lr = lr
  config.diffusion.label_dropout = 0.0
  config.latents.sample_posterior = False
  task = tasks.make_task(config)
  model = task.create_model(nnx.Rngs(0))
  tx, schedule = ts.make_optimizer(config.optim, 8, steps)
  graphdef, state = ts.init_train_state(model, tx, jax.random.PRNGKey(1), ema=False)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  frozen = {'stats': task.frozen(mesh)['stats']}
  source = latents_lib.LatentSource(cache_dir, 'train')
  batch = {
      k: jnp.stack([source[i][k] for i in range(CLASSES)]) for k in ('mean', 'logvar', 'label')
  }
  step = jax.jit(ts.make_train_step(graphdef, task.loss_fn, tx, schedule, 0.0))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics['loss']))
  return task, graphdef, state, frozen, batch, losses


@pytest.mark.parametrize(
    'objective,steps,lr,tolerance',
    [
        ('flow', 500, 6e-3, 0.25),  # measured here: 0.13
        (
            'ddpm',
            800,
            1e-2,
            None,
        ),  # eps-prediction learns slower: only the nearest latent is checked
    ],
)
def test_a_tiny_dit_overfits_one_batch_and_sampling_lands_on_it(
    cache, objective, steps, lr, tolerance
):
  task, graphdef, state, frozen, batch, losses = _overfit(cache[0], objective, steps, lr)
  assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20]), losses[::50]
  model = nnx.merge(graphdef, state.params)
  labels = jnp.arange(CLASSES)
  shape = (CLASSES, *GRID, CHANNELS)
  key = jax.random.PRNGKey(5)
  if objective == 'flow':
    x = diffusion.flow_sample(model, shape, labels, key, steps=30)
  else:
    x = diffusion.ddpm_sample(
        diffusion.respace(task.schedule, 50), model, shape, labels, key, eta=0.0
    )
  target = task.normalized_latents(batch, frozen)
  # Every class's sample is nearest to that class's training latent...
  distances = jnp.sqrt(jnp.mean(jnp.square(x[:, None] - target[None]), axis=(2, 3, 4, 5)))
  np.testing.assert_array_equal(jnp.argmin(distances, axis=1), labels)
  # ... and, for the flow, on it (errors in units of the latents' scale).
  if tolerance is not None:
    scale = float(jnp.sqrt(jnp.mean(jnp.square(target))))
    assert float(jnp.max(jnp.diag(distances))) < tolerance * scale, distances


def test_a_sharded_dit_step_equals_one_device(cache):
  # MATE's sharded step is in tests/test_context_parallel.py (data x model x context).
  config = _config(cache[0], 'ddpm')  # with the learned variance and its VB term
  results = []
  meshes = [((1, 1), ('data', 'fsdp')), ((2, 4), ('data', 'fsdp')), ((2, 4), ('data', 'model'))]
  for shape, axes in meshes:
    config.mesh.update(shape=shape, axes=axes)
    task = tasks.make_task(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[: int(np.prod(shape))])
    layout = trainer.create_layout(task, config, mesh)
    state = layout.init()
    initial = jax.device_get(state)
    step = ts.compile_train_step(
        layout, task.loss_fn, 0.9, task.abstract_batch(), task.abstract_frozen(mesh)
    )
    frozen = task.frozen(mesh)
    source = latents_lib.LatentSource(cache[0], 'train')
    host = {k: np.stack([source[i][k] for i in range(8)]) for k in ('mean', 'logvar', 'label')}
    batch = trainer.global_batch(host, sharding.batch_sharding(mesh, config.sharding_rules))
    for _ in range(2):
      state, metrics = step(state, batch, frozen)
    results.append((initial, jax.device_get(state), float(metrics['loss'])))
  reference_initial, reference, reference_loss = results[0]
  for initial, final, loss in results[1:]:
    # The same initial state on every mesh, then the same training (see training_equality).
    jax.tree.map(np.testing.assert_array_equal, initial.params, reference_initial.params)
    assert_same_training(final, reference, reference_initial)
    assert loss == pytest.approx(reference_loss, rel=1e-4)


@pytest.fixture(scope='module')
def tokenizer_dir(tiny_config, tmp_path_factory):
  """A tokenizer run directory (config.json and a checkpoint, as training leaves them) holding the
  tiny config's initial state (latents (2, 4, 4) x 4): what the DiT reads of a tokenizer, without
  compiling a training step."""
  from vitok.tokenizer import stage1

  directory = str(tmp_path_factory.mktemp('tokenizer'))
  config = tiny_config.copy_and_resolve_references()
  layout = trainer.create_layout(stage1.TokenizerTask(config), config)
  checkpointer = ckpt_lib.Checkpointer(directory)
  checkpointer.save(1, layout.init())
  checkpointer.close()
  run_dir.write_config(config, directory)
  return directory


def test_encoding_on_the_fly_trains_as_the_cache_would(tiny_config, tokenizer_dir, tmp_path):
  """latents.source='video': no cache, the frozen tokenizer (sharded over fsdp) encodes each batch
  inside the step. Its statistics equal the cache's over the same clips, its loss equals the loss
  on the cached latents of the same clips with the same randomness, it trains through the loop,
  and the run's config.json carries the statistics, so a restored run needs no data."""
  from dit import encoding
  from vitok.data import pipeline

  cache_dir = str(tmp_path / 'latents')
  encoding.encode(tokenizer_dir, cache_dir, tiny_config.data, batch=8)

  def dit(**latents):
    config = dit_config.get_config('demo,steps=4,mesh=2x4')
    config.model.variant = 'DiT-cpu64/1'
    config.tokenizer.dir = tokenizer_dir
    data = tiny_config.data
    config.data.update(
        {k: data[k] for k in ('name', 'manual_dir', 'data_dir', 'holdout_fraction', 'clip_frames')}
    )
    config.data.update(
        frames=4, res=32, store_short_side=32, batch_size=8, eval_batch_size=8, hflip=False
    )
    config.latents.update(latents)
    config.sample.update(steps=2, per_class=1)
    config.update(log_every=2, ckpt_every=4)
    config.evals.loss.every = 4
    return config

  cached = tasks.make_task(dit(dir=cache_dir))
  config = dit(source='video', stats_clips=1000)
  on_the_fly = tasks.make_task(config)
  assert on_the_fly.abstract_batch()['video'].shape == (8, 4, 32, 32, 3)
  assert on_the_fly.model_cfg == cached.model_cfg  # grid, channels, classes (from the data)
  mesh = sharding.make_mesh(config.mesh)
  frozen, frozen_cached = on_the_fly.frozen(mesh), cached.frozen(mesh)
  for k in ('mean', 'std'):
    np.testing.assert_allclose(frozen['stats'][k], frozen_cached['stats'][k], rtol=2e-5, atol=1e-6)
  recorded = json.loads(config.latents.recorded)
  np.testing.assert_array_equal(np.float32(recorded['channel_std']), frozen['stats']['std'])
  specs = [p.sharding.spec for p in jax.tree.leaves(frozen['tokenizer'])]
  assert any('fsdp' in jax.tree.leaves(tuple(spec)) for spec in specs)  # sharded, not replicated

  train = on_the_fly.prepare_data()['train']
  clips = next(pipeline.eval_batches(config.data, train))
  n = int(clips['mask'].sum())
  cache = latents_lib.LatentSource(cache_dir, 'train')
  latents = {k: np.stack([cache[i][k] for i in range(n)]) for k in ('mean', 'logvar', 'label')}
  graphdef, params = nnx.split(on_the_fly.create_model(nnx.Rngs(0)))
  key = jax.random.PRNGKey(3)  # posterior sample, label dropout and noise all from it

  def loss(task, batch, frozen):
    run = lambda p, b, f: task.loss_fn(nnx.merge(graphdef, p), b, key, f)[0]
    return float(jax.jit(run)(params, batch, frozen))

  video = {'video': clips['video'][:n], 'label': clips['label'][:n]}
  assert loss(on_the_fly, video, frozen) == pytest.approx(
      loss(cached, latents, frozen_cached), rel=1e-4
  )

  workdir = str(tmp_path / 'dit')
  result = trainer.train(config, workdir, tasks.make_task(dit(source='video', stats_clips=1000)))
  assert int(result.state.step) == 4 and np.isfinite(result.last_eval['eval_mse'])
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  saved.data.update(manual_dir='/nonexistent', data_dir='/nonexistent')  # no data from here on
  restored = tasks.make_task(saved).frozen(mesh)
  np.testing.assert_array_equal(restored['stats']['std'], frozen['stats']['std'])


@pytest.mark.slow
def test_video_to_generated_video_through_the_commands(
    tokenizer_dir, tmp_path, fid_weights_file, monkeypatch
):
  """A tokenizer's run directory -> launch.encode -> launch.train of a DiT on 2 devices ->
  launch.sample on 1 device: the clips equal those the DiT generates in this process on 8; and
  the DiT's generation metrics."""
  monkeypatch.setenv('VITOK_FID_WEIGHTS', fid_weights_file)
  import subprocess
  import sys

  from PIL import Image

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def command(module, *args, devices=1):
    env = dict(
        os.environ,
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        JAX_PLATFORMS='cpu',
    )
    out = subprocess.run(
        [sys.executable, '-m', module, *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out

  cache = str(tmp_path / 'latents')
  out = command('launch.encode', f'--tokenizer={tokenizer_dir}', f'--out={cache}')
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['splits'] == {
      'train': len(latents_lib.LatentSource(cache, 'train')),
      'test': len(latents_lib.LatentSource(cache, 'test')),
  }
  metadata = latents_lib.read_metadata(cache)
  assert metadata.grid == (2, 4, 4) and metadata.channels == 4
  assert metadata.tokenizer == tokenizer_dir
  # (A rerun that finds the cache finished and leaves it as it is: tests/test_demo.py.)

  dit_dir = str(tmp_path / 'dit')
  flags_ = [
      f'--workdir={dit_dir}',
      f'--config=configs/dit.py:demo,latents={cache},steps=4',
      '--config.model.variant=DiT-cpu64/1',
      '--config.data.batch_size=4',
      '--config.log_every=2',
      '--config.evals.loss.every=4',
      '--config.ckpt_every=4',
      '--config.sample.steps=4',
      '--config.sample.per_class=1',
  ]
  command('launch.train', *flags_, devices=2)
  assert os.path.exists(os.path.join(dit_dir, 'samples', 'step0000004_grid.png'))
  samples = str(tmp_path / 'samples')
  # The tiny video folder has one class: a bad class id is one line naming it.
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  args = [sys.executable, '-m', 'launch.sample', f'--workdir={dit_dir}', f'--out={samples}']
  bad = subprocess.run(
      args + ['--classes=0,1'], cwd=repo, env=env, capture_output=True, text=True, timeout=600
  )
  assert bad.returncode == 2
  assert bad.stderr == 'bad config: config.sample.classes has [1]: class ids are in [0, 1)\n'
  flags_ = ['--classes=0', '--per_class=4', '--guidance=2.0', '--steps=4', '--seed=3']
  out = command('launch.sample', f'--workdir={dit_dir}', f'--out={samples}', *flags_)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['step'] == 4 and result['ema'] and result['clips'] == 4
  grid = np.asarray(Image.open(os.path.join(samples, 'samples_grid.png')))
  assert grid.shape == (32, 4 * 4 * 32, 3)  # a row per class: 4 clips of 4 frames of 32x32
  assert len([f for f in os.listdir(samples) if f.endswith('.mp4')]) == 4

  # The same clips from this process on 8 devices (a checkpoint restored on another mesh).
  with open(os.path.join(dit_dir, 'config.json')) as f:
    run_config = ml_collections.ConfigDict(json.load(f))
  run_config.sample.update(classes='0', per_class=4, guidance=2.0, steps=4)
  task = tasks.make_task(run_config)
  mesh = sharding.make_mesh(run_config.mesh)
  layout = trainer.create_layout(task, run_config, mesh)
  checkpointer = ckpt_lib.Checkpointer(dit_dir, create=False)
  params = checkpointer.restore_params(layout.abstract.params, ema=True)
  labels = np.zeros(4, np.int32)
  videos = task.generate(layout.graphdef, params, task.frozen(mesh), labels, mesh, seed=3)
  ours = str(tmp_path / 'ours')
  dit_evaluation.write_sample_grid(videos, labels, ours, 'samples')
  mine = np.asarray(Image.open(os.path.join(ours, 'samples_grid.png'))).astype(int)
  assert np.abs(mine - grid).max() <= 2 and np.mean(mine != grid) < 0.01
  _check_generation_metrics(task, layout, params, mesh, dit_dir)


def _frechet_distance_of_rows(a, b):
  """The Frechet distance between the Gaussians fitted to the rows of `a` and of `b` (means and
  unbiased covariances, as FID defines it), in numpy float64 by a closed form for few rows, and
  the error allowed to the usual computation of it.

  With the centred rows scaled by 1 / sqrt(n - 1) as the columns of A and B, C_a = A A^T and
  C_b = B B^T; the nonzero eigenvalues of C_a C_b are those of (A^T B)(A^T B)^T, so
  tr sqrt(C_a C_b) is the sum of the singular values of the small A^T B, and
      d = |mean_a - mean_b|^2 + tr C_a + tr C_b - 2 sum(singular values of A^T B).
  The usual computation takes square roots of eigenvalues of D x D matrices (D = 2048) instead:
  each eigenvalue is computed to within about D eps |C| (eps = 2^-52), so each of the D that are
  zero here can add up to sqrt(D eps |C_a| |C_b|) to tr sqrt(C_a C_b), twice (the square root of
  C_a, then of C_a^(1/2) C_b C_a^(1/2)): an error of at most 4 D sqrt(D eps |C_a| |C_b|) in d,
  |C| bounded by its trace."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  centred_a = ((a - a.mean(axis=0)) / np.sqrt(len(a) - 1)).T
  centred_b = ((b - b.mean(axis=0)) / np.sqrt(len(b) - 1)).T
  trace_a, trace_b = np.sum(centred_a**2), np.sum(centred_b**2)
  trace_sqrt = np.linalg.svd(centred_a.T @ centred_b, compute_uv=False).sum()
  diff = a.mean(axis=0) - b.mean(axis=0)
  distance = diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt
  dim = a.shape[1]
  return distance, 4 * dim * np.sqrt(dim * 2.0**-52 * trace_a * trace_b)


def _check_generation_metrics(task, layout, params, mesh, dit_dir):
  """gFID of the DiT's samples against the real held-out clips of the data the latents were
  encoded from, equal to the Frechet distance of Inception features computed here (in numpy, by
  `_frechet_distance_of_rows`); gFVD reported unavailable (one real held-out clip: one I3D
  feature vector) with the reason."""
  from dit import evaluation as dit_evaluation
  from vitok.core import task as task_lib
  from vitok.data import datasets, pipeline
  from vitok.evals import inception

  task.config.generation.clips = 3
  context = task_lib.EvalContext(layout.graphdef, params, task.frozen(mesh), {}, 4, dit_dir, mesh)
  result = dit_evaluation.evaluate_generation(task, context)
  assert result['gfvd_unavailable'] == 'gfvd needs at least 2 feature vectors a side; got 1'
  protocol = result['fid_protocol']
  assert protocol['clips'] == 1 and protocol['generated_clips'] == 3
  assert (protocol['sampler'], protocol['steps'], protocol['guidance']) == ('euler', 4, 2.0)

  data_cfg = dit_evaluation.real_data_config(task)
  real = datasets.prepare(data_cfg)[data_cfg.eval_split]
  batch = next(pipeline.eval_batches(data_cfg, real))
  real_video = batch['video'][batch['mask']]
  weights = inception.load_params()
  frames = lambda v: pixels.to_unit_range(v.reshape(-1, *v.shape[2:]))
  real_features = np.asarray(inception.fid_features(weights, frames(real_video)))
  labels = np.zeros(3, np.int32)
  generated = task.generate(layout.graphdef, params, context.frozen, labels, mesh, seed=0)
  generated_features = np.asarray(inception.fid_features(weights, frames(generated)))
  assert real_features.shape == (4, inception.FEATURES)  # one clip of 4 frames: 4 rows
  assert generated_features.shape == (12, inception.FEATURES)
  expected, tolerance = _frechet_distance_of_rows(generated_features, real_features)
  assert abs(result['gfid'] - expected) <= tolerance, (result['gfid'], expected, tolerance)
  assert os.listdir(os.path.join(data_cfg.data_dir, 'feature_statistics'))
