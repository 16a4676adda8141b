"""Model-agnostic training state, optimizer and jitted train step (shared by ViTok and the DiT).

The state is one pytree, so it can be checkpointed by Orbax and sharded with one
`jax.jit(..., in_shardings=..., out_shardings=...)` (see `StateLayout` and `compile_train_step`):

    TrainState(step, params, opt_state, ema_params, rng)

`params` is the `nnx.State` of the model's `nnx.Param`s; the model's structure (its `GraphDef`) is
static and lives outside the state. A model-specific `loss_fn(model, batch, rng, frozen, step)`
returns `(loss, metrics)`; `frozen` carries non-trained arrays (e.g. the LPIPS network), passed as a
jit argument because closed-over weights get constant-folded by XLA at great compile-time cost.

By default one optimizer (`make_optimizer`) updates every parameter. A model whose parameters are
trained by different optimizers, or partly frozen (ViTok stage 2: the decoder by one AdamW, the
discriminator by another, the encoder not at all), describes them with `ParamGroups`; the state
stays one pytree, so checkpoints, sharding and resume work the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vitok.core import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: Any  # nnx.State of nnx.Param
  opt_state: Any  # optax state (moments follow their parameters' structure)
  ema_params: Any  # same structure as params, or None when EMA is off
  rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)


def peak_learning_rate(optim_cfg, batch_size: int) -> float:
  """The configured peak LR, or the paper's 1e-4 x batch / 256 when `optim.lr` is 0."""
  return float(optim_cfg.lr) if optim_cfg.lr > 0 else 1e-4 * batch_size / 256


def learning_rate_schedule(optim_cfg, batch_size: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `end_lr_fraction` x peak."""
  peak = peak_learning_rate(optim_cfg, batch_size)
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=peak * optim_cfg.end_lr_fraction,
  )


def _decay_mask(params):
  # Weight decay on matrices only; biases and LayerNorm scales are not decayed.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, batch_size: int, total_steps: int):
  """AdamW(b1, b2) with global-norm clipping applied to the gradients first. Returns (tx, schedule)."""
  schedule = learning_rate_schedule(optim_cfg, batch_size, total_steps)
  adamw = optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      weight_decay=optim_cfg.weight_decay,
      mask=_decay_mask,
  )
  if optim_cfg.clip_norm > 0:
    # Clipping is a gradient transformation, so it acts on the gradients of this step, after the
    # backward pass (the released code clipped before backward, which never clipped anything).
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw), schedule
  return adamw, schedule


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """Parameters updated by different optimizers in one step, or frozen.

  `group(path)` names the group of the parameter at `path` (its attribute names, e.g.
  `('tokenizer', 'decoder', 'blocks', ...)`), or returns None for a frozen parameter. A frozen
  parameter gets no gradient (it is read through `stop_gradient`, so XLA skips its backward), no
  optimizer state, no EMA averaging, and keeps its value bit for bit. `optimizers` maps each group
  name to its optax transformation; `schedule` is the learning rate logged as `lr`."""

  group: Callable[[tuple[str, ...]], str | None]
  optimizers: Mapping[str, optax.GradientTransformation]
  schedule: optax.Schedule

  def labels(self, params) -> Any:
    """The group name of every leaf of `params` (`_FROZEN` for frozen ones)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: self.group(names(path)) or _FROZEN, params
    )

  def optimizer(self) -> optax.GradientTransformation:
    """One transformation over the whole parameter tree: each group's own, zeros when frozen."""
    return optax.multi_transform(
        dict(self.optimizers, **{_FROZEN: optax.set_to_zero()}), self.labels
    )

  def frozen_mask(self, params) -> Any:
    """True at every frozen leaf of `params`."""
    return jax.tree.map(lambda label: label == _FROZEN, self.labels(params))


_FROZEN = 'frozen'


def names(path) -> tuple[str, ...]:
  """A pytree key path as attribute / key names (the Variable's own 'value' key included)."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def init_train_state(model: nnx.Module, tx, rng: jax.Array, ema: bool) -> tuple[Any, TrainState]:
  """Splits the model into (graphdef, state). Returns the graphdef and a step-0 TrainState."""
  graphdef, params = nnx.split(model, nnx.Param)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      rng=rng,
  )
  return graphdef, state


def make_train_step(
    graphdef, loss_fn: Callable, tx, schedule, ema_decay: float, groups: ParamGroups | None = None
):
  """Builds the pure train step `(state, batch, frozen) -> (state, metrics)`.

  The caller jits it with the state donated, so parameters and optimizer moments are updated in
  place on device; metrics stay on device until the host asks for them at a logging step.
  `groups` (with `tx = groups.optimizer()`) marks the frozen parameters, which are neither
  differentiated, nor updated, nor averaged."""

  def train_step(state: TrainState, batch, frozen):
    step_rng = jax.random.fold_in(state.rng, state.step)
    fixed = (
        groups.frozen_mask(state.params) if groups else jax.tree.map(lambda _: False, state.params)
    )

    def compute_loss(params):
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, fixed)
      return loss_fn(nnx.merge(graphdef, params), batch, step_rng, frozen, state.step)

    (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    with jax.named_scope('optimizer'):  # names the update's ops in profiles (core/profile.py)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      # Frozen parameters keep their bits (adding a zero update would turn -0.0 into +0.0).
      params = jax.tree.map(
          lambda p, u, f: p if f else optax.apply_updates(p, u), state.params, updates, fixed
      )
      ema_params = state.ema_params
      if ema_params is not None:
        ema_params = jax.tree.map(
            lambda e, p, f: e if f else ema_decay * e + (1.0 - ema_decay) * p,
            ema_params,
            params,
            fixed,
        )
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
    )
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------------------------
# Sharded creation and compilation.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Where every array of the TrainState lives on a mesh, and how to create it there.

  `abstract` is the state as `jax.ShapeDtypeStruct`s carrying their target shardings: the restore
  target for Orbax, and the input spec for ahead-of-time compilation."""

  graphdef: Any
  tx: Any
  schedule: Any
  groups: ParamGroups | None  # None: one optimizer over every parameter
  mesh: jax.sharding.Mesh
  rules: Any
  shardings: Any  # TrainState of NamedSharding
  abstract: Any  # TrainState of ShapeDtypeStruct(sharding=...)
  _init: Callable[[], TrainState]

  def init(self) -> TrainState:
    """Step-0 state, born sharded: each device computes only its own shards of every parameter."""
    return self._init()


def state_layout(
    create_model: Callable[[nnx.Rngs], nnx.Module],
    config,
    mesh,
    total_steps: int,
    groups: ParamGroups | None = None,
) -> StateLayout:
  """The TrainState layout of a model family on `mesh` under `config.sharding_rules`, trained by
  `make_optimizer(config.optim)` or, when given, by the optimizers of `groups`.

  Parameters are sharded by their logical axis names; optimizer moments and the EMA keep their
  parameter's names (optax and jax.tree.map carry the nnx metadata), so they follow it."""
  if groups is None:
    tx, schedule = make_optimizer(config.optim, config.data.batch_size, total_steps)
  else:
    tx, schedule = groups.optimizer(), groups.schedule
  ema = config.optim.ema_decay > 0

  def init() -> TrainState:
    model = create_model(nnx.Rngs(params=config.seed))
    return init_train_state(model, tx, jax.random.PRNGKey(config.seed + 1), ema)[1]

  graphdef = nnx.split(nnx.eval_shape(lambda: create_model(nnx.Rngs(params=0))), nnx.Param)[0]
  shapes = jax.eval_shape(init)
  shardings = sharding.state_shardings(shapes, mesh, config.sharding_rules)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  return StateLayout(
      graphdef=graphdef,
      tx=tx,
      schedule=schedule,
      groups=groups,
      mesh=mesh,
      rules=config.sharding_rules,
      shardings=shardings,
      abstract=abstract,
      _init=jax.jit(init, out_shardings=shardings),
  )


def compile_train_step(
    layout: StateLayout, loss_fn: Callable, ema_decay: float, abstract_batch: Any, frozen: Any
):
  """Lowers and compiles the train step once, ahead of time, for the layout's shardings.

  The state is donated (updated in place); the batch is split over the data axes; the frozen
  arrays keep the shardings they carry (`frozen`: arrays or ShapeDtypeStructs, e.g. a task's
  `abstract_frozen`); metrics are replicated. Activations are constrained by the config's rules
  while tracing. Returns the `jax.stages.Compiled` step: call it as `step(state, batch, frozen)`."""
  mesh, rules = layout.mesh, layout.rules
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  step = jax.jit(
      make_train_step(
          layout.graphdef, loss_fn, layout.tx, layout.schedule, ema_decay, layout.groups
      ),
      in_shardings=(layout.shardings, batch_sharding, frozen_shardings),
      out_shardings=(layout.shardings, replicated),
      donate_argnums=0,
  )
  with sharding.activation_sharding(mesh, rules):
    lowered = step.lower(layout.abstract, abstract_batch, frozen)
  return lowered.compile()
