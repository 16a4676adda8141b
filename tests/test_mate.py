"""LinGen's MATE mixer (dit/mate.py): scan orders, windows, the windowed attention against a masked
full attention, scan-over-layers against a loop, and cost per token against clip length."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit import mate
from dit import model as dit_model

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.mark.parametrize('grid', [(3, 4, 5), (1, 2, 2), (6, 1, 3)])
def test_each_scan_order_is_a_permutation_and_its_inverse_restores_the_tokens(grid):
  x = jax.random.normal(jax.random.key(0), (2, math.prod(grid), 3))
  coords = np.stack(np.meshgrid(*map(np.arange, grid), indexing='ij'), -1).reshape(-1, 3)
  for order in mate.ORDERS:
    perm = mate.scan_order(grid, order)
    assert sorted(perm) == list(range(math.prod(grid)))
    np.testing.assert_array_equal(mate._reorder(x, grid, order), x[:, perm])
    np.testing.assert_array_equal(
        mate._reorder(mate._reorder(x, grid, order), grid, order, True), x
    )
    # Neighbours along the order's last (minor) axis are neighbours in the scan.
    minor = 'thw'.index(order[-1])
    place = np.argsort(perm)  # raster index -> place in the scan
    step = np.zeros(3, int)
    step[minor] = 1
    for c in coords[coords[:, minor] + 1 < grid[minor]]:
      here, there = np.ravel_multi_index(c, grid), np.ravel_multi_index(c + step, grid)
      assert abs(place[here] - place[there]) == 1
  # Across the three orders every axis is the minor one once (Rotary Major Scan).
  assert sorted(o[-1] for o in mate.ORDERS) == ['h', 't', 'w']


@pytest.mark.parametrize('grid,window', [((8, 4, 4), (4, 2, 2)), ((5, 3, 7), (2, 2, 3)),
                                         ((3, 2, 2), (8, 4, 4))])  # fmt: skip
def test_windows_and_shifted_windows_cover_every_token_once(grid, window):
  for shifted in (False, True):
    index = mate.window_tokens(grid, window, shifted)
    real = index[index >= 0]
    assert sorted(real) == list(range(math.prod(grid)))
    # Members of a window lie within the (clipped) window's extent along each axis.
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), -1)
    clipped = [min(g, w) for g, w in zip(grid, window)]
    for row in index:
      members = coords[row[row >= 0]]
      assert np.all(members.max(0) - members.min(0) < clipped)
  # The shift moves the window boundaries where an axis has more than one window.
  if any(w < g for g, w in zip(grid, window)):
    a = {frozenset(r[r >= 0]) for r in mate.window_tokens(grid, window, False)}
    b = {frozenset(r[r >= 0]) for r in mate.window_tokens(grid, window, True)}
    assert a != b


def _same_window(grid, window, shifted):
  """Token pairs in one window, from coordinates: window id = (coordinate + front) // size."""
  coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), -1)
  ids = []
  for axis, (g, w) in enumerate(zip(grid, window)):
    w = min(g, w)
    front = w // 2 if shifted and w < g else 0
    ids.append((coords[:, axis] + front) // w)
  ids = np.stack(ids, -1)
  return np.all(ids[:, None] == ids[None], axis=-1)


@pytest.mark.parametrize('shifted', [False, True])
def test_windowed_attention_equals_full_attention_masked_to_the_windows(shifted):
  grid, window, width, heads = (4, 3, 4), (2, 2, 3), 16, 2
  te = mate.TemporalSwinAttention(width, heads, window, qkv_bias=True, dtype=jnp.float32,
                                  rngs=nnx.Rngs(0))  # fmt: skip
  x = jax.random.normal(jax.random.key(1), (2, math.prod(grid), width))
  got = te(x, None, grid, shifted)
  qkv = te.qkv(x)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(width // heads)
  mask = _same_window(grid, window, shifted)
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  want = te.out(jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(x.shape))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _randomised(model, seed=0):
  """Every parameter drawn at random (zero-initialised gates and outputs would hide the mixer)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _mate_cfg(**kw):
  base = dict(variant='DiT-cpu64/1', grid=(4, 2, 2), channels=3, num_classes=2, mixer='mate',
              ssd_chunk=4, ssd_state=8, window=(2, 2, 2))  # fmt: skip
  return dit_model.DiTConfig(**{**base, **kw})


def test_scan_over_layers_runs_each_block_in_its_own_order_and_shift():
  """One lax.scan (a traced layer index picks the scan order and window shift) equals the blocks
  called one by one, in values and gradients; depth 3 reaches all three orders."""
  size = dit_model.SIZES['cpu64']
  dit_model.SIZES['mate3'] = dataclasses.replace(size, depth=3)
  try:
    loop = _randomised(dit_model.DiT(_mate_cfg(variant='DiT-mate3/1'), rngs=nnx.Rngs(0)))
    scanned = dit_model.DiT(  # and rematerialised: the same values, recomputed in the backward
        _mate_cfg(variant='DiT-mate3/1', scan=True, remat='full'), rngs=nnx.Rngs(0)
    )
    blocks = [nnx.state(b) for b in loop.blocks]
    nnx.update(scanned, nnx.state(loop, nnx.Not(nnx.PathContains('blocks'))))
    nnx.update(scanned.blocks, jax.tree.map(lambda *a: jnp.stack(a), *blocks))
    x = jax.random.normal(jax.random.key(2), (2, 4, 2, 2, 3))
    t, y = jnp.array([100.0, 700.0]), jnp.array([0, 1])
    run = lambda model: jax.jit(lambda x: model(x, t, y))(x)
    np.testing.assert_allclose(run(scanned), run(loop), rtol=1e-5, atol=1e-5)
    # Gradients: float32 rounding of a differently ordered program, measured against their scale.
    grad = lambda model: jax.jit(jax.grad(lambda x: jnp.sum(model(x, t, y) ** 2)))(x)
    got, want = grad(scanned), grad(loop)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()  # a wrong order: O(1)
  finally:
    del dit_model.SIZES['mate3']


def test_every_token_reaches_every_other_through_the_mixer():
  """Bidirectional: the first token's output depends on the last token and vice versa."""
  model = _randomised(dit_model.DiT(_mate_cfg(window=(1, 1, 1)), rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(3), (1, 4, 2, 2, 3))
  t, y = jnp.array([300.0]), jnp.array([1])
  first = jax.jit(jax.grad(lambda x: model(x, t, y)[0, 0, 0, 0].sum()))(x)
  last = jax.jit(jax.grad(lambda x: model(x, t, y)[0, -1, -1, -1].sum()))(x)
  assert np.abs(first[0, -1, -1, -1]).max() > 0 and np.abs(last[0, 0, 0, 0]).max() > 0


def _compiled_flops(cfg, frames):
  cfg = dit_model.DiTConfig(**{**cfg.__dict__, 'grid': (frames, *cfg.grid[1:])})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: dit_model.DiT(cfg, rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, frames, *cfg.grid[1:], cfg.channels), jnp.float32)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.ones((1,)), jnp.zeros((1,), int)))
  return fn.lower(state, x).compile().cost_analysis()['flops'], cfg


def test_cost_per_token_stays_flat_for_mate_and_grows_for_attention():
  """Compiled FLOPs of one forward pass per token, 8 to 64 latent frames of 4 x 4 tokens."""
  per_token = {}
  for mixer in ('mate', 'attention'):
    cfg = _mate_cfg(mixer=mixer, grid=(8, 4, 4), ssd_chunk=16, window=(4, 4, 4))
    for frames in (8, 64):
      flops, sized = _compiled_flops(cfg, frames)
      per_token[mixer, frames] = flops / sized.tokens
      if mixer == 'mate':  # the analytic count (2 flops per MAC) against XLA's
        assert flops == pytest.approx(2 * dit_model.forward_macs(sized), rel=0.25)
  assert per_token['mate', 64] / per_token['mate', 8] < 1.1
  assert per_token['attention', 64] / per_token['attention', 8] > 2.0
  assert per_token['mate', 64] < per_token['attention', 64]


def test_config_checks_name_the_field():
  with pytest.raises(Exception, match='model.mixer'):
    _mate_cfg(mixer='mamba')
  with pytest.raises(Exception, match='model.window'):
    _mate_cfg(window=(2, 2))
  with pytest.raises(Exception, match='model.ssd_chunk'):
    _mate_cfg(ssd_chunk=0)


def test_the_ma_branch_scans_review_then_tokens_forward_and_backward():
  """The MA-branch against the Mamba2 equations token by token (test_ssd's recurrence): the
  forward direction reads the review tokens then the tokens; the backward one the review tokens
  then the tokens last to first, its output reversed back; each with its own convolution."""
  from test_ssd import recurrence

  ma = _randomised(mate.BidirectionalMamba(16, 2, state=4, chunk=4, dtype=jnp.float32,
                                           rngs=nnx.Rngs(0)))  # fmt: skip
  tokens = jax.random.normal(jax.random.key(4), (2, 10, 16))
  review = jax.random.normal(jax.random.key(5), (2, 3, 16))
  seq = jnp.concatenate([review, tokens], axis=1)
  xz, bc, dt = ma.in_proj(seq), ma.bc_proj(seq), ma.dt_proj(seq)

  def conv(u, kernel, bias):  # u[l] -> sum_j kernel[j] u[l - K + 1 + j], zeros before the start
    k = kernel.shape[0]
    return bias + sum(kernel[j] * jnp.roll(u, k - 1 - j, axis=1).at[:, : k - 1 - j].set(0)
                      for j in range(k))  # fmt: skip

  def direction(d, order):
    silu = jax.nn.silu
    x = silu(conv(xz[:, order, 0], ma.conv_x[d], ma.conv_x_bias[d]))
    b = silu(conv(bc[:, order, d, 0], ma.conv_bc[d][:, 0], ma.conv_bc_bias[d][0]))
    c = silu(conv(bc[:, order, d, 1], ma.conv_bc[d][:, 1], ma.conv_bc_bias[d][1]))
    step = jax.nn.softplus(dt[:, order, d] + ma.dt_bias[d])
    y = recurrence(x, step, -jnp.exp(ma.log_a[d]), b[:, :, None], c[:, :, None])
    return y + ma.skip[d][:, None] * x

  r = 3
  forward = direction(0, np.arange(13))[:, r:]
  backward = direction(1, np.r_[0:r, 12 : r - 1 : -1])[:, r:][:, ::-1]
  y = (forward + backward) * jax.nn.silu(xz[:, r:, 1])
  want = ma.out_proj(ma.norm(y.reshape(2, 10, -1)))
  np.testing.assert_allclose(ma(tokens, review), want, rtol=1e-4, atol=1e-4)
