"""The upstream behaviour each workaround of vitok/core/orbax_quirks.py exists for is still there
(orbax-checkpoint 0.12.8, absl-py 2.5.1). A failure here means Orbax changed: the workaround it
names can probably go, and the module docstring's versions need updating."""

import logging

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from vitok.core import orbax_quirks


def _options(create=True):
  return ocp.CheckpointManagerOptions(
      create=create, best_fn=lambda metrics: float(metrics['psnr']), best_mode='max'
  )


def _state():
  return {'w': jnp.arange(8, dtype=jnp.float32)}


def test_orbax_warns_at_each_save_without_metrics_which_the_filter_drops(tmp_path, caplog):
  """NoMetricsWarningFilter: a manager with best_fn warns at a save made without metrics."""
  absl_log = logging.getLogger('absl')
  ours = [f for f in absl_log.filters if isinstance(f, orbax_quirks.NoMetricsWarningFilter)]
  for f in ours:
    absl_log.removeFilter(f)
  try:
    manager = ocp.CheckpointManager(tmp_path / 'plain', options=_options())
    with caplog.at_level(logging.WARNING):
      manager.save(1, args=ocp.args.StandardSave(_state()))
      manager.wait_until_finished()
    manager.close()
    warned = [r for r in caplog.records if 'did not provide metrics' in r.getMessage()]
    assert warned, 'Orbax no longer warns: NoMetricsWarningFilter can go'
    caplog.clear()
    orbax_quirks.drop_the_no_metrics_warning()
    manager = ocp.CheckpointManager(tmp_path / 'filtered', options=_options())
    with caplog.at_level(logging.WARNING):
      manager.save(1, args=ocp.args.StandardSave(_state()))
      manager.wait_until_finished()
    manager.close()
    assert not [r for r in caplog.records if 'did not provide metrics' in r.getMessage()]
  finally:
    for f in ours:
      absl_log.addFilter(f)


def test_a_plain_manager_cannot_open_checkpoints_with_an_unreadable_metrics_file(tmp_path):
  """TolerantManager: Orbax's manager fails to open a directory in which one checkpoint's metrics
  file is unreadable; the tolerant one opens it and lists every checkpoint."""
  manager = ocp.CheckpointManager(tmp_path, options=_options())
  for step, psnr in ((1, 20.0), (2, 25.0)):
    manager.save(step, args=ocp.args.StandardSave(_state()), metrics={'psnr': psnr})
  manager.close()
  with open(tmp_path / '2' / 'metrics' / 'metrics', 'w') as f:
    f.write('not json')
  with pytest.raises(Exception):  # noqa: B017 (any error: the point is that it cannot open)
    ocp.CheckpointManager(tmp_path, options=_options(create=False)).close()
  tolerant = orbax_quirks.TolerantManager(tmp_path, options=_options(create=False))
  assert sorted(tolerant.all_steps()) == [1, 2]
  tolerant.close()
