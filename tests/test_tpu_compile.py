"""Compiling for TPU slices with the real TPU compiler (libtpu, from the test extra), on this CPU
machine: the HLO accounting against closed forms, meshes on the torus, multi-slice meshes, and the
train steps of both families (FSDP, the Pallas TPU attention kernel) through `launch.plan`.

Every test here fails if the TPU compiler is not the one used: the devices are TPU devices of a
described topology, and the programs carry TPU-only memory layouts (`T(8,128)` tiles) or Mosaic
kernels (`tpu_custom_call`)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vitok.core import hlo_cost, sharding, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _devices(name: str, num_slices: int = 1):
  devices = topology.describe_devices(topology.parse_slice(name, num_slices))
  assert {d.platform for d in devices} == {'tpu'}
  return devices


def _mesh(devices, shape, axes=('data', 'fsdp')):
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _stack(n_layers, d):
  """tanh(x W_l) for l = 1..n_layers, the gradient of a scalar loss w.r.t. the weights and x."""

  def loss(ws, x):
    def layer(h, w):
      return jnp.tanh(h @ w), None

    return jnp.sum(jax.lax.scan(layer, x, ws)[0] ** 2)

  def unrolled(ws, x):
    for i in range(n_layers):
      x = jnp.tanh(x @ ws[i])
    return jnp.sum(x**2)

  return jax.grad(loss, argnums=(0, 1)), jax.grad(unrolled, argnums=(0, 1))


def test_scanned_layers_count_every_iteration_on_the_tpu_compiler():
  """XLA's cost analysis counts a scanned body once; the HLO accounting counts it per layer and
  gives the closed form 3 matmuls x 2 b d^2 per layer (forward, dx, dW) for the scan and the
  unrolled loop alike."""
  layers, b, d = 8, 256, 512
  mesh = _mesh(_devices('v5p:2x2x1'), (4, 1))
  ws = jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((b, d), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
  scanned, unrolled = _stack(layers, d)
  closed_form = layers * 3 * 2 * (b // 4) * d * d
  counted = {}
  for name, fn in (('scan', scanned), ('unrolled', unrolled)):
    compiled = jax.jit(fn).lower(ws, x).compile()
    assert 'T(8,128)' in compiled.as_text()  # TPU tiles: the TPU compiler wrote this program
    counted[name] = hlo_cost.analyze(compiled.as_text(), dict(mesh.shape)).matmul_flops
    if name == 'scan':
      assert compiled.cost_analysis()['flops'] < closed_form / 4  # XLA: the body once
  assert counted == {'scan': closed_form, 'unrolled': closed_form}


def test_collectives_name_their_mesh_axes_and_bytes():
  """psum over 'data', all_gather and psum_scatter over 'fsdp' on a 2 x 4 mesh of v5p chips."""
  mesh = _mesh(_devices('v5p:2x2x2'), (2, 4))

  def body(a):
    return (
        jax.lax.psum(a, 'data'),
        jax.lax.all_gather(a, 'fsdp', tiled=True),
        jax.lax.psum(a, ('data', 'fsdp')),
    )

  fn = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=P('data', 'fsdp'),
      out_specs=(P('data', 'fsdp'), P('data'), P('data', 'fsdp')),
      check_vma=False,
  )
  x = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=NamedSharding(mesh, P('data', 'fsdp')))
  cost = hlo_cost.analyze(jax.jit(fn).lower(x).compile().as_text(), dict(mesh.shape))
  shard = 32 * 256 * 4  # bytes of one device's (32, 256) float32 block
  found = sorted((c.kind, c.axes, c.group_size, c.payload_bytes) for c in cost.collectives)
  assert found == [
      ('all-gather', ('fsdp',), 4, 4 * shard),
      ('all-reduce', ('data',), 2, shard),
      ('all-reduce', ('data', 'fsdp'), 8, shard),
  ]
  wire = {c.axes: c.wire_bytes for c in cost.collectives}
  assert wire[('fsdp',)] == 4 * shard * 3 / 4 and wire[('data',)] == 2 * shard / 2


def test_meshes_on_the_torus_and_across_slices(capsys):
  """8x8 on the 4x4x4 torus of a v5p-128 splits a physical axis (built, with a note naming the
  shapes that map whole) or, with splitting refused, ends in one line naming them; two slices
  make a hybrid mesh whose first axis crosses the data-centre network."""
  from configs import common

  devices = _devices('v5p-128')
  cfg = common.training_config('vitok').mesh
  cfg.shape = (16, 4)
  assert sharding.make_mesh(cfg, devices).shape == {'data': 16, 'fsdp': 4}
  assert capsys.readouterr().out == ''
  cfg.shape = (8, 8)
  assert sharding.make_mesh(cfg, devices).shape == {'data': 8, 'fsdp': 8}
  note = capsys.readouterr().out
  assert 'splits physical axes of the 4x4x4 torus' in note and '16x4, 4x16' in note
  cfg.allow_split_physical_axes = False
  with pytest.raises(ValueError) as refused:
    sharding.make_mesh(cfg, devices)
  message = str(refused.value)
  assert '\n' not in message and 'shapes that do: 64x1, 16x4, 4x16, 1x64' in message

  two = _devices('v5p:2x2x1', num_slices=2)
  cfg = common.training_config('vitok').mesh
  cfg.shape = (1, 4)  # inside each slice; the slices go on 'data' (dcn_shape default)
  mesh = sharding.make_mesh(cfg, two)
  assert mesh.shape == {'data': 2, 'fsdp': 4}
  assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}, {1}]
  cfg.dcn_shape = (1, 3)
  with pytest.raises(ValueError, match='lays out 3 slices but the job has 2'):
    sharding.make_mesh(cfg, two)


def _plan(*args):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.plan', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=dict(os.environ, XLA_FLAGS=''),
      timeout=600,
  )
  return out


TINY_VITOK = 'configs/vitok.py:variant=cpu128-cpu128/2x8,channels=4,frames=4,res=64,batch=8'


@pytest.mark.slow
def test_plan_compiles_a_vitok_step_for_a_tpu_slice_with_fsdp_and_the_pallas_kernel():
  out = _plan(
      f'--config={TINY_VITOK}',
      '--config.model.attention=pallas_tpu',
      '--config.model.dtype=auto',
      '--config.loss.lpips=0.0',
      '--topology=v5p-8',
      '--mesh=1x4',
  )
  assert out.returncode == 0, out.stderr
  assert out.stderr == ''  # libtpu's start-up complaints are kept off stderr
  table, last = out.stdout.rsplit('\n', 2)[0], out.stdout.strip().splitlines()[-1]
  result = json.loads(last)
  assert result['backend'].startswith('XLA:TPU (libtpu)') and result['chips'] == 4
  assert result['model_dtype'] == 'bfloat16'  # 'auto' on a TPU target
  step = result['train_step']
  assert step['fits'] and step['bound']['bound_s'] > 0
  # The Pallas kernel was compiled by Mosaic: its forward carries a cost estimate.
  assert step['compiled_kernel_flops'] > 0
  kinds = {(r['kind'], r['axes']) for r in step['collectives']}
  assert ('all-gather', 'fsdp') in kinds and ('reduce-scatter', 'fsdp') in kinds
  # FSDP: every parameter with a model-width ('embed') dimension is split 4 ways over 'fsdp'
  # (128 divides by 4); the others (norms, MLP biases) stay whole: 1/4 of the total, but for them.
  from flax import nnx

  from configs import vitok as vitok_config
  from launch import tasks

  config = vitok_config.get_config(TINY_VITOK.split(':', 1)[1])
  model = jax.eval_shape(lambda: tasks.make_task(config).create_model(nnx.Rngs(params=0)))
  params = jax.tree.leaves(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  split = lambda p: 'embed' in (p.get_metadata().get('out_sharding') or ())
  total = sum(p.size * 4 for p in params)
  expected = sum(p.size * 4 / (4 if split(p) else 1) for p in params)
  assert result['params_bytes'] == expected and expected < 1.05 * total / 4
  assert 'fits (' in table and 'reduce-scatter' in table


@pytest.mark.slow
def test_plan_compiles_a_dit_step_with_the_splash_kernel_and_its_sampling_on_two_slices():
  out = _plan(
      '--config=configs/dit.py:demo',
      '--config.model.num_classes=10',
      '--config.tokenizer.variant=cpu128-cpu128/2x8',
      '--config.tokenizer.channels=4',
      '--config.data.frames=4',
      '--config.data.res=64',
      '--config.data.batch_size=16',
      '--config.sample.steps=4',
      '--config.model.attention=splash_tpu',
      '--topology=v5p-8',
      '--num_slices=2',
      '--mesh=1x4',
  )
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['slices'] == 2 and result['chips'] == 8 and result['mesh'] == {'data': 2, 'fsdp': 4}
  nets = {(r['axes'], r['network']) for r in result['train_step']['collectives']}
  assert ('fsdp', 'ICI') in nets and any(net == 'DCN' for _, net in nets)
  assert all(net == 'DCN' for axes, net in nets if axes == 'data')
  # The splash kernel was compiled by Mosaic (its forward carries a cost estimate).
  assert result['attention'] == 'splash_tpu' and result['train_step']['compiled_kernel_flops'] > 0
  sampling = result['sampling']
  assert sampling['fits'] and sampling['sampler_steps'] == 4 and sampling['clips'] == 16
  assert sampling['compiled_matmul_flops'] > 0 and sampling['compiled_kernel_flops'] > 0


@pytest.mark.slow
def test_plan_says_when_a_config_does_not_fit():
  out = _plan(
      '--config=configs/vitok.py:variant=cpu128-cpu128/2x8,channels=4,frames=16,res=128,batch=512',
      '--config.loss.lpips=0.0',
      '--topology=v5litepod-4',
      '--mesh=4x1',
  )
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  step = result['train_step']
  # The TPU compiler refuses it (its temporaries alone exceed the 15.75 GiB it allows a v5e
  # program); the plan says by how much, with the state per chip added.
  assert not step['fits'] and step['temp_bytes'] > 15.75 * 2**30
  assert step['total_bytes'] == step['temp_bytes'] + sum(
      result[k] for k in ('params_bytes', 'optimizer_bytes', 'ema_bytes', 'frozen_bytes')
  )
  over = (step['total_bytes'] - 15.75 * 2**30) / 2**30
  assert f'DOES NOT FIT: {over:.2f} GiB over the 15.75 GiB of HBM' in out.stdout
  assert 'Ran out of memory on HBM' in out.stdout


def test_plan_refuses_bad_topologies_in_one_line():
  for flags, words in (
      (['--topology=v5p-100'], 'v5p slices come in sizes 8, 16, 32'),
      (['--topology=tpu9'], 'not a TPU slice name'),
      (['--topology=v5p-8', '--mesh=3x1'], 'needs 3 devices but 4 are available'),
  ):
    out = _plan(f'--config={TINY_VITOK}', *flags)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert words in out.stderr


@pytest.mark.slow
def test_plan_sweep_ranks_variants_and_reports_the_failing_one(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'launch.plan_sweep',
          f'--config={TINY_VITOK}',
          '--topology=v5p-8',
          '--variants=fsdp: mesh.shape=1x4,loss.lpips=0.0 ; broken: model.remat=sometimes',
          f'--out={tmp_path}/plans.md',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      env=dict(os.environ, XLA_FLAGS=''),
      timeout=600,
  )
  assert out.returncode == 0, out.stderr
  table = (tmp_path / 'plans.md').read_text().splitlines()
  assert table[0].startswith(f'{TINY_VITOK} on v5p-8') and table[2].startswith('| variant |')
  fsdp, broken = table[4].split(' | '), table[5]
  assert fsdp[0] == '| fsdp' and float(fsdp[3]) > 0  # the bound, in ms
  assert "failed: bad config: config.model.remat='sometimes' is not accepted" in broken
  plans = [json.loads(line) for line in (tmp_path / 'plans.md.jsonl').read_text().splitlines()]
  assert [p['variant']['name'] for p in plans] == ['fsdp'] and plans[0]['mesh'] == {
      'data': 1,
      'fsdp': 4,
  }


def test_hbm_traffic_matches_xla_unrolled_and_counts_a_scan_per_layer():
  """Unrolled, the HLO accounting's HBM bytes agree with XLA's own 'bytes accessed' (within 5%);
  scanned, XLA counts one layer, the accounting every layer, reading one layer's weights and
  writing one layer's activations per iteration (not the whole stacked buffers): the same traffic
  as unrolled, within 25%."""
  layers, b, d = 8, 256, 512
  mesh = _mesh(_devices('v5p:2x2x1'), (4, 1))
  ws = jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((b, d), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
  scanned, unrolled = _stack(layers, d)
  flat = jax.jit(unrolled).lower(ws, x).compile()
  flat_bytes = hlo_cost.analyze(flat.as_text(), dict(mesh.shape)).hbm_bytes
  assert flat_bytes == pytest.approx(flat.cost_analysis()['bytes accessed'], rel=0.05)
  looped = jax.jit(scanned).lower(ws, x).compile()
  assert looped.cost_analysis()['bytes accessed'] < flat_bytes / 4
  assert hlo_cost.analyze(looped.as_text(), dict(mesh.shape)).hbm_bytes == pytest.approx(
      flat_bytes, rel=0.25
  )


def test_collectives_are_attributed_to_the_parameters_they_move():
  """Full shapes, one device's shards and one stacked layer's name the parameter; shapes of
  several parameters name the first and count the rest."""
  from vitok.core import roofline

  mesh = _mesh(_devices('v5p:2x2x1'), (1, 4))
  split = NamedSharding(mesh, P('fsdp'))
  params = {
      'a': {'kernel': jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=split)},
      'b': {'kernel': jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=split)},
      'blocks': {
          'w': jax.ShapeDtypeStruct((3, 4, 12), jnp.float32, sharding=NamedSharding(mesh, P()))
      },
  }
  names = roofline.parameter_names(params)
  assert names[(8, 16)] == 'a/kernel (+1 of this shape)'
  assert names[(2, 16)] == 'a/kernel (shard) (+1 of this shape)'
  assert names[(4, 12)] == 'blocks/w (one layer)' and names[(3, 4, 12)] == 'blocks/w'
