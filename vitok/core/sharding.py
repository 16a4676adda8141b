"""Device mesh, logical axis rules, and the one helper that shards activations.

Parameters and activations are annotated with *logical* axis names ('embed', 'mlp', 'batch', ...).
The config maps logical names to *mesh* axes, one rule set per model family:

    config.mesh.shape = (-1, 1)              # one size may be -1: all remaining devices (of a slice)
    config.mesh.axes = ('data', 'fsdp')
    config.mesh.dcn_shape = (2, 1)           # multi-slice: slices along the axes (default: data)
    config.sharding_rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'model'), ...)

so the same model runs data-parallel, FSDP (ZeRO-3: parameters, gradients and optimizer moments
split over 'fsdp', gathered per layer by XLA) or tensor-parallel ('model') by changing the config.
A rule may name mesh axes the mesh does not have (e.g. 'model' on a data x fsdp mesh): they are
ignored, so one rule set serves every mesh. A dimension that a mesh axis does not divide is left
unsharded on that axis (e.g. the 341-wide MLP of width 128), never padded.

The mesh uses `AxisType.Auto` axes: XLA's SPMD partitioner propagates shardings from the
annotated parameters, the batch, and the `constrain` calls at block boundaries.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LogicalAxes = Sequence[str | None]


def _as_tuple(value, separators: str = ',') -> tuple:
  """A tuple/list as is; a string such as '2x4' or 'data,fsdp' split at `separators`."""
  if isinstance(value, str):
    for sep in separators[1:]:
      value = value.replace(sep, separators[0])
    return tuple(s.strip() for s in value.split(separators[0]) if s.strip())
  return tuple(value)


def mesh_axes(axes) -> tuple[str, ...]:
  """config.mesh.axes as a tuple of names: ('data', 'fsdp') or 'data,fsdp'."""
  return tuple(str(a) for a in _as_tuple(axes))


def parse_mesh_shape(shape) -> tuple[int, ...]:
  """The one parser of mesh shapes: (2, 4), [2, 4], '2x4', '2,4', ('2x4',) -> (2, 4). Sizes are
  not checked against devices here (see `mesh_shape`). Raises ValueError naming the value."""
  if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], str):
    shape = shape[0]  # --config.mesh.shape=2x4 arrives as ('2x4',)
  try:
    sizes = tuple(int(s) for s in _as_tuple(shape, ',x'))
  except (TypeError, ValueError):
    raise ValueError(
        f'{shape!r} is not a mesh shape: expected sizes such as (2, 4), "2x4" or (-1, 1)'
    ) from None
  if not sizes:
    raise ValueError(f'{shape!r} is not a mesh shape: it names no size')
  return sizes


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """Resolves `config.mesh` against a device count: (sizes with -1 filled in, axis names).

  Raises ValueError naming `config.mesh.*` and both numbers when the mesh cannot be built."""
  axes = mesh_axes(mesh_cfg.axes)
  try:
    sizes = parse_mesh_shape(mesh_cfg.shape)
  except ValueError as e:
    raise ValueError(f'config.mesh.shape: {e}') from None
  if len(axes) != len(sizes) or not axes:
    raise ValueError(
        f'config.mesh.shape={sizes} and config.mesh.axes={axes} must have the same '
        f'(non-zero) length'
    )
  if len(set(axes)) != len(axes):
    raise ValueError(f'config.mesh.axes={axes} repeats an axis name')
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh.shape={sizes}: sizes must be positive, with at most one -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f'config.mesh.shape={sizes} cannot fill {num_devices} devices: '
          f'{num_devices} is not divisible by {known}'
      )
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'config.mesh.shape={sizes} needs {math.prod(sizes)} devices but '
        f'{num_devices} are available (use -1 for one axis to fill them)'
    )
  return sizes, axes


def dcn_shape(mesh_cfg, num_slices: int, num_axes: int) -> tuple[int, ...]:
  """`config.mesh.dcn_shape` resolved for `num_slices` slices: how the slices are laid along the
  mesh axes over the data-centre network (one size may be -1). Empty (the default) puts all
  slices on the first axis: data parallelism across slices, as MaxText's dcn_data_parallelism."""
  raw = mesh_cfg.get('dcn_shape', ()) if hasattr(mesh_cfg, 'get') else ()
  if raw in ((), [], '', ('',)):
    return (num_slices,) + (1,) * (num_axes - 1)
  try:
    sizes = parse_mesh_shape(raw)
  except ValueError as e:
    raise ValueError(f'config.mesh.dcn_shape: {e}') from None
  if len(sizes) != num_axes or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f'config.mesh.dcn_shape={sizes}: needs {num_axes} positive sizes (one may be -1), one per '
        f'mesh axis'
    )
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes and num_slices % known == 0:
    sizes = tuple(num_slices // known if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_slices:
    raise ValueError(
        f'config.mesh.dcn_shape={sizes} lays out {math.prod(sizes)} slices but the job has '
        f'{num_slices}'
    )
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.mesh` over `devices` (default: all devices of all processes).

  `config.mesh.shape` is the mesh inside one slice (all devices, for a job of one slice), laid
  onto a TPU slice's torus so that each mesh axis is a whole ring where it can be; with several
  slices (devices with several `slice_index`es) `config.mesh.dcn_shape` lays the slices along
  the same axes, and each mesh axis is the product of the two (`mesh_utils`' hybrid mesh). A mesh
  that only fits by splitting a physical axis of the torus is built with a note naming the shapes
  that map whole; one that cannot be laid out raises ValueError naming them."""
  from vitok.core import topology  # TPU slices; imports nothing of this module

  devices = list(jax.devices() if devices is None else devices)
  num_slices = len(set(topology.slices_of(devices)))
  sizes, axes = mesh_shape(mesh_cfg, len(devices) // num_slices)
  dcn = dcn_shape(mesh_cfg, num_slices, len(axes))
  try:
    split = (
        bool(mesh_cfg.get('allow_split_physical_axes', True)) if hasattr(mesh_cfg, 'get') else True
    )
    grid, note = topology.device_grid(sizes, dcn, devices, allow_split=split)
  except topology.TopologyError as e:
    raise ValueError(f'config.mesh.shape={sizes}: {e}') from None
  if note and jax.process_index() == 0:
    print(f'config.mesh.shape={"x".join(map(str, sizes))}: {note}', flush=True)
  return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec.
# ----------------------------------------------------------------------------------------------


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
  """`(('embed', 'fsdp'), ('batch', ('data', 'fsdp')), ('length', None))` -> name -> mesh axes."""
  out = {}
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(
          f'config.sharding_rules: each rule is (logical_name, mesh_axes), got {rule!r}'
      )
    name, axes = rule
    out[str(name)] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return out


def logical_to_spec(
    logical_axes: LogicalAxes, rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> P:
  """PartitionSpec for an array whose dimensions carry `logical_axes`.

  Mesh axes the mesh lacks are dropped, a mesh axis is used by at most one dimension, and (when
  `shape` is given) axes that do not divide the dimension are dropped from the end of its list."""
  rules = rules if isinstance(rules, dict) else rules_dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    axes = [a for a in rules.get(name, ()) if a in mesh.shape and a not in used] if name else []
    if shape is not None:
      while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for every leaf of a (train-)state pytree.

  `nnx.Variable` leaves annotated with `nnx.with_partitioning` (parameters, and the optimizer
  moments and EMA copies optax/`jax.tree.map` derive from them, which keep the metadata) are
  sharded by their logical names; everything else (step, RNG, counters) is replicated."""
  rules = rules_dict(rules)

  def one(leaf):
    if _is_variable(leaf) and not hasattr(leaf, 'shape'):
      return leaf  # holds no array: optax's placeholder for a parameter another group owns
    if _is_variable(leaf):
      names = leaf.get_metadata().get('out_sharding')
      spec = logical_to_spec(names, rules, mesh, leaf.shape) if names else P()
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def undivided(abstract_params: Any, mesh: Mesh, rules) -> list[str]:
  """Parameters whose rules name a mesh axis that does not divide the dimension (so that
  dimension stays whole), as 'path dim size (axis)' strings for the start-up log."""
  rules = rules_dict(rules)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=_is_variable):
    names = leaf.get_metadata().get('out_sharding') if _is_variable(leaf) else None
    for dim, name in enumerate(names or ()):
      wanted = [a for a in rules.get(name, ()) if a in mesh.shape] if name else []
      got = logical_to_spec((name,), rules, mesh, (leaf.shape[dim],))
      if wanted and (not got or got[0] is None):
        where = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
        out.append(f'{where} dim {dim} ({leaf.shape[dim]}) over {"x".join(wanted)}')
  return out


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over the mesh axes the 'batch' rule names; the rest replicated."""
  spec = logical_to_spec(('batch',) + (None,) * (ndim - 1), rules, mesh)
  return NamedSharding(mesh, spec)


def check_process_rows(batch_sharding: NamedSharding, global_batch: int, field: str) -> None:
  """Each process feeds `jax.make_array_from_process_local_data` the rows [p*b, (p+1)*b) of every
  global batch (b = batch / processes), so its devices must hold exactly those rows. That holds
  when the mesh's data axes are outermost over hosts; a mesh that splits hosts along a
  non-batch axis (e.g. 'model' across hosts) would silently mix up rows, so it fails here."""
  index, count = jax.process_index(), jax.process_count()
  rows = set()
  for idx in batch_sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*idx[0].indices(global_batch)))
  per_process = global_batch // count
  if rows != set(range(index * per_process, (index + 1) * per_process)):
    raise ValueError(
        f'{field}={global_batch}: process {index} of {count} holds batch rows {sorted(rows)[:8]}... '
        f'on mesh {dict(batch_sharding.mesh.shape)}, not its own contiguous block of '
        f'{per_process}; put the batch (data) axes outermost so they span the hosts'
    )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_placed(tree: Any, mesh: Mesh, rules) -> Any:
  """`tree` (arrays, ShapeDtypeStructs, or an nnx.State whose Variables carry logical axes) as
  ShapeDtypeStructs with their shardings on `mesh`: annotated Variables sharded by `rules`, like
  trained parameters; everything else replicated. Nothing is allocated."""
  shardings = state_shardings(tree, mesh, rules)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
  )


def place(tree: Any, abstract: Any) -> Any:
  """Host arrays (identical on every process) -> global arrays laid out as `abstract` says."""
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(
          a.shape, a.sharding, lambda idx: np.asarray(x)[idx]
      ),
      tree,
      abstract,
  )


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch is split (the product of the mesh axes of the 'batch' rule)."""
  spec = logical_to_spec(('batch',), rules, mesh)
  axes = spec[0] if spec else None
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


# ----------------------------------------------------------------------------------------------
# Activations.
# ----------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar('vitok_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """While tracing inside this context, `constrain` shards activations on `mesh` by `rules`."""
  token = _ACTIVE.set((mesh, rules_dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, dict] | None:
  """(mesh, rules) of the enclosing `activation_sharding`, or None outside one."""
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
  """Pins the sharding of activation `x` by its logical axes (e.g. ('batch', 'act_length',
  'act_embed')). A no-op outside `activation_sharding`, so the model runs unchanged on one device.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_mapped(fn, logical_axes: LogicalAxes, *args: jax.Array) -> jax.Array:
  """`fn(*args)` run on every device's shard of `args` (all laid out by `logical_axes`), its
  result laid out the same way: for kernels XLA's partitioner cannot split, such as Pallas calls,
  applied only where `fn` is independent across the sharded dimensions (e.g. attention over batch
  and heads). A plain call outside `activation_sharding`."""
  active = _ACTIVE.get()
  if active is None:
    return fn(*args)
  mesh, rules = active
  spec = logical_to_spec(logical_axes, rules, mesh, args[0].shape)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False
  )(*args)


# Context parallelism (vitok/nn/context_parallel.py): the schemes of model.context_attention, and
# the layout of attention's q, k and v, (B, L, heads, head_dim).
CONTEXT_SCHEMES = ('all_to_all', 'ring')
ATTENTION_HEADS = ('batch', 'act_length', 'act_heads', None)


def check_context_split(
    mesh: Mesh, rules, length: int, heads: int, scheme: str, what: str = ''
) -> int:
  """The number of ways the context axes split `length` tokens; raises ValueError in one line
  when they do not split evenly, or (all-to-all) the heads on a device do not. `what` names the
  attention stack in the message. Run at start-up (`trainer.check_context_split`) and again
  while tracing (vitok/nn/context_parallel.py)."""
  if scheme not in CONTEXT_SCHEMES:
    raise ValueError(
        f'model.context_attention must be one of {list(CONTEXT_SCHEMES)}, got {scheme!r}'
    )
  rules = rules_dict(rules) if not isinstance(rules, dict) else rules
  axes = [a for a in rules.get('act_length', ()) if mesh.shape.get(a, 1) > 1]
  n = math.prod(mesh.shape[a] for a in axes)
  if n == 1:
    return 1
  where = f"the mesh's {' x '.join(f'{a}={mesh.shape[a]}' for a in axes)} axis"
  what = f' of the {what}' if what else ''
  if length % n:
    raise ValueError(
        f'{length} tokens per clip{what} do not split evenly over {where}: choose data.frames, '
        f'data.res or config.mesh.shape so that the token count is a multiple of {n}'
    )
  spec = logical_to_spec(ATTENTION_HEADS, rules, mesh, (mesh.size, length, heads, 1))
  heads_axes = spec[2] if len(spec) > 2 and spec[2] is not None else ()
  heads_axes = (heads_axes,) if isinstance(heads_axes, str) else heads_axes
  local_heads = heads // math.prod(mesh.shape[a] for a in heads_axes)
  if scheme == 'all_to_all' and local_heads % n:
    raise ValueError(
        f"model.context_attention='all_to_all' gathers whole sequences for {local_heads} heads "
        f"per device{what}, which do not split over {where}: use model.context_attention='ring'"
    )
  return n


def abstract_bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes per device (the largest shard) of abstract arrays placed with `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard_shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total
