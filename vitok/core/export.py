"""A run's parameters alone, as a standalone Orbax checkpoint (what `launch.export` writes for
inference or for another job):

    OUT/params/params/     the parameters (StandardSave: sharded arrays, OCDBT)
    OUT/params/manifest/   every array's path, shape, dtype and digest (manifest.py)

`load_params` restores them onto any mesh (the target carries its shardings) and verifies them
against the manifest; with `subtree` it reads one subtree only (a stage-2 run's tokenizer).
"""

from __future__ import annotations

import logging
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from vitok.core import manifest, orbax_io, orbax_quirks
from vitok.core.checkpoint import CheckpointError

_PARAMS, _MANIFEST = 'params', 'manifest'

log = logging.getLogger(__name__)


def export_params(params: Any, directory: str) -> None:
  """Writes `params` alone, with their manifest, in `directory` (items `params/` and
  `manifest/`), synchronously. An existing export there is replaced (the new one is written to a
  temporary directory and renamed into place when complete). All processes call this in a
  multi-host run."""
  directory = epath.Path(orbax_io.absolute(directory))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    checkpointer.save(
        directory,
        args=ocp.args.Composite(
            **{
                _PARAMS: ocp.args.StandardSave(params),
                _MANIFEST: ocp.args.JsonSave(manifest.make(params)),
            }
        ),
        force=True,
    )
  finally:
    checkpointer.close()


def _recorded(directory: str, prefix: str) -> dict:
  """The manifest entries under `prefix`; raises CheckpointError when the manifest is damaged."""
  try:
    saved = orbax_io.restore_with(
        ocp.CompositeCheckpointHandler(),
        epath.Path(directory),
        ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()}),
    )[_MANIFEST]
    return manifest.entries(saved, prefix)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'the parameters in {directory} are damaged: {orbax_io.describe(e)}'
    ) from e


def load_params(directory: str, abstract_params: Any, subtree: str = '') -> Any:
  """Restores the parameters written by `export_params` (with `subtree`, only `params[subtree]`)
  into `abstract_params` (ShapeDtypeStructs with the target shardings) and verifies them against
  the manifest. Raises CheckpointError naming the directory (other arrays than `abstract_params`,
  or damage)."""
  orbax_io.check_target(abstract_params, 'load_params target')
  directory = orbax_io.absolute(directory)
  item = epath.Path(directory) / _PARAMS
  if (epath.Path(directory) / _MANIFEST).exists():
    recorded = _recorded(directory, f'{subtree}/' if subtree else '')
    differences = manifest.compare(recorded, abstract_params)
    if differences:
      raise CheckpointError(
          f'the parameters in {directory} are not those of this config: '
          + '; '.join(differences[:4])
      )
  else:  # exported before manifests existed: one StandardSave, in `directory` itself
    log.warning(
        '%s has no manifest (exported by an older version): its parameters are loaded '
        'without verifying them',
        directory,
    )
    recorded, item = None, epath.Path(directory)
  keys = (subtree,) if subtree else ()
  try:
    with orbax_quirks.quiet_async_errors():
      params = orbax_io.restore_subtree(item, keys, abstract_params)
    if recorded is not None:
      manifest.verify(recorded, params)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'could not load parameters from {directory}: {orbax_io.describe(e)}'
    ) from e
  return params
