"""TPU slices as users name them, the chips' published figures, and device meshes laid onto the
physical torus (one slice over ICI, several slices over the data-centre network).

A slice name is what `gcloud compute tpus tpu-vm create --accelerator-type` takes: `v4-32`,
`v5p-128`, `v5litepod-256` (or `v5e-256`), `v6e-256`; a raw topology such as `v5p:4x4x4` works
too. v4 and v5p names count TensorCores (two per chip), v5e and v6e names count chips. JAX
describes such a slice without having it (`jax.experimental.topologies.get_topology_desc`, with
libtpu installed), which is how `launch.plan --topology` compiles for it on a CPU machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's per-chip figures, as Google publishes them (cloud.google.com/tpu/docs,
  the generation's page), except where `source` says otherwise."""

  name: str
  device_kinds: tuple[str, ...]  # jax.Device.device_kind of its chips
  peak_tflops: float  # dense bf16
  hbm_bytes: float  # what one program may use (see CHIPS)
  hbm_gbps: float  # GB/s
  ici_links: int  # ICI ports per chip
  ici_link_gbps: float  # GB/s each way per link
  dcn_gbits_per_chip: float | None  # Gbit/s; None where unpublished
  cores_per_chip_in_name: int  # v4 / v5p accelerator types count TensorCores
  slices: dict[int, str]  # chips -> the default topology of a slice of that many chips
  source: str = ''
  # libtpu's chip configuration: v4's two TensorCores act as one device ('megacore'), as JAX
  # sets them up on a v4 VM; described by default, each core would be a device of its own.
  chip_config: str = 'default'


_CUBES = {
    4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8',
    512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16', 6144: '16x16x24',
}  # fmt: skip
_PLANES = {
    1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16',
}  # fmt: skip
GIB = 2**30

CHIPS = {
    'v4': Chip(
        'v4', ('TPU v4',), 275.0, 30.75 * GIB, 1200.0, 6, 50.0, None, 2, _CUBES,
        source='ICI: the TPU v4 paper (Jouppi et al., ISCA 2023), 6 links of 400 Gbit/s each way',
        chip_config='megacore',
    ),
    'v5e': Chip('v5e', ('TPU v5 lite', 'TPU v5e'), 197.0, 15.75 * GIB, 819.0, 4, 50.0, 25.0, 1, _PLANES,
                source='DCN: 6.4 Tbit/s per 256-chip pod'),
    'v5p': Chip('v5p', ('TPU v5p', 'TPU v5'), 459.0, 95.74 * GIB, 2765.0, 6, 100.0, 50.0, 2, _CUBES),
    'v6e': Chip('v6e', ('TPU v6 lite', 'TPU v6e'), 918.0, 31.25 * GIB, 1638.0, 4, 100.0, None, 1, _PLANES),
}  # fmt: skip
# HBM: what the TPU compiler lets one program use (libtpu 0.0.42.1 names it in its out-of-memory
# error: "exceeds available HBM (95.74G)"), a little under the chips' 32 / 16 / 96 / 32 GiB.
# ICI link figures: the published bidirectional bandwidth per chip (v5e 400, v5p 1200, v6e 800
# GB/s) over the chip's ports, each way.
_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e'}


class TopologyError(ValueError):
  """A slice name, mesh or slice count that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as the user gave it
  chip: Chip
  topology: str  # 'v5p:4x4x4'
  chips: int
  num_slices: int


def known_names() -> str:
  return ', '.join(
      f'{g}-{min(c.slices) * c.cores_per_chip_in_name}..{max(c.slices) * c.cores_per_chip_in_name}'
      for g, c in CHIPS.items()
  )


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5p-128' / 'v5litepod-16' / 'v6e:16x16' -> the slice (chips, torus shape, chip figures)."""
  text = name.strip().lower()
  if num_slices < 1:
    raise TopologyError(f'--num_slices={num_slices}: needs at least 1 slice')
  m = re.fullmatch(r'(v\d+[a-z]*)[:](\d+(?:x\d+)+)', text)
  if m:
    generation, shape = _ALIASES.get(m[1], m[1]), m[2]
    chip = CHIPS.get(generation)
    if chip is None:
      raise TopologyError(
          f'--topology={name}: unknown TPU generation {m[1]!r} ({", ".join(CHIPS)})'
      )
    chips = math.prod(int(s) for s in shape.split('x'))
    return Slice(name, chip, f'{generation}:{shape}', chips, num_slices)
  m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', text)
  chip = CHIPS.get(_ALIASES.get(m[1], m[1])) if m else None
  if chip is None:
    raise TopologyError(
        f'--topology={name}: not a TPU slice name; expected one such as v4-32, v5p-128, '
        f'v5litepod-256 (v5e-256), v6e-256 or a topology such as v5p:4x4x4'
    )
  count = int(m[2])
  chips, rest = divmod(count, chip.cores_per_chip_in_name)
  if rest or chips not in chip.slices:
    sizes = ', '.join(str(c * chip.cores_per_chip_in_name) for c in sorted(chip.slices))
    raise TopologyError(f'--topology={name}: {chip.name} slices come in sizes {sizes}')
  return Slice(name, chip, f'{chip.name}:{chip.slices[chips]}', chips, num_slices)


def describe_devices(piece: Slice) -> list:
  """The devices of `piece` (all slices), described by libtpu without a TPU attached."""
  from jax.experimental import topologies

  from vitok.core import hardware

  if not hardware.tpu_chips_present():
    # libtpu reads the TPU VM's accelerator type and worker hostnames when it loads, and without
    # a TPU VM prints errors about both on stderr; plausible values keep it quiet (they do not
    # change the topology it describes).
    os.environ.setdefault(
        'TPU_ACCELERATOR_TYPE',
        f'{piece.chip.name}-{piece.chips * piece.chip.cores_per_chip_in_name}',
    )
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  try:
    options = (
        {} if piece.chip.chip_config == 'default' else {'chip_config_name': piece.chip.chip_config}
    )
    desc = topologies.get_topology_desc(
        piece.topology, 'tpu', num_slices=piece.num_slices, **options
    )
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not hardware.libtpu_installed():
      raise TopologyError(
          f'--topology={piece.name} needs the TPU compiler (libtpu): pip install -e ".[tpu]"'
      ) from None
    if 'lockfile' in message:
      raise TopologyError(
          f'--topology={piece.name}: another process holds libtpu ({message}); set '
          'ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it'
      ) from None
    raise TopologyError(f'--topology={piece.name}: {message}') from None
  return list(desc.devices)


def chip_of(device) -> Chip | None:
  """The Chip whose device kinds name `device` (None for CPUs and GPUs)."""
  kind = getattr(device, 'device_kind', '').lower()
  for chip in sorted(CHIPS.values(), key=lambda c: -max(len(k) for k in c.device_kinds)):
    if any(k.lower() == kind for k in chip.device_kinds):
      return chip
  return None


# ------------------------------------------------------------------------------------------------
# Meshes on the torus.
# ------------------------------------------------------------------------------------------------


def physical_shape(devices: Sequence) -> tuple[int, ...] | None:
  """The torus of one slice's TPU devices, from their coordinates (None without coordinates)."""
  coords = [getattr(d, 'coords', None) for d in devices]
  if any(c is None for c in coords):
    return None
  return tuple(int(max(c[i] for c in coords)) + 1 for i in range(len(coords[0])))


def mappable_shapes(physical: Sequence[int], num_axes: int) -> list[tuple[int, ...]]:
  """Logical mesh shapes of `num_axes` axes in which every axis is a product of whole physical
  axes: the shapes that map onto the torus without splitting one of its axes."""
  physical = [p for p in physical if p > 1]
  shapes = set()
  for owner in itertools.product(range(num_axes), repeat=len(physical)):
    sizes = [1] * num_axes
    for size, axis in zip(physical, owner):
      sizes[axis] *= size
    shapes.add(tuple(sizes))
  return sorted(shapes, reverse=True)


def slices_of(devices: Sequence) -> list[int]:
  return [int(getattr(d, 'slice_index', 0) or 0) for d in devices]


def device_grid(
    ici: Sequence[int], dcn: Sequence[int], devices: Sequence, allow_split: bool = True
) -> tuple[np.ndarray, str]:
  """The devices arranged as a mesh of shape ici * dcn (elementwise): inside each slice by
  `ici` laid onto its torus, slices by `dcn`. Returns (grid, note): the note says when a
  physical axis had to be split (collectives over such an axis cross it in pieces, slower than
  a whole ring) and which shapes map whole. Raises TopologyError naming the shapes that map when
  the mesh needs a split and `allow_split` is False (or cannot be laid out at all)."""
  from jax.experimental import mesh_utils

  num_slices = len(set(slices_of(devices)))
  tpu = getattr(devices[0], 'platform', '') == 'tpu'
  if not tpu:
    if num_slices > 1:
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), ''
    return mesh_utils.create_device_mesh(ici, devices), ''
  physical = physical_shape([d for d in devices if slices_of([d])[0] == slices_of(devices)[0]])
  mapped = mappable_shapes(physical or (), len(ici))
  shape_text = 'x'.join(map(str, ici))

  def build(split: bool):
    if num_slices > 1:
      return mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices, allow_split_physical_axes=split
      )
    return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=split)

  try:
    return build(False), ''
  except (NotImplementedError, ValueError, AssertionError):
    pass
  names = ', '.join('x'.join(map(str, s)) for s in mapped)
  torus = 'x'.join(map(str, physical or ()))
  if not allow_split:
    raise TopologyError(
        f'mesh {shape_text} does not map onto whole axes of the {torus} torus of this slice; '
        f'shapes that do: {names} (or set config.mesh.allow_split_physical_axes=True)'
    )
  try:
    grid = build(True)
  except (NotImplementedError, ValueError, AssertionError) as e:
    raise TopologyError(
        f'mesh {shape_text} cannot be laid onto the {torus} torus of this slice ({e}); '
        f'shapes that map onto whole torus axes: {names}'
    ) from None
  return grid, (
      f'mesh {shape_text} splits physical axes of the {torus} torus (its collectives run over '
      f'pieces of rings); shapes that map onto whole axes: {names}'
  )
