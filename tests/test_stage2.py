"""ViTok stage 2: the discriminator, the adversarial losses against hand-computed values, the
frozen encoder side (bit for bit), the two optimizers and their learning rates, the LeCam anchors'
EMA, the adaptive weight against autodiff, warm start from a stage-1 run, reading a stage-2 run as
a tokenizer, and a stage-2 run that resumes bit-exact after SIGTERM."""

import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import vitok_stage2 as stage2_config
from tests.conftest import TINY
from vitok.core import checkpoint as ckpt_lib
from vitok.core import config_checks, export, run_dir, signals, trainer
from vitok.core import task as task_lib
from vitok.core import train_state as ts
from vitok.data import pixels
from vitok.evals import frechet
from vitok.tokenizer import discriminator as disc_lib
from vitok.tokenizer import evaluation as tok_evaluation
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer import stage1, stage2

# --- the discriminator ---


def test_blur_pool_is_the_binomial_filter_with_stride_two():
  x = np.arange(8.0)
  padded = np.concatenate([x[:1], x, x[-1:]])  # edges replicated
  expected = [(padded[2 * j : 2 * j + 4] * [1, 3, 3, 1]).sum() / 8 for j in range(4)]
  out = disc_lib.blur_pool(jnp.asarray(x).reshape(1, 8, 1, 1), time=False)
  np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
  # 2-D: separable along H and W; constants stay constant; odd sizes become ceil(n / 2).
  assert disc_lib.blur_pool(jnp.ones((2, 8, 6, 3)), time=False).shape == (2, 4, 3, 3)
  np.testing.assert_allclose(disc_lib.blur_pool(jnp.ones((1, 5, 8, 8, 2)), time=True), 1.0)
  assert disc_lib.blur_pool(jnp.ones((1, 5, 8, 8, 2)), time=True).shape == (1, 3, 4, 4, 2)
  assert disc_lib.blur_pool(jnp.ones((1, 5, 8, 8, 2)), time=False).shape == (1, 5, 4, 4, 2)


@pytest.mark.parametrize('kind, logits', [('2d', (2, 4)), ('3d', (2, 1))])
def test_discriminator_gives_one_logit_per_frame_or_per_clip(kind, logits):
  cfg = disc_lib.DiscriminatorConfig(kind=kind, channels=8, max_channels=16)
  disc = disc_lib.Discriminator(cfg, 4, 32, rngs=nnx.Rngs(0))
  video = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 32, 32, 3), minval=-1, maxval=1)
  out = disc(video)
  assert out.shape == logits and out.dtype == jnp.float32
  if kind == '2d':  # frames are judged alone: a frame's logit does not depend on the others
    np.testing.assert_allclose(disc(video[:, :1])[:, 0], out[:, 0], rtol=1e-5, atol=1e-6)


def test_a_frame_size_the_discriminator_cannot_halve_to_4x4_fails_naming_data_res():
  config = _stage2_config()
  config.data.res = 48
  with pytest.raises(config_checks.ConfigError, match='data.res=48'):
    stage2.Stage2Task(config)


# --- the losses, against hand-computed values ---


def test_hinge_generator_and_lecam_losses_equal_hand_computed_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  # mean relu(1 - real) = (0 + 0.5 + 2) / 3; mean relu(1 + fake) = (0 + 1 + 2.5) / 3
  assert float(stage2.hinge_discriminator_loss(real, fake)) == pytest.approx(6.0 / 3)
  assert float(stage2.generator_adversarial_loss(fake)) == pytest.approx(0.5 / 3)
  # anchors a_real = 0.5, a_fake = -0.5: relu(real + 0.5)^2 = [6.25, 1, 0];
  # relu(0.5 - fake)^2 = [6.25, 0.25, 0]
  lecam = stage2.lecam_regularizer(real, fake, 0.5, -0.5)
  assert float(lecam) == pytest.approx(7.25 / 3 + 6.5 / 3)


def test_generator_ramp_is_zero_before_the_start_then_linear_to_one():
  ramp = lambda step, start, steps: float(stage2.adversarial_ramp(step, start, steps))
  assert [ramp(s, 10, 20) for s in (0, 9, 10, 15, 20, 30, 1000)] == [0, 0, 0, 0.25, 0.5, 1, 1]
  assert [ramp(s, 10, 0) for s in (9, 10, 11)] == [0, 1, 1]


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_decoders_last_layer():
  config = _stage2_config()
  config.loss.lpips = 0.0
  config.gan.update(adaptive_weight=True, start_step=0, ramp_steps=0)
  task = stage2.Stage2Task(config)
  model = task.create_model(nnx.Rngs(0))
  batch = {'video': jax.random.randint(jax.random.PRNGKey(1), (2, 4, 32, 32, 3), 0, 255, jnp.uint8)}
  key = jax.random.PRNGKey(2)
  graphdef, params = nnx.split(model)
  loss_fn = lambda p: task.loss_fn(nnx.merge(graphdef, p), batch, key, {}, jnp.array(5))[1]
  metrics = jax.jit(loss_fn)(params)

  # Independently: both losses as functions of every parameter, by autodiff; their gradient norms
  # at tokenizer.to_pixels.kernel.
  video = pixels.to_unit_range(batch['video'])
  sample_key = jax.random.split(key, 3)[0]

  def recon_of(p):
    m = nnx.merge(graphdef, p)
    mean, logvar = m.tokenizer.encode_moments(video)
    return m.tokenizer.decode(tokenizer.sample(mean, logvar, sample_key)), m, mean, logvar

  def rec_loss(p):
    recon, _, mean, logvar = recon_of(p)
    return stage1.reconstruction_loss(recon, video, mean, logvar, {}, config.loss, key)[0]

  def gan_loss(p):
    recon, m, _, _ = recon_of(p)
    return -jnp.mean(m.discriminator(recon))

  norm = lambda g: float(jnp.linalg.norm(g['tokenizer']['to_pixels']['kernel'][...]))
  rec_grad, gan_grad = jax.jit(lambda p: (jax.grad(rec_loss)(p), jax.grad(gan_loss)(p)))(params)
  expected = norm(rec_grad) / (norm(gan_grad) + 1e-4)
  assert float(metrics['gan_scale']) == pytest.approx(expected, rel=1e-4)


# --- the train step: frozen parameters, two optimizers, LeCam anchors ---


def _stage2_config():
  """The tiny tokenizer with a small discriminator that judges every frame."""
  config = stage2_config.get_config(TINY)
  config.disc.update(channels=8, max_channels=16)
  config.gan.update(weight=0.1, start_step=0, ramp_steps=2, lecam=0.1, lecam_decay=0.9)
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  config.disc_optim.update(lr=1e-5, warmup_steps=1)
  return config


def _named_leaves(tree):
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_stage2_steps_keep_the_encoder_side_bit_for_bit_and_train_the_rest_at_their_own_rates():
  config = _stage2_config()
  config.loss.lpips = 0.0
  task = stage2.Stage2Task(config)
  mesh = jax.make_mesh((8, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  layout = trainer.create_layout(task, config, mesh)
  step = ts.compile_train_step(layout, task.loss_fn, 0.9, task.abstract_batch(), {})
  state = layout.init()
  before = _named_leaves(jax.device_get(state.params))
  rng = np.random.default_rng(0)
  history = []
  for _ in range(3):
    batch = {
        'video': rng.integers(0, 255, (8, 4, 32, 32, 3), dtype=np.uint8),
        'label': np.zeros(8, np.int32),
    }
    previous = jax.device_get(state.params)
    state, metrics = step(state, batch, {})
    history.append((previous, jax.device_get(metrics)))
  after = _named_leaves(jax.device_get(state.params))
  ema = _named_leaves(jax.device_get(state.ema_params))

  frozen = [k for k in before if any(f"'{m}'" in k for m in stage2.FROZEN_MODULES)]
  trained = [k for k in before if k not in frozen]
  assert frozen and trained and all("'tokenizer'" in k for k in frozen)
  for k in frozen:  # parameters and their EMA: the same bits
    assert np.array_equal(after[k], before[k]) and np.array_equal(ema[k], before[k]), k
  assert all(not np.array_equal(after[k], before[k]) for k in trained)
  # No optimizer moments are kept for frozen parameters.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  trained_size = sum(after[k].size for k in trained if "'lecam_anchors'" not in k)
  assert moments == 2 * trained_size

  # Step 1 (the first at peak LR after a 1-step warmup): Adam moves no element by more than its
  # group's LR (|m_hat / sqrt(v_hat)| <= 1.0004 for two gradients, plus decay 1e-4 x LR x |p|,
  # plus float32 rounding of p), and the largest move is of that order: the decoder at 1e-3, the
  # discriminator at 1e-5.
  start, end = _named_leaves(history[1][0]), _named_leaves(history[2][0])
  moved = {k: np.abs(end[k] - start[k]).max() for k in trained}
  decoder = max(v for k, v in moved.items() if "'tokenizer'" in k)
  disc = max(v for k, v in moved.items() if "'discriminator'" in k)
  assert 0.3e-3 < decoder <= 1.01e-3
  assert 0.3e-5 < disc <= 1.01e-5

  # The LeCam anchors are the EMA (decay 0.9, from 0) of the discriminator's mean outputs.
  anchors = np.zeros(2)
  for _, m in history:
    anchors = 0.9 * anchors + 0.1 * np.array([m['d_real'], m['d_fake']])
  key = next(k for k in after if "'lecam_anchors'" in k)
  np.testing.assert_allclose(after[key], anchors, rtol=1e-5, atol=1e-8)
  # The generator's adversarial weight follows the ramp: 0, 0.05, 0.1.
  np.testing.assert_allclose([m['gan_weight'] for _, m in history], [0.0, 0.05, 0.1], rtol=1e-6)


def test_the_stage1_check_names_differing_fields_and_defaults_fields_an_old_run_lacks(tmp_path):
  config = _stage2_config()
  saved = stage2_config.get_config(TINY)
  del saved.model['scan']  # a run saved before model.scan existed: its default (False)
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(saved.to_json())
  stage2.check_same_tokenizer(config, str(tmp_path))  # the same tokenizer: no error
  config.model.update(channels=8, variant='cpu128-cpu256/2x8')
  with pytest.raises(config_checks.ConfigError) as error:
    stage2.check_same_tokenizer(config, str(tmp_path))
  assert "model.variant='cpu128-cpu256/2x8' but the stage-1 run has 'cpu128-cpu128/2x8'" in str(
      error.value
  )
  assert 'model.channels=8 but the stage-1 run has 4' in str(error.value)
  assert 'scan' not in str(error.value)


# --- end to end: warm start, reading a stage-2 run as a tokenizer, resume after SIGTERM ---

RESUME_STEPS = 12


def _e2e_fields(tiny_config, stage1_dir):
  """The stage-2 fields of the end-to-end runs (in-process and through launch.train), on top of
  the fields `launch_train` sets from the tiny config."""
  return {
      'stage1': stage1_dir,
      'loss.lpips': 0.0,
      'disc.channels': 8,
      'disc.max_channels': 16,
      'gan.start_step': 2,
      'gan.ramp_steps': 4,
      'gan.lecam': 0.1,
      'disc_optim.lr': 1e-4,
      'disc_optim.warmup_steps': 1,
      'log_every': 4,
      'ckpt_every': 4,
      'evals.reconstruction.every': 1000,
      'num_eval_videos': 0,
      'total_steps': RESUME_STEPS,
  }


def _set_fields(config, fields):
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value


@pytest.fixture(scope='module')
def stage1_and_stage2(tiny_config, tmp_path_factory):
  """A stage-1 tokenizer (an export of freshly initialised parameters, as `launch.export` writes
  it: stage 2 reads exports and training workdirs alike) and a 12-step stage-2 run from it,
  in-process on 8 devices."""
  stage1_dir = str(tmp_path_factory.mktemp('stage1') / 'export')
  config1 = tiny_config.copy_and_resolve_references()
  model = stage1.TokenizerTask(config1).create_model(nnx.Rngs(7))
  export.export_params(nnx.state(model, nnx.Param), os.path.join(stage1_dir, 'params'))
  run_dir.write_config(config1, stage1_dir)

  config = stage2_config.get_config(TINY)
  config.data = tiny_config.data.copy_and_resolve_references()
  config.loss.lpips_frames = 1
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  _set_fields(config, _e2e_fields(tiny_config, stage1_dir))
  stage2_dir = str(tmp_path_factory.mktemp('stage2') / 'run')
  state, result, _ = trainer.train(config, stage2_dir, stage2.Stage2Task(config))
  return stage1_dir, stage2_dir, config, jax.device_get(state), result


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_run_and_reads_back_as_a_tokenizer(stage1_and_stage2):
  stage1_dir, stage2_dir, config, state, result = stage1_and_stage2
  assert {'psnr', 'ssim', 'lpips', 'baseline_psnr'} <= set(result)
  source = _named_leaves(frozen_tokenizer.open_tokenizer(stage1_dir).params)
  tuned = frozen_tokenizer.open_tokenizer(stage2_dir)  # stage 2's EMA, tokenizer part only
  assert tuned.source.startswith(f'step {RESUME_STEPS} of {stage2_dir} (EMA')
  tuned = _named_leaves(tuned.params)
  assert tuned.keys() == source.keys()
  ema = _named_leaves(state.ema_params['tokenizer'])
  for k, v in tuned.items():
    frozen = any(f"'{m}'" in k for m in stage2.FROZEN_MODULES)
    assert np.array_equal(v, source[k]) == frozen, k  # encoder side: stage 1's bits
    np.testing.assert_array_equal(v, ema[k])


@pytest.mark.slow
def test_stage2_start_up_errors_name_the_problem_and_write_nothing(stage1_and_stage2, tmp_path):
  stage1_dir, _, config, _, _ = stage1_and_stage2
  for field, value, message in [
      ('stage1', '', 'config.stage1 is empty'),
      ('stage1', str(tmp_path / 'missing'), 'is not a tokenizer'),
  ]:
    bad = config.copy_and_resolve_references()
    _set_fields(bad, {field: value})
    with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
      stage2.Stage2Task(bad).warm_start(None, None)  # fails before reading anything
  # Through the trainer: a tokenizer that differs from the stage-1 run's.
  bad = config.copy_and_resolve_references()
  bad.model.channels = 8
  workdir = str(tmp_path / 'run')
  with pytest.raises(config_checks.ConfigError, match='model.channels=8 but the stage-1 run has 4'):
    trainer.train(bad, workdir, stage2.Stage2Task(bad))
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_stage2_resumes_bit_exact_after_sigterm(
    stage1_and_stage2, tiny_config, launch_train, tmp_path
):
  stage1_dir, _, _, uninterrupted, _ = stage1_and_stage2
  workdir = str(tmp_path / 'run')
  start = lambda: launch_train(
      workdir,
      devices=8,
      overrides=_e2e_fields(tiny_config, stage1_dir),
      config_file='configs/vitok_stage2.py',
  )
  process = start()
  path = os.path.join(workdir, 'checkpoints', '4')
  while not os.path.isdir(path):
    assert process.poll() is None, process.communicate()[0][-3000:]
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=600)
  assert process.returncode == signals.EXIT_CODES['SIGTERM'], out[-3000:]
  saved = int(re.search(r'SIGTERM: saved step (\d+)', out).group(1))
  assert 4 <= saved < RESUME_STEPS

  process = start()
  out, _ = process.communicate(timeout=600)
  assert process.returncode == 0, out[-3000:]
  assert f'resumed from {workdir}/checkpoints/{saved}' in out
  # Parameters (decoder, discriminator, anchors), both optimizers' moments and the EMA: the bits
  # of the uninterrupted run.
  checkpointer = ckpt_lib.Checkpointer(workdir, create=False)
  task = stage2.Stage2Task(stage1_and_stage2[2])
  layout = trainer.create_layout(task, stage1_and_stage2[2])
  resumed = jax.device_get(checkpointer.restore(layout.abstract))
  checkpointer.close()
  assert int(resumed.step) == RESUME_STEPS
  for name in ('params', 'opt_state', 'ema_params'):
    a, b = _named_leaves(getattr(resumed, name)), _named_leaves(getattr(uninterrupted, name))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{name}{k}')


@pytest.mark.slow
def test_rfvd_and_rfid_of_a_stage2_run_beside_the_pooled_codec(
    stage1_and_stage2, tmp_path, fid_weights_file, monkeypatch
):
  """rFVD and rFID end to end (I3D on real clips, reconstructions and the pooled codec; Inception
  on their frames), on the training split of the tiny data (its held-out split has one clip, and a
  covariance needs two feature vectors)."""
  monkeypatch.setenv('VITOK_FID_WEIGHTS', fid_weights_file)
  _, stage2_dir, config, state, _ = stage1_and_stage2
  config = config.copy_and_resolve_references()
  config.data.eval_split = 'train'
  config.data.data_dir = str(tmp_path)  # a fresh statistics cache (the dataset is rebuilt here)
  task = stage2.Stage2Task(config)
  mesh = jax.make_mesh((8, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  layout = trainer.create_layout(task, config, mesh)
  params = jax.device_put(state.ema_params, layout.shardings.params)
  context = task_lib.EvalContext(
      graphdef=layout.graphdef,
      params=params,
      frozen=None,
      sources=trainer.prepare_data(task),
      step=RESUME_STEPS,
      workdir=stage2_dir,
      mesh=mesh,
  )
  for network, frames in ((frechet.FID, 1), (frechet.FVD, 12)):
    name = f'r{network.name}'
    first = tok_evaluation.evaluate_frechet(network, task, context)
    assert first[name] > 0 and first[f'baseline_{name}'] > 0, first
    protocol = first[f'{network.name}_protocol']
    assert protocol['clips'] >= 2 and protocol['split'] == 'train'
    assert protocol['network_frames'] == frames and protocol['features'] == network.protocol
  # The second evaluation reads the cached statistics of the real clips: the same numbers.
  second = tok_evaluation.evaluate_frechet(network, task, context)
  assert second[name] == pytest.approx(first[name], rel=1e-9)
  assert second[f'baseline_{name}'] == pytest.approx(first[f'baseline_{name}'], rel=1e-9)
  cache = sorted(os.listdir(os.path.join(str(tmp_path), 'feature_statistics')))
  names = [c.split('-train-')[0] for c in cache]
  assert names == [f'fid-{config.data.name}', f'fvd-{config.data.name}']
