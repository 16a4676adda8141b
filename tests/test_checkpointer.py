"""Checkpointer unit tests (fast, CPU, 8 simulated devices): resharding restores, keep-last plus
keep-best retention, the data iterator in the checkpoint, params-only restores and exports."""

import gc
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from vitok import checkpoint as ckpt_lib
from vitok import train_state as ts


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', 'mlp'))
    self.up = nnx.Linear(16, 32, kernel_init=init, rngs=rngs)
    self.down = nnx.Linear(32, 8, kernel_init=init, rngs=rngs)


def _mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _shardings(tree, mesh):
  """Matrices split over 'fsdp' on their first axis; everything else replicated."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, P('fsdp', None) if x.ndim == 2 else P()), tree)


def _state(ema=True, seed=0, mesh=None):
  with nnx.use_eager_sharding(False):
    model = _Tiny(nnx.Rngs(seed))
  tx = optax.adamw(1e-3)
  _, state = ts.init_train_state(model, tx, jax.random.PRNGKey(seed + 1), ema=ema)
  # Non-trivial values everywhere (moments, EMA and step differ from their init).
  state = state.replace(
      step=jnp.asarray(7 + seed, jnp.int32),
      opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, state.opt_state),
      ema_params=None if not ema else jax.tree.map(lambda x: 0.5 * x + 1.0, state.ema_params))
  mesh = mesh or _mesh((2, 4))
  return jax.device_put(state, _shardings(state, mesh))


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))


def _assert_shardings(tree, shardings):
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def test_save_on_one_mesh_restore_on_another_mesh_and_on_one_device(tmp_path):
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(1, state)
  checkpointer.wait()
  assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]

  other = _shardings(state, _mesh((1, 8)))
  restored = checkpointer.restore(ckpt_lib.abstract_like(state, other))
  assert _equal(restored, state)
  _assert_shardings(restored, other)
  assert restored.params['up']['kernel'].value.sharding.spec == P('fsdp', None)

  one = SingleDeviceSharding(jax.devices()[5])
  restored = checkpointer.restore(ckpt_lib.abstract_like(state, one), step=1)
  assert _equal(restored, state)
  assert all(x.sharding == one for x in jax.tree.leaves(restored))
  checkpointer.close()


@pytest.mark.parametrize('mode', ['max', 'min'])
def test_keep_last_plus_keep_best(tmp_path, mode):
  psnr = [10, 30, 20, 15, 12] if mode == 'max' else [30, 10, 20, 25, 28]
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_mode=mode)
  for step, value in enumerate(psnr, start=1):
    checkpointer.save(step, state, metrics={'psnr': np.float32(value), 'split': 'test'})
  # A save without metrics is governed by keep-last only; one without the metric likewise.
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 4, 5] and checkpointer.best_step() == 2
  checkpointer.save(6, state)
  checkpointer.save(7, state, metrics={'ssim': 0.9})
  checkpointer.close()
  assert _steps(str(tmp_path)) == [2, 6, 7]

  # The ranking survives a restart (the metrics are stored with each checkpoint).
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_mode=mode)
  assert checkpointer.all_steps() == [2, 6, 7] and checkpointer.best_step() == 2
  assert checkpointer.latest_step() == 7
  checkpointer.save(8, state, metrics={'psnr': 40 if mode == 'max' else 1})
  checkpointer.close()
  assert _steps(str(tmp_path)) == [7, 8]


def test_best_step_is_none_without_metrics(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1)
  assert checkpointer.latest_step() is None and checkpointer.best_step() is None
  checkpointer.save(1, _state())
  checkpointer.wait()
  assert checkpointer.best_step() is None
  checkpointer.close()


def _data():
  return grain.MapDataset.range(100).shuffle(seed=0).map(lambda x: x * 2).batch(4)


def test_data_iterator_round_trip(tmp_path):
  state = _state()
  it = iter(_data().to_iter_dataset())
  for _ in range(3):
    next(it)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(3, state, data_iterator=it)
  expected = [next(it) for _ in range(2)]    # the uninterrupted continuation
  checkpointer.close()

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  fresh = iter(_data().to_iter_dataset())
  restored = checkpointer.restore(ckpt_lib.abstract_like(state), data_iterator=fresh)
  assert checkpointer.last_restore_had_data and _equal(restored, state)
  for batch in expected:
    np.testing.assert_array_equal(next(fresh), batch)

  # A checkpoint saved without an iterator restores the state and leaves the iterator alone.
  checkpointer.save(4, state)
  checkpointer.wait()
  untouched = iter(_data().to_iter_dataset())
  next(untouched)
  position = untouched.get_state()
  restored = checkpointer.restore(ckpt_lib.abstract_like(state), data_iterator=untouched)
  assert not checkpointer.last_restore_had_data and _equal(restored, state)
  assert untouched.get_state() == position
  # Restoring step 3 without an iterator ignores its data item.
  assert _equal(checkpointer.restore(ckpt_lib.abstract_like(state), step=3), state)
  assert not checkpointer.last_restore_had_data
  checkpointer.close()

  # Iterator state written by another process count is not applied.
  data = tmp_path / 'checkpoints' / '3' / 'data'
  (data / 'process_0-of-1.json').rename(data / 'process_0-of-2.json')
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  restored = checkpointer.restore(ckpt_lib.abstract_like(state), step=3, data_iterator=untouched)
  assert not checkpointer.last_restore_had_data and untouched.get_state() == position
  checkpointer.close()


def test_restore_params_and_ema_onto_another_sharding(tmp_path):
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(2, state)
  other = _shardings(state.params, _mesh((1, 8)))
  abstract = ckpt_lib.abstract_like(state.params, other)   # no optimizer state needed
  params = checkpointer.restore_params(abstract)            # waits for the pending save
  assert _equal(params, state.params)
  _assert_shardings(params, other)
  ema = checkpointer.restore_params(abstract, step=2, ema=True)
  assert _equal(ema, state.ema_params) and not _equal(ema, state.params)
  _assert_shardings(ema, other)
  # The restored params plug straight back into the model.
  with nnx.use_eager_sharding(False):
    graphdef, _ = nnx.split(_Tiny(nnx.Rngs(9)), nnx.Param)
  model = nnx.merge(graphdef, params)
  assert model.down(model.up(jnp.ones((1, 16)))).shape == (1, 8)

  no_ema = _state(ema=False, seed=1)
  checkpointer.save(3, no_ema)
  assert _equal(checkpointer.restore_params(abstract, step=3), no_ema.params)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'step 3 .*no EMA'):
    checkpointer.restore_params(abstract, ema=True)
  # A mismatching target (another model config) names the step and path.
  replicated = NamedSharding(_mesh((1, 8)), P())
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype), abstract)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'step 3 from .*checkpoints/3'):
    checkpointer.restore_params(ckpt_lib.abstract_like(wrong, replicated))
  gc.collect()   # a failed Orbax read leaves un-awaited coroutines behind (a harmless warning)
  # A target without shardings is refused (Orbax would silently return the saved shape).
  with pytest.raises(ValueError, match='no target sharding'):
    checkpointer.restore_params(wrong)
  checkpointer.close()


def test_export_and_load_params(tmp_path):
  state = _state()
  directory = str(tmp_path / 'export')
  ckpt_lib.export_params(state.ema_params, directory)
  one = SingleDeviceSharding(jax.devices()[0])
  loaded = ckpt_lib.load_params(directory, ckpt_lib.abstract_like(state.params, one))
  assert _equal(loaded, state.ema_params)
  assert all(x.sharding == one for x in jax.tree.leaves(loaded))
  # Exporting again replaces the previous export.
  ckpt_lib.export_params(state.params, directory)
  other = _shardings(state.params, _mesh((1, 8)))
  loaded = ckpt_lib.load_params(directory, ckpt_lib.abstract_like(state.params, other))
  assert _equal(loaded, state.params)
  _assert_shardings(loaded, other)
  with pytest.raises(ckpt_lib.CheckpointError, match='could not load parameters from'):
    ckpt_lib.load_params(str(tmp_path / 'missing'), ckpt_lib.abstract_like(state.params))


def test_unreadable_metrics_do_not_prevent_opening(tmp_path):
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, keep_best=1)
  checkpointer.save(1, state, metrics={'psnr': 20.0})
  checkpointer.save(2, state, metrics={'psnr': 25.0})
  checkpointer.close()
  with open(tmp_path / 'checkpoints' / '2' / 'metrics' / 'metrics', 'w') as f:
    f.write('not json')
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, keep_best=1)
  assert checkpointer.all_steps() == [1, 2] and checkpointer.best_step() == 1
  assert _equal(checkpointer.restore(ckpt_lib.abstract_like(state)), state)
  checkpointer.close()
