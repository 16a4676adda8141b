"""Checkpointer unit tests (fast, CPU, 8 simulated devices): resharding restores, keep-last plus
keep-best retention, the data iterator in the checkpoint, params-only restores and exports, damage
detection. The end-to-end resume tests (training runs, signals) are in test_resume_end_to_end.py."""

import asyncio
import gc
import json
import logging
import os
import shutil
import traceback

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from vitok.core import checkpoint as ckpt_lib
from vitok.core import export, manifest, orbax_quirks
from vitok.core import train_state as ts


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', 'mlp'))
    self.up = nnx.Linear(16, 32, kernel_init=init, rngs=rngs)
    self.down = nnx.Linear(32, 8, kernel_init=init, rngs=rngs)


def _mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _shardings(tree, mesh):
  """Matrices split over 'fsdp' on their first axis; everything else replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P('fsdp', None) if x.ndim == 2 else P()), tree)


def _state(ema=True, seed=0, mesh=None):
  with nnx.use_eager_sharding(False):
    model = _Tiny(nnx.Rngs(seed))
  tx = optax.adamw(1e-3)
  _, state = ts.init_train_state(model, tx, jax.random.PRNGKey(seed + 1), ema=ema)
  # Non-trivial values everywhere (moments, EMA and step differ from their init).
  state = state.replace(
      step=jnp.asarray(7 + seed, jnp.int32),
      opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, state.opt_state),
      ema_params=None if not ema else jax.tree.map(lambda x: 0.5 * x + 1.0, state.ema_params),
  )
  mesh = mesh or _mesh((2, 4))
  return jax.device_put(state, _shardings(state, mesh))


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  return all(
      x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


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
  assert checkpointer.all_steps() == [2, 4, 5]
  checkpointer.save(6, state)
  checkpointer.save(7, state, metrics={'ssim': 0.9})
  checkpointer.close()
  assert _steps(str(tmp_path)) == [2, 6, 7]

  # The ranking survives a restart (the metrics are stored with each checkpoint).
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1, best_mode=mode)
  assert checkpointer.all_steps() == [2, 6, 7]
  assert checkpointer.latest_step() == 7
  checkpointer.save(8, state, metrics={'psnr': 40 if mode == 'max' else 1})
  checkpointer.close()
  assert _steps(str(tmp_path)) == [7, 8]


def _data():
  return grain.MapDataset.range(100).shuffle(seed=0).map(lambda x: x * 2).batch(4)


def test_data_iterator_round_trip(tmp_path):
  state = _state()
  it = iter(_data().to_iter_dataset())
  for _ in range(3):
    next(it)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(3, state, data_iterator=it)
  expected = [next(it) for _ in range(2)]  # the uninterrupted continuation
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
  abstract = ckpt_lib.abstract_like(state.params, other)  # no optimizer state needed
  params = checkpointer.restore_params(abstract)  # waits for the pending save
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
  # A mismatching target (another model config) names the step, the directory and the arrays.
  replicated = NamedSharding(_mesh((1, 8)), P())
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype), abstract)
  with pytest.raises(
      ckpt_lib.CheckpointMismatch,
      match=r'step 3 in .*checkpoints holds other arrays than this config builds: '
      r'down/bias: saved \(8,\) float32, requested \(3, 8\) float32',
  ):
    checkpointer.restore_params(ckpt_lib.abstract_like(wrong, replicated))
  # A target without shardings is refused (Orbax would silently return the saved shape).
  with pytest.raises(ValueError, match='no target sharding'):
    checkpointer.restore_params(wrong)
  checkpointer.close()


def test_export_and_load_params(tmp_path):
  state = _state()
  directory = str(tmp_path / 'export')
  export.export_params(state.ema_params, directory)
  one = SingleDeviceSharding(jax.devices()[0])
  loaded = export.load_params(directory, ckpt_lib.abstract_like(state.params, one))
  assert _equal(loaded, state.ema_params)
  assert all(x.sharding == one for x in jax.tree.leaves(loaded))
  # Exporting again replaces the previous export.
  export.export_params(state.params, directory)
  other = _shardings(state.params, _mesh((1, 8)))
  loaded = export.load_params(directory, ckpt_lib.abstract_like(state.params, other))
  assert _equal(loaded, state.params)
  _assert_shardings(loaded, other)
  with pytest.raises(ckpt_lib.CheckpointError, match='could not load parameters from'):
    export.load_params(str(tmp_path / 'missing'), ckpt_lib.abstract_like(state.params))


def test_one_subtree_of_a_checkpoint_or_an_export_is_read_without_the_rest(tmp_path):
  """A stage-2 run keeps the tokenizer beside its discriminator: a frozen tokenizer reads the
  'tokenizer' subtree alone (nothing of the other subtree's structure is needed), checked against
  the manifest entries under it."""
  tokenizer, discriminator = _state(seed=0), _state(seed=1)
  whole = {'tokenizer': tokenizer.params, 'discriminator': discriminator.params}
  state = tokenizer.replace(params=whole, ema_params=None, opt_state=None)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'run'))
  checkpointer.save(3, state)
  checkpointer.wait()
  target = ckpt_lib.abstract_like(tokenizer.params)
  restored = checkpointer.restore_params(target, subtree='tokenizer')
  assert _equal(restored, tokenizer.params) and checkpointer.restored_step == 3
  with pytest.raises(ckpt_lib.CheckpointMismatch, match='up/kernel: saved absent'):
    checkpointer.restore_params(ckpt_lib.abstract_like(whole['discriminator']), subtree='x')
  checkpointer.close()
  directory = str(tmp_path / 'export')
  export.export_params(whole, directory)
  assert _equal(export.load_params(directory, target, subtree='tokenizer'), tokenizer.params)
  with pytest.raises(ckpt_lib.CheckpointError, match='not those of this config'):
    export.load_params(directory, target, subtree='discriminator_typo')


def test_unreadable_metrics_do_not_prevent_opening(tmp_path):
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, keep_best=1)
  checkpointer.save(1, state, metrics={'psnr': 20.0})
  checkpointer.save(2, state, metrics={'psnr': 25.0})
  checkpointer.close()
  with open(tmp_path / 'checkpoints' / '2' / 'metrics' / 'metrics', 'w') as f:
    f.write('not json')
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, keep_best=1)
  assert checkpointer.all_steps() == [1, 2]
  assert _equal(checkpointer.restore(ckpt_lib.abstract_like(state)), state)
  checkpointer.close()


# ------------------------------------------------------------------------------------------------
# Damage: detected (digests), skipped by restores without a step, moved aside, never deleted.
# ------------------------------------------------------------------------------------------------


def _raw_restore(item_dir, abstract):
  """Orbax alone, without the manifest's checks: what a restore returned before digests."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    with orbax_quirks.quiet_async_errors():  # pylint: disable=protected-access
      return checkpointer.restore(item_dir, abstract)
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    checkpointer.close()


def _flip_a_bit_that_orbax_restores_silently(item_dir, abstract, saved):
  """Flips one bit of the array data in the Orbax item `item_dir` such that Orbax still restores
  it, with a wrong value (zstd-compressed data carries no checksum)."""
  data_files = sorted(  # OCDBT value files; its B-tree nodes (in state/d/) carry a CRC-32C
      (
          os.path.join(root, name)
          for root, _, names in os.walk(item_dir)
          for name in names
          if os.path.basename(root) == 'd' and 'ocdbt.process_' in root
      ),
      key=os.path.getsize,
      reverse=True,
  )
  for path in data_files:
    original = open(path, 'rb').read()
    for offset in range(len(original) // 2, len(original), 97):
      flipped = bytearray(original)
      flipped[offset] ^= 0x10
      open(path, 'wb').write(bytes(flipped))
      restored = _raw_restore(item_dir, abstract)
      if restored is not None and not _equal(restored, saved):
        return
      open(path, 'wb').write(original)
  raise AssertionError('no silently restoring bit flip found')


def _write(tmp_path, *states):
  """Checkpoints 1, 2, ... of `states` in `tmp_path`, committed."""
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  for step, state in enumerate(states, start=1):
    checkpointer.save(step, state)
  checkpointer.close()


def test_digests_do_not_depend_on_sharding_and_see_any_single_change():
  state = _state()
  digests = manifest.digests(state)
  for mesh in (_mesh((1, 8)), _mesh((8, 1))):
    assert manifest.digests(jax.device_put(state, _shardings(state, mesh))) == digests
  assert manifest.digests(jax.device_get(state)) == digests  # host arrays too
  rng = np.random.default_rng(0)
  kernel = np.asarray(state.params['up']['kernel'][...])
  for _ in range(20):  # one element changed by one bit, anywhere: always a new digest
    changed = kernel.copy().reshape(-1)
    i = rng.integers(changed.size)
    changed[i] = (changed[i : i + 1].view(np.uint32) ^ np.uint32(1 << rng.integers(32))).view(
        np.float32
    )[0]
    assert manifest.digests([changed.reshape(kernel.shape)]) != manifest.digests([kernel])
  swapped = kernel.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # two elements trade places
  assert manifest.digests([swapped]) != manifest.digests([kernel])
  for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.uint32):
    x = np.asarray(rng.integers(0, 2, (4, 5))).astype(dtype)
    y = x.copy()
    y[2, 3] = not x[2, 3] if dtype == jnp.bool_ else 1 - x[2, 3]
    assert manifest.digests([x]) != manifest.digests([y])


def _large_state(seed):
  """A state with an array large and random enough that Orbax stores it outside its B-tree nodes
  (which carry a CRC-32C), zstd-compressed without a checksum."""
  state = _state(seed=seed)
  big = jnp.asarray(np.random.default_rng(seed).normal(size=(64, 256)), jnp.float32)
  return state.replace(params={'big': big, **state.params})


def test_a_flipped_bit_is_damage_and_restore_falls_back_to_the_previous_checkpoint(tmp_path):
  older, newer = _large_state(seed=0), _large_state(seed=1)
  _write(tmp_path, older, newer)
  abstract = ckpt_lib.abstract_like(newer)
  _flip_a_bit_that_orbax_restores_silently(
      str(tmp_path / 'checkpoints' / '2' / 'state'), abstract, newer
  )

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(
      ckpt_lib.CheckpointDamaged,
      match=r'step 2 in .* is damaged: array .* does not match the digest',
  ):
    checkpointer.restore(abstract, step=2)
  assert _equal(checkpointer.restore(abstract), older)  # the newest that restores
  assert checkpointer.restored_step == 1
  assert [s for s, _ in checkpointer.skipped] == [2] and 'digest' in checkpointer.skipped[0][1]
  assert _equal(checkpointer.restore_params(abstract.params), older.params)
  assert checkpointer.restored_step == 1

  # Moved aside, never deleted; step 2 can be written again and retention never sees the copy.
  moved = checkpointer.quarantine([2])
  assert moved == [str(tmp_path / ckpt_lib.DAMAGED_DIR / '2')] and os.path.isdir(moved[0])
  assert checkpointer.all_steps() == [1]
  checkpointer.save(2, newer)
  checkpointer.wait()
  assert checkpointer.latest_step() == 2 and _equal(checkpointer.restore(abstract), newer)
  checkpointer.close()
  assert os.path.isdir(moved[0])


def test_a_truncated_file_is_damage_with_the_reason_and_a_missing_step_is_not(tmp_path):
  state = _large_state(seed=0)
  _write(tmp_path, state)
  item = tmp_path / 'checkpoints' / '1' / 'state'
  data = max(
      (p for p in item.rglob('*') if p.parent.name == 'd' and 'ocdbt.process_' in str(p)),
      key=lambda p: p.stat().st_size,
  )
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  abstract = ckpt_lib.abstract_like(state)
  with pytest.raises(
      ckpt_lib.CheckpointDamaged,
      match=r'step 1 in .* is damaged: ValueError: OUT_OF_RANGE: Error reading .*'
      r'Requested byte range .* is not valid for value of size',
  ):
    checkpointer.restore(abstract, step=1)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'no checkpoint step 9 in .*; present: 1$'):
    checkpointer.restore(abstract, step=9)
  checkpointer.close()


def test_every_checkpoint_damaged_is_an_error_listing_each_reason(tmp_path):
  state = _state()
  _write(tmp_path, state, state)
  os.remove(tmp_path / 'checkpoints' / '1' / 'state' / 'manifest.ocdbt')  # unreadable
  with open(tmp_path / 'checkpoints' / '2' / 'manifest' / 'metadata') as f:  # edited manifest
    text = f.read()
  with open(tmp_path / 'checkpoints' / '2' / 'manifest' / 'metadata', 'w') as f:
    f.write(text.replace('[16, 32]', '[16, 33]'))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'no checkpoint in .* can be restored: step 2: its manifest is damaged.*; step 1: ',
  ):
    checkpointer.restore(ckpt_lib.abstract_like(state))
  checkpointer.close()


def test_other_arrays_are_a_mismatch_not_damage_and_older_steps_are_not_tried(tmp_path):
  state = _state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(1, state)
  checkpointer.save(2, state)
  no_ema = ckpt_lib.abstract_like(state.replace(ema_params=None))
  with pytest.raises(
      ckpt_lib.CheckpointMismatch,
      match=r'step 2 .* ema_params/down/bias: saved \(8,\) float32, requested absent',
  ):
    checkpointer.restore(no_ema)
  assert checkpointer.skipped == []
  checkpointer.close()


def _failing_read(filename):
  """A coroutine that fails as a read of a missing array does, its code in file `filename`."""
  namespace = {}
  source = 'async def read():\n  raise ValueError("NOT_FOUND: an array\'s metadata")\n'
  exec(compile(source, filename, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['read']()


def test_late_reports_of_failed_orbax_reads_are_dropped_and_no_others(caplog):
  """Under load, the reads of a damaged checkpoint's other arrays fail after the restore raised
  and was handled; asyncio reports each such task when it is collected, with a traceback (stray
  lines after the one that names the damage). Those reports are dropped once a restore ran, and
  only those: the failed coroutine must be Orbax's."""
  orbax_quirks.drop_late_read_reports()  # pylint: disable=protected-access  # what a restore does
  orbax_file = os.path.join(os.sep, 'venv', 'site-packages', 'orbax', 'serialization.py')
  our_file = os.path.join(os.sep, 'project', 'reader.py')
  with caplog.at_level(logging.INFO, logger='asyncio'):
    for filename in (orbax_file, our_file):
      loop = asyncio.new_event_loop()
      task = loop.create_task(_failing_read(filename))
      loop.run_until_complete(asyncio.wait([task]))  # done; its exception never retrieved
      loop.close()
      del task
      gc.collect()  # the task reports now
  reports = [r for r in caplog.records if 'exception was never retrieved' in r.getMessage()]
  assert len(reports) == 1 and reports[0].levelno == logging.ERROR
  assert traceback.extract_tb(reports[0].exc_info[2])[-1].filename == our_file


def test_checkpoints_without_a_manifest_still_restore(tmp_path):
  state = _state()
  _write(tmp_path, state)
  shutil.rmtree(tmp_path / 'checkpoints' / '1' / 'manifest')  # as written by older versions
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  assert _equal(checkpointer.restore(ckpt_lib.abstract_like(state)), state)
  checkpointer.close()


def test_exported_parameters_are_verified_when_loaded(tmp_path):
  state = _large_state(seed=0)
  directory = str(tmp_path / 'export')
  export.export_params(state.params, directory)
  abstract = ckpt_lib.abstract_like(state.params)
  with open(os.path.join(directory, 'manifest', 'metadata')) as f:
    names = [name for name, *_ in json.load(f)['arrays']]
  assert names == ['big', 'down/bias', 'down/kernel', 'up/bias', 'up/kernel']
  wrong = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((2,) + x.shape, x.dtype, sharding=x.sharding), abstract
  )
  with pytest.raises(
      ckpt_lib.CheckpointError, match=r'not those of this config: big: saved \(64, 256\)'
  ):
    export.load_params(directory, wrong)
  _flip_a_bit_that_orbax_restores_silently(
      os.path.join(directory, 'params'), abstract, state.params
  )
  with pytest.raises(
      ckpt_lib.CheckpointError, match=r'could not load .* does not match the digest'
  ):
    export.load_params(directory, abstract)
