"""Meshes, logical-axis rules and the sharded train step on 8 simulated CPU devices: the step
gives the single-device result on every mesh, FSDP divides parameter and optimizer memory,
parameters are born sharded, and the remat / attention knobs behave."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from training_equality import assert_same_training, training_differences

from configs import common as common_config
from configs import vitok as vitok_config
from vitok.core import perf, sharding, trainer
from vitok.core import train_state as ts
from vitok.nn import layers
from vitok.tokenizer import model as tokenizer
from vitok.tokenizer import stage1

RULES = common_config.SHARDING_RULES


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes each device holds of the (sharded) arrays in `tree`: device id -> bytes."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def _mesh_cfg(shape, axes=('data', 'fsdp')):
  return ml_collections.ConfigDict(dict(shape=shape, axes=axes))


def test_mesh_fills_minus_one_and_names_both_numbers_when_it_does_not_fit():
  assert sharding.mesh_shape(_mesh_cfg((-1, 2)), 8) == ((4, 2), ('data', 'fsdp'))
  assert sharding.mesh_shape(_mesh_cfg('2x4'), 8) == ((2, 4), ('data', 'fsdp'))
  with pytest.raises(ValueError, match=r'config.mesh.shape=\(2, 2\) needs 4 devices but 8 are'):
    sharding.mesh_shape(_mesh_cfg((2, 2)), 8)
  with pytest.raises(ValueError, match=r'cannot fill 8 devices: 8 is not divisible by 3'):
    sharding.mesh_shape(_mesh_cfg((-1, 3)), 8)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.mesh_shape(_mesh_cfg((-1, -1)), 8)
  with pytest.raises(ValueError, match='same'):
    sharding.mesh_shape(_mesh_cfg((8,)), 8)
  mesh = sharding.make_mesh(_mesh_cfg((2, 4)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}


def test_logical_rules_drop_absent_axes_and_axes_that_do_not_divide():
  mesh = sharding.make_mesh(_mesh_cfg((2, 4)))
  assert sharding.logical_to_spec(('batch', 'act_length', 'act_embed'), RULES, mesh) == P(
      ('data', 'fsdp')
  )
  # 'mlp' -> 'model', which a data x fsdp mesh lacks: replicated.
  assert sharding.logical_to_spec(('embed', 'mlp'), RULES, mesh, (128, 682)) == P('fsdp')
  # 341 is not divisible by fsdp=4: that dimension stays whole rather than padded.
  assert sharding.logical_to_spec(('mlp', 'embed'), RULES, mesh, (341, 128)) == P(None, 'fsdp')
  assert sharding.logical_to_spec(('embed',), RULES, mesh, (6,)) == P()
  # A mesh axis shards at most one dimension.
  assert sharding.logical_to_spec(('embed', 'embed'), RULES, mesh, (8, 8)) == P('fsdp')
  tp = sharding.make_mesh(_mesh_cfg((4, 2), ('data', 'model')))
  assert sharding.logical_to_spec(('embed', 'mlp'), RULES, tp, (128, 682)) == P(None, 'model')
  assert sharding.batch_sharding(tp, RULES).spec == P('data')
  assert sharding.data_parallel_size(tp, RULES) == 4


def _tiny_config(**model):
  config = vitok_config.get_config('variant=cpu128-cpu128/2x8,channels=4,frames=4,res=32,batch=8')
  config.loss.lpips = 0.0  # LPIPS is tested elsewhere; it only adds compile time here
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  config.model.update(model)
  return config


def _batch():
  rng = np.random.default_rng(0)
  return {
      'video': rng.integers(0, 255, (8, 4, 32, 32, 3)).astype(np.uint8),
      'label': np.zeros(8, np.int32),
  }


def _run_steps(config, mesh_shape, axes=('data', 'fsdp'), steps=2, batch=None):
  config = config.copy_and_resolve_references()
  config.mesh.shape, config.mesh.axes = mesh_shape, axes
  task = stage1.TokenizerTask(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: int(np.prod(mesh_shape))])
  layout = trainer.create_layout(task, config, mesh)
  state = layout.init()
  step = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), {}
  )
  batch = trainer.global_batch(
      _batch() if batch is None else batch, sharding.batch_sharding(mesh, config.sharding_rules)
  )
  for _ in range(steps):
    state, metrics = step(state, batch, {})
  return layout, state, metrics


@pytest.fixture(scope='module')
def single_device_run():
  layout, state, metrics = _run_steps(_tiny_config(), (1, 1))
  return layout, state, metrics, jax.device_get(layout.init())


@pytest.mark.parametrize(
    'mesh_shape,axes',
    [
        ((2, 4), ('data', 'fsdp')),
        ((4, 2), ('data', 'fsdp')),
        ((4, 2), ('data', 'model')),
    ],
)
def test_sharded_step_equals_single_device_step(single_device_run, mesh_shape, axes):
  _, reference, ref_metrics, initial = single_device_run
  layout, state, metrics = _run_steps(_tiny_config(), mesh_shape, axes)
  # The state lives where the layout says (parameters, moments and EMA), and stays there.
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(layout.shardings)):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  qkv = state.params['encoder']['blocks'][0]['attn']['qkv']['kernel']
  if 'model' in axes:  # tensor parallel: each device holds whole heads' q, k and v
    assert qkv.sharding.spec == P(None, None, 'model')
    # The 341 MLP units of width 128 do not split in two: reported, and left whole.
    whole = sharding.undivided(layout.abstract.params, layout.mesh, RULES)
    assert any('mlp/down/kernel dim 0 (341) over model' in w for w in whole)
  else:
    assert qkv.sharding.spec == P('fsdp')
  np.testing.assert_allclose(float(metrics['loss']), float(ref_metrics['loss']), rtol=1e-5)
  assert_same_training(state, reference, initial)


def test_training_comparison_rejects_wrong_rows_and_wrong_shards(single_device_run):
  # What the multi-process and sharded equality tests must catch. Wrong rows: a process that reads
  # another process's rows (or skips the gradient all-reduce) trains on half of the batch's clips.
  _, reference, _, initial = single_device_run
  batch = _batch()
  batch['video'][4:] = batch['video'][:4]
  _, wrong_rows, _ = _run_steps(_tiny_config(), (2, 4), batch=batch)
  per_array, total = training_differences(wrong_rows, reference, initial)
  assert total > 0.1 and np.median([d for _, d in per_array]) > 0.1, (total, per_array)
  with pytest.raises(AssertionError, match='the runs differ'):
    assert_same_training(wrong_rows, reference, initial)
  # A wrong shard: the two halves of one kernel swapped (e.g. shards placed on the wrong devices).
  swapped = jax.tree.map(np.array, jax.device_get(reference))  # writable copies
  kernel = swapped.params['decoder']['blocks'][1]['mlp']['down']['kernel']
  kernel[...] = np.roll(np.asarray(kernel[...]), kernel.shape[0] // 2, axis=0)
  with pytest.raises(AssertionError, match=r"\['down'\]\['kernel'\]"):
    assert_same_training(swapped, reference, initial)


def test_fsdp_divides_parameter_and_optimizer_memory_by_the_device_count():
  config = _tiny_config()
  task = stage1.TokenizerTask(config)
  config.mesh.shape = (1, 8)
  layout = trainer.create_layout(task, config, sharding.make_mesh(config.mesh))
  state = layout.init()
  # Born sharded: every array already has its target sharding, no full replica was placed.
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(layout.shardings)):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  kernel = state.params['decoder']['blocks'][0]['attn']['qkv']['kernel']
  assert kernel.sharding.spec == P('fsdp')
  assert kernel.addressable_shards[0].data.shape == (16, 3, 4, 32)  # (width/8, q|k|v, heads, dim)

  heavy = (state.params, state.opt_state, state.ema_params)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(heavy))
  per_device = bytes_per_device(heavy)
  assert len(per_device) == 8
  # 1/8 of the bytes, plus the small LayerNorm / latent-projection arrays kept whole.
  assert max(per_device.values()) <= 1.1 * total / 8
  assert sharding.abstract_bytes_per_device(layout.abstract, layout.shardings) == max(
      bytes_per_device(state).values()
  )

  config.mesh.shape = (8, 1)  # pure data parallelism: every device holds everything
  replicated = trainer.create_layout(task, config, sharding.make_mesh(config.mesh))
  assert sharding.abstract_bytes_per_device(
      replicated.abstract.params, replicated.shardings.params
  ) == sum(x.size * 4 for x in jax.tree.leaves(replicated.abstract.params))


def test_constrain_is_a_no_op_without_a_mesh_and_shards_inside_one():
  x = jnp.ones((8, 4, 16))
  assert sharding.constrain(x, layers.TOKENS) is x
  mesh = sharding.make_mesh(_mesh_cfg((2, 4)))

  @jax.jit
  def f(y):
    return sharding.constrain(y * 2, layers.TOKENS)

  with sharding.activation_sharding(mesh, RULES):
    out = f(x)
  assert out.sharding.spec == P(('data', 'fsdp'))


def _loss_and_grads(remat: str):
  cfg = tokenizer.TokenizerConfig(variant='cpu128-cpu128/2x8', channels=4, remat=remat)
  model = tokenizer.ViTok(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  video = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 32, 32, 3), minval=-1, maxval=1)

  def loss(p):
    recon, _, _ = nnx.merge(graphdef, p)(video)
    return jnp.mean(jnp.square(recon - video))

  fn = jax.jit(jax.value_and_grad(loss))
  return fn(params), fn.lower(params).compile()


def test_remat_policies_give_the_same_gradients_and_full_remat_saves_memory():
  (loss_none, grads_none), compiled_none = _loss_and_grads('none')
  for policy in ('full', 'save_matmuls'):
    (loss, grads), compiled = _loss_and_grads(policy)
    np.testing.assert_allclose(float(loss), float(loss_none), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_none), jax.tree.leaves(grads)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    if policy == 'full':
      assert (
          perf.compiled_stats(compiled)['temp_bytes']
          < perf.compiled_stats(compiled_none)['temp_bytes']
      )


def test_attention_and_remat_settings_are_checked_at_start_up():
  with pytest.raises(ValueError, match='model.remat'):
    tokenizer.TokenizerConfig(remat='some')
  with pytest.raises(ValueError, match='model.attention'):
    tokenizer.TokenizerConfig(attention='flash')
  with pytest.raises(ValueError, match="model.dtype='bfloat16'"):
    tokenizer.TokenizerConfig(attention='cudnn')
  config = _tiny_config(attention='cudnn', dtype='bfloat16')
  with pytest.raises(ValueError, match=r"model.attention='cudnn' needs an NVIDIA GPU.*'cpu'"):
    stage1.TokenizerTask(config)
  with pytest.raises(ValueError, match=r"model.attention='pallas_tpu' needs a TPU.*'cpu'"):
    stage1.TokenizerTask(_tiny_config(attention='pallas_tpu'))
  from configs import dit as dit_config
  from dit import task as dit_task

  dit = dit_config.get_config('demo')
  dit.model.update(num_classes=10, attention='pallas_tpu')
  with pytest.raises(ValueError, match=r"model.attention='pallas_tpu' needs a TPU.*'cpu'"):
    dit_task.DiTTask(dit)


def test_compiled_flops_match_the_analytic_model_flops():
  # Without LPIPS the step is the tokenizer's forward + backward: XLA's count (which also has
  # softmax, norms, Adam) is within a few percent above 6 x MACs.
  config = _tiny_config()
  config.mesh.shape = (2, 4)
  task = stage1.TokenizerTask(config)
  layout = trainer.create_layout(task, config, sharding.make_mesh(config.mesh))
  compiled = ts.compile_train_step(
      layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), {}
  )
  report = trainer.compile_report(task, config, layout, compiled)
  assert report['analytic_flops'] == task.train_flops_per_clip() * 8 / 8
  assert 1.0 <= report['flops'] / report['analytic_flops'] < 1.25, report
