"""Context parallelism (vitok/nn/context_parallel.py): one clip's tokens split over a 'context'
mesh axis. Both attention schemes equal plain attention in values and gradients; the ring never
holds the whole score matrix (compiled memory); token and head counts that do not split are
refused in one line; the whole train step of both model families on 2 x 4 (data x context) and
2 x 2 x 2 (data x fsdp x context) meshes, in float32 and bfloat16, trains as one device does; and
a context-parallel run's checkpoint resumes on a mesh without the axis and back."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from training_equality import assert_same_training, perturbed

from configs import common as common_config
from configs import vitok as vitok_config
from vitok.core import checkpoint as ckpt_lib
from vitok.core import sharding, trainer
from vitok.core import train_state as ts
from vitok.core.config_checks import ConfigError
from vitok.nn import attention as attention_lib
from vitok.nn import context_parallel
from vitok.tokenizer import stage1

RULES = (('batch', 'data'), ('act_length', 'context'), ('act_heads', 'model'))
MESH_2X4 = ((2, 4), ('data', 'context'))
MESH_2X2X2 = ((2, 2, 2), ('data', 'fsdp', 'context'))


def _mesh(shape, axes):
  devices = jax.devices()[: int(np.prod(shape))]
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _qkv(length, heads, dtype, batch=2, head_dim=8):
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, length, heads, head_dim)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


def _context_attention(mesh, scheme, kernel=attention_lib.dense_attention):
  def attend(q, k, v):
    with sharding.activation_sharding(mesh, RULES):
      return context_parallel.attention(q, k, v, kernel, scheme)

  return attend


@pytest.mark.parametrize('scheme', context_parallel.SCHEMES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_both_schemes_equal_attention_in_values_and_gradients(scheme, dtype):
  q, k, v, d_out = _qkv(32, 4, dtype)
  mesh = _mesh(*MESH_2X4)  # 8 tokens per device

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out)

  expected = jax.value_and_grad(loss(attention_lib.dense_attention), (0, 1, 2))
  got = jax.jit(jax.value_and_grad(loss(_context_attention(mesh, scheme)), (0, 1, 2)))
  exact = lambda a: np.asarray(a.astype(jnp.float32))
  # The reference in float32 from the same (rounded) inputs; bfloat16 outputs carry 8 bits.
  reference = jax.tree.map(exact, expected(*(x.astype(jnp.float32) for x in (q, k, v))))
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(got(q, k, v)), jax.tree.leaves(reference)):
    scale = float(np.max(np.abs(b)))
    np.testing.assert_allclose(exact(a), b, atol=tolerance * scale, rtol=tolerance)
  out = jax.jit(_context_attention(mesh, scheme))(q, k, v)
  assert out.dtype == dtype and out.sharding.spec == P('data', 'context')


def test_the_ring_folds_several_padded_key_blocks_per_device():
  # 600 tokens per device: a block of 512 keys and a padded one of 88, from each of 4 devices
  # in turn (around a ring of 4, where sending left and right differ).
  q, k, v, d_out = _qkv(2400, 2, jnp.float32, batch=1)
  mesh = _mesh((1, 4), ('data', 'context'))
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * d_out)
  expected = jax.value_and_grad(loss(attention_lib.dense_attention), (0, 1, 2))(q, k, v)
  got = jax.jit(jax.value_and_grad(loss(_context_attention(mesh, 'ring')), (0, 1, 2)))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=1e-5)


def test_ring_attention_never_holds_the_score_matrix():
  heads, context = 4, 4
  mesh = _mesh((1, context), ('data', 'context'))

  def temp_bytes(scheme, length):
    q, k, v, _ = _qkv(length, heads, jnp.float32, batch=1, head_dim=16)
    loss = lambda q, k, v: jnp.sum(_context_attention(mesh, scheme)(q, k, v))
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ring = [temp_bytes('ring', n) for n in (4096, 8192)]
  gathered = [temp_bytes('all_to_all', n) for n in (4096, 8192)]
  # Forward and backward per device grow linearly with the clip for the ring (measured 37 and 74
  # MiB) and quadratically when a device holds whole score matrices (all-to-all around the plain
  # kernel: 256 and 1024 MiB), so the measure can tell the two apart.
  assert ring[1] / ring[0] < 2.5 and gathered[1] / gathered[0] > 3.5, (ring, gathered)
  # At 8192 tokens the ring holds less than half of one device's rows of scores (float32).
  rows = (8192 // context) * 8192 * heads * 4
  assert ring[1] < rows / 2, (ring, rows)


def test_tokens_or_heads_that_do_not_split_are_refused_in_one_line():
  mesh = _mesh(*MESH_2X4)
  q, k, v, _ = _qkv(30, 4, jnp.float32)
  with pytest.raises(ValueError, match=r"30 tokens per clip do not split evenly over the mesh's "
                     r'context=4 axis'):  # fmt: skip
    jax.eval_shape(_context_attention(mesh, 'ring'), q, k, v)
  q, k, v, _ = _qkv(32, 2, jnp.float32)
  with pytest.raises(ValueError, match=r"2 heads per device.*use model.context_attention='ring'"):
    jax.eval_shape(_context_attention(mesh, 'all_to_all'), q, k, v)
  # Outside a context mesh the caller's kernel runs as usual.
  assert context_parallel.attention(q, k, v, attention_lib.dense_attention, 'ring') is None
  # Training and launch.plan check every attention stack at start-up, before compiling.
  task, config, _ = _tokenizer('float32')  # 4 heads, 32 tokens
  with pytest.raises(ConfigError, match=r'4 heads per device of the encoder, which do not split '
                     r"over the mesh's context=8 axis"):  # fmt: skip
    trainer.check_context_split(task, config, _mesh((1, 8), ('data', 'context')))
  config.model.context_attention = 'ring'
  task = stage1.TokenizerTask(config)
  trainer.check_context_split(task, config, _mesh((1, 8), ('data', 'context')))  # any heads
  with pytest.raises(ConfigError, match=r'32 tokens per clip of the encoder do not split evenly'):
    trainer.check_context_split(task, config, jax.make_mesh((1, 3), ('data', 'context'),
                                axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:3]))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The whole train step of both families.
# ----------------------------------------------------------------------------------------------


def _layout(task, config, mesh_spec):
  shape, axes = mesh_spec
  config.mesh.update(shape=shape, axes=axes)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[: int(np.prod(shape))])
  return trainer.create_layout(task, config, mesh)


def _frozen(task, mesh):
  """What the loss reads besides the batch. A DiT on cached latents reads only their statistics
  (not the frozen tokenizer, whose random initialisation would cost seconds here)."""
  abstract = task.abstract_frozen(mesh)
  if 'stats' not in abstract:
    return task.frozen(mesh)
  latents = task.latents
  stats = {'mean': latents.channel_mean, 'std': latents.channel_std}
  stats = {k: np.asarray(v, np.float32) for k, v in stats.items()}
  return {'stats': sharding.place(stats, abstract['stats'])}


def _loss_and_gradients(task, config, mesh_spec, batch):
  """The train step's loss and gradients at the (perturbed) initial state on `mesh_spec`."""
  layout = _layout(task, config, mesh_spec)
  state = perturbed(layout.init())
  frozen = _frozen(task, layout.mesh)
  batch = trainer.global_batch(batch, sharding.batch_sharding(layout.mesh, config.sharding_rules))

  def loss(params):
    model = nnx.merge(layout.graphdef, params)
    rng = jax.random.fold_in(state.rng, state.step)  # as the train step draws its noise
    return task.loss_fn(model, batch, rng, frozen, state.step)[0]

  with sharding.activation_sharding(layout.mesh, config.sharding_rules):
    value, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  return float(value), jax.device_get(grads)


def gradient_differences(grads, reference) -> dict[str, float]:
  """Per parameter array: ||g - g_ref|| / ||g_ref||."""
  out = {}
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference)):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    out[jax.tree_util.keystr(path)] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
  return out


def _tokenizer(dtype, scheme='all_to_all'):
  """The tiny tokenizer (4 heads, 2 x 4 x 4 tokens per clip), its task and a batch."""
  config = vitok_config.get_config('variant=cpu128-cpu128/2x8,channels=4,frames=4,res=32,batch=8')
  config.loss.lpips = 0.0
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  config.model.update(dtype=dtype, context_attention=scheme)
  rng = np.random.default_rng(0)
  video = rng.integers(0, 255, (8, 4, 32, 32, 3)).astype(np.uint8)
  return stage1.TokenizerTask(config), config, {'video': video, 'label': np.zeros(8, np.int32)}


@pytest.fixture(scope='module')
def dit_cache(tmp_path_factory):
  from test_dit_task import _write_cache

  from dit import latents as latents_lib

  directory = str(tmp_path_factory.mktemp('latents'))
  _write_cache(directory)
  source = latents_lib.LatentSource(directory, 'train')
  return directory, {
      k: np.stack([source[i][k] for i in range(8)]) for k in ('mean', 'logvar', 'label')
  }


def _dit(cache, dtype, scheme='all_to_all', mixer='attention'):
  """The tiny DiT of tests/test_dit_task.py (DiT-cpu64: 2 heads, 1 x 4 x 4 tokens per clip);
  MATE with 1 x 2 x 2 windows and chunks of 4 tokens, so that every part of the mixer runs."""
  from test_dit_task import _config

  from launch import tasks

  config = _config(cache[0], 'ddpm')  # with the learned variance and its VB term
  config.model.update(dtype=dtype, context_attention=scheme or 'all_to_all', mixer=mixer)
  if mixer == 'mate':
    config.model.update(window='1,2,2', ssd_chunk=4, ssd_state=8)
  return tasks.make_task(config), config, cache[1]


ONE_DEVICE = ((1, 1), ('data', 'fsdp'))
# Per array ||g - g_ref|| / ||g_ref||: (largest, median). Measured against one device on this
# CPU: float32 at most 9e-6 (both families, both schemes); bfloat16 tokenizer median 0.03-0.05,
# largest 0.09-0.12, which is what data x fsdp sharding without a context axis gives too
# (0.027 / 0.088); bfloat16 DiT 0.003 / 0.005. A wrong token, head or shard is of order 1.
GRADIENT_TOLERANCE = {'float32': (1e-4, 1e-4), 'bfloat16': (0.35, 0.12)}


@pytest.mark.parametrize(
    'family,scheme,mesh_spec,dtype',
    [
        # Between them the cases cover both schemes, both meshes and both dtypes per family.
        ('tokenizer', 'all_to_all', MESH_2X4, 'float32'),
        ('tokenizer', 'ring', MESH_2X2X2, 'bfloat16'),
        ('dit', 'ring', MESH_2X4, 'float32'),  # 2 heads: all-to-all cannot split them 4 ways
        ('dit', 'all_to_all', MESH_2X2X2, 'bfloat16'),
        # MATE: heads over 'model' and, with no sequence-parallel scan yet, its tokens over
        # 'context' through XLA's partitioner.
        ('dit_mate', None, ((2, 2, 2), ('data', 'model', 'context')), 'float32'),
    ],
)
def test_a_context_parallel_train_step_has_the_loss_and_gradients_of_one_device(
    dit_cache, family, scheme, mesh_spec, dtype
):
  make = {
      'tokenizer': _tokenizer,
      'dit': functools.partial(_dit, dit_cache),
      'dit_mate': functools.partial(_dit, dit_cache, mixer='mate'),
  }[family]
  task, config, batch = make(dtype)
  reference_loss, reference = _loss_and_gradients(task, config, ONE_DEVICE, batch)
  task, config, batch = make(dtype, scheme)
  loss, grads = _loss_and_gradients(task, config, mesh_spec, batch)
  assert loss == pytest.approx(reference_loss, rel=1e-5 if dtype == 'float32' else 1e-3)
  largest, median = GRADIENT_TOLERANCE[dtype]
  differences = gradient_differences(grads, reference)
  worst = max(differences, key=differences.get)
  assert differences[worst] <= largest, (worst, differences[worst])
  assert np.median(list(differences.values())) <= median


def test_a_context_parallel_run_resumes_without_the_axis_and_back(dit_cache, tmp_path):
  """Two train steps on data x context (ring), saved; restored on one device (no context axis)
  for a third step, saved; restored on data x context for a fourth: the same training as four
  steps on one device (optimizer and EMA included)."""
  task, config, host_batch = _dit(dit_cache, 'float32', 'ring')
  runs = {}
  for name, mesh_spec in (('one', ONE_DEVICE), ('context', MESH_2X4)):
    layout = _layout(task, config.copy_and_resolve_references(), mesh_spec)
    frozen = _frozen(task, layout.mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            frozen)  # fmt: skip
    step = ts.compile_train_step(
        layout, task.loss_fn, config.optim.ema_decay, task.abstract_batch(), abstract
    )
    batch = sharding.batch_sharding(layout.mesh, config.sharding_rules)
    batch = trainer.global_batch(host_batch, batch)
    runs[name] = (layout, lambda s, step=step, b=batch, f=frozen: step(s, b, f)[0])
  (one, one_step), (context, context_step) = runs['one'], runs['context']
  initial = jax.device_get(one.init())
  state = context_step(context_step(jax.device_put(initial, context.shardings)))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  for number, (target, step) in ((2, (one, one_step)), (3, (context, context_step))):
    checkpointer.save(number, state)
    checkpointer.wait()
    saved = jax.device_get(state)
    state = checkpointer.restore(target.abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved)
    for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(target.shardings)):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
    state = step(state)
  checkpointer.close()
  reference = jax.device_put(initial, one.shardings)
  for _ in range(4):
    reference = one_step(reference)
  assert int(state.step) == 4
  assert_same_training(state, reference, initial)


def test_the_context_shortcut_and_the_long_video_preset():
  from configs import dit as dit_config
  from launch import tasks

  config = vitok_config.get_config('ucf101,context=4')
  assert (config.mesh.shape, config.mesh.axes) == ((-1, 1, 4), ('data', 'fsdp', 'context'))
  config = vitok_config.get_config('ucf101,context=4,context=2,mesh=2x2x2')  # replaced, then set
  assert (config.mesh.shape, config.mesh.axes) == ((2, 2, 2), ('data', 'fsdp', 'context'))
  with pytest.raises(ValueError, match='context=0: takes a positive size'):
    vitok_config.get_config('ucf101,context=0')
  config = dit_config.get_config('long_video')
  assert (config.mesh.shape, config.mesh.axes) == ((-1, 1, 8), ('data', 'fsdp', 'context'))
  task = tasks.make_task(config)
  assert task.model_cfg.grid == (288, 16, 16)  # 73,728 tokens, 8 x 9,216
  # Its DiT (16 heads) gathers heads all-to-all; its frozen tokenizer (12) uses the ring.
  trainer.check_context_split(task, config, _mesh((1, 8), ('data', 'context')))
  config.tokenizer.context_attention = 'all_to_all'
  with pytest.raises(ConfigError, match='12 heads per device of the frozen tokenizer encoder'):
    trainer.check_context_split(tasks.make_task(config), config, _mesh((1, 8), ('data', 'context')))
  config = dit_config.get_config('long_video')
  config.mesh.dcn_shape = (2, 1, 1)
  common_config.add_context_axis(config, 4)  # a multi-slice layout gets no slices along context
  assert tuple(config.mesh.dcn_shape) == (2, 1, 1) and tuple(config.mesh.shape) == (-1, 1, 4)
