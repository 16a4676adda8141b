"""The contract between the shared training infrastructure and a model family.

The loop (`vitok.core.trainer`), the checkpoints, `launch.plan`, `launch.bench`, `launch.eval` and
`launch.export` know a model only through a `Task`: what it trains (`create_model`, `loss_fn`),
what it reads (`abstract_batch`, `prepare_data`, `train_iterator`), what it keeps frozen
(`abstract_frozen`, `frozen`), how it is optimised and initialised (optional `param_groups`,
`warm_start`), how it is evaluated (`evaluators`) and what its costs are
(`train_flops_per_clip`, `describe`). `config.task` names the family; the launch scripts find
its Task class in `launch/tasks.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator is given: the model's structure and parameters, the frozen arrays, the
  prepared data splits, the step being evaluated, the run directory (where process 0 writes
  samples and metrics.jsonl) and the mesh."""

  graphdef: Any
  params: Any
  frozen: Any
  sources: Mapping[str, Any]
  step: int
  workdir: str
  mesh: jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One evaluation of a run, with its own cadence.

  `run(context)` returns a dict of results; the float-valued ones named in `metrics` are logged to
  TensorBoard under eval/ and may rank checkpoints (`config.best_metric`). Cheap evaluators (a
  loss at fixed timesteps) run often; expensive ones (sampling, decoding, feature networks)
  rarely. Every evaluator also runs at the last step, unless it is not run `during_training`."""

  name: str
  every: int  # steps between runs
  metrics: tuple[str, ...]  # the metrics `run` reports
  run: Callable[[EvalContext], dict]
  use_ema: bool = True  # the EMA parameters when the run keeps them
  during_training: bool = True  # False: only `launch.eval` runs it (e.g. a costly metric)

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every == 0 or step == total_steps


def cadence(config, name: str) -> dict:
  """The Evaluator fields (`every`, `during_training`) of `config.evals.<name>.every`: > 0 every
  that many steps and at the last; 0 at the last step only; -1 not during training."""
  every, last = int(config.evals[name].every), max(int(config.total_steps), 1)
  return dict(every=every if every > 0 else last, during_training=every >= 0)


@runtime_checkable
class Task(Protocol):
  """A model family as the shared infrastructure sees it (see the module docstring)."""

  name: str  # the family, as in config.task
  tokens_per_clip: int  # sequence length of one clip, for tokens/s
  progress_metrics: tuple[str, ...]  # train metrics shown beside the loss while training

  def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The model to train, its parameters annotated with logical axis names."""

  def loss_fn(
      self, model: nnx.Module, batch: dict, rng: jax.Array, frozen: Any, step: jax.Array
  ) -> tuple[jax.Array, dict]:
    """(scalar loss, dict of scalar metrics) of one global batch at optimizer step `step` (an int32
    scalar, for schedules inside the objective); traced inside the train step."""

  def train_flops_per_clip(self) -> int:
    """Model FLOPs of one training clip (forward + backward), the MFU numerator."""

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one global training batch."""

  def prepare_data(self) -> dict[str, Any]:
    """Split name -> random-access source, built on disk first when needed (the trainer calls it
    on process 0 before the others, so processes never build the same files at once)."""

  def train_iterator(
      self, sources: Mapping[str, Any], start_step: int, process_index: int, process_count: int
  ) -> Iterator[dict]:
    """This process's rows of global training batches `start_step`, `start_step + 1`, ...: a grain
    DatasetIterator (get_state / set_state), a pure function of the step."""

  def abstract_frozen(self, mesh: jax.sharding.Mesh) -> Any:
    """The frozen (never trained) arrays the loss and evaluators read, as ShapeDtypeStructs with
    their shardings on `mesh`: parameters carrying logical axes are sharded by the config's rules
    like trained ones, the rest replicated. Passed to the compiled step as an argument."""

  def frozen(self, mesh: jax.sharding.Mesh) -> Any:
    """The frozen arrays themselves, placed as `abstract_frozen` says."""

  def evaluators(self) -> Sequence[Evaluator]:
    """The evaluations of a run, each with its cadence."""

  def describe(self) -> dict:
    """Sizes and analytic costs of the configured model, for `launch.plan` (no compilation)."""

  # Optional hooks (the trainer uses them when the Task has them):
  #   param_groups(total_steps) -> train_state.ParamGroups: several optimizers, frozen parameters
  #     (default: `make_optimizer(config.optim)` over every parameter);
  #   warm_start(params, mesh) -> params: the parameters a new run starts from, given its freshly
  #     initialised ones, e.g. a finished run's (default: the initialisation). Resumed runs never
  #     call it.


def evaluation_metrics(task: Task) -> tuple[str, ...]:
  """Every metric the task's evaluators report during training (the candidates for
  config.best_metric)."""
  return tuple(m for e in task.evaluators() if e.during_training for m in e.metrics)
