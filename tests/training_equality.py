"""Do two training runs compute the same training? A comparison that float reduction order cannot
break and that a real distribution bug cannot pass.

Two runs of the same training on different meshes or process counts sum gradients in different
orders, so their float results differ in the last bits. AdamW then amplifies those bits in
parameters whose gradient is close to zero: its update is g / (sqrt(v) + eps), so a gradient of
1e-9 +- 1e-12 moves a parameter by almost a full learning rate either way. Element-wise tolerances
on the final parameters therefore fail on some CPUs and not on others.

What the runs changed is robust: per array, the difference between the two runs' changes
(final - initial) is a tiny fraction of the change itself. Measured on the tiny tokenizer after 6
AdamW steps of L2 + KL (1 x 4 devices vs 2 processes x 2 devices): ~1e-6 of the total change and
at most ~3e-5 of an array's. A loss whose gradient is not continuous in its input breaks this:
with LPIPS (ReLUs and max-pools in VGG) one step moved the two runs from 5.7e-8 to 2.4e-4 apart,
and 6 steps to 2.3e-3, so equality tests train without it. A bug is of the order of the change
itself: a
run on other rows (what a process reading the wrong rows or skipping the gradient all-reduce does)
differs by 0.75 of its change in the median array and by > 1 in the worst; a wrong shard replaces
an array's values outright. `tests/test_sharding.py` checks that this comparison rejects both.
"""

import jax
import numpy as np

ARRAY_RTOL = 2e-2  # per array: |change_a - change_b| <= ARRAY_RTOL * |change_a|
TOTAL_RTOL = 1e-3  # all float arrays together


def _named_leaves(tree):
  return [
      (jax.tree_util.keystr(path), np.asarray(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  ]


def training_differences(state, reference, initial) -> tuple[list[tuple[str, float]], float]:
  """Relative differences between what two runs changed: [(array path, ||d_s - d_r|| / ||d_r||)]
  for every float array, and the same ratio over all float arrays together. Integer and unsigned
  arrays (step counters, RNG keys) must be equal: a difference raises AssertionError."""
  named = _named_leaves(reference)
  leaves = [named, _named_leaves(state), _named_leaves(initial)]
  assert (
      [n for n, _ in leaves[0]] == [n for n, _ in leaves[1]] == [n for n, _ in leaves[2]]
  ), 'the two states have different structures'
  per_array, total_diff, total_ref = [], 0.0, 0.0
  for (name, ref), (_, other), (_, init) in zip(*leaves):
    assert ref.shape == other.shape, f'{name}: shape {other.shape} != {ref.shape}'
    if not np.issubdtype(ref.dtype, np.floating):
      assert np.array_equal(ref, other), f'{name}: {other} != {ref}'
      continue
    change_ref = ref.astype(np.float64) - init.astype(np.float64)
    change_other = other.astype(np.float64) - init.astype(np.float64)
    diff, size = np.sum((change_other - change_ref) ** 2), np.sum(change_ref**2)
    total_diff, total_ref = total_diff + diff, total_ref + size
    per_array.append((name, float(np.sqrt(diff / size)) if size else float(np.sqrt(diff))))
  return per_array, float(np.sqrt(total_diff / total_ref))


def assert_same_training(state, reference, initial):
  """`state` and `reference` (pytrees of arrays of the same structure, e.g. two TrainStates) were
  both trained from `initial` by the same training, up to float reduction order (module doc)."""
  per_array, total = training_differences(state, reference, initial)
  worst = sorted(per_array, key=lambda item: -item[1])[:3]
  assert total <= TOTAL_RTOL and worst[0][1] <= ARRAY_RTOL, (
      f'the runs differ by {total:.2e} of their total change (limit {TOTAL_RTOL}); worst arrays: '
      + ', '.join(f'{name} {value:.2e}' for name, value in worst)
      + f' (limit {ARRAY_RTOL})'
  )


def perturbed(state):
  """`state` with every parameter moved by the same seeded noise on every mesh, so that the
  zero-initialised gates (adaLN-Zero, output layers) let attention shape the very first step."""
  rng = np.random.default_rng(1)
  moved = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
           for x in jax.tree.leaves(state.params)]  # fmt: skip
  place = lambda: jax.tree.unflatten(
      jax.tree.structure(state.params),
      [jax.device_put(m, x.sharding) for m, x in zip(moved, jax.tree.leaves(state.params))],
  )
  return state.replace(params=place(), ema_params=place())  # two copies: both are donated
