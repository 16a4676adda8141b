"""The Task contract: a model family that is not the tokenizer (a toy regression with a frozen,
sharded "teacher") trains, evaluates, checkpoints and resumes through the same loop, with no
special case for it; evaluators run on their own cadences and read the parameters they ask for."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common as common_config
from vitok.core import checkpoint as ckpt_lib
from vitok.core import sharding, trainer
from vitok.core import task as task_lib
from vitok.tokenizer import stage1

WIDTH = 16


class Regression(nnx.Module):

  def __init__(self, rngs):
    init = nnx.with_partitioning(
        nnx.initializers.normal(0.1), ('embed', 'mlp'), eager_sharding=False
    )
    self.w = nnx.Param(init(rngs.params(), (WIDTH, WIDTH)))

  def __call__(self, x):
    return x @ self.w[...]


class Teacher(nnx.Module):
  """A frozen network whose weight carries logical axes: it must be sharded like parameters."""

  def __init__(self):
    init = nnx.with_partitioning(
        lambda *_: jnp.eye(WIDTH) * 2.0, ('embed', 'mlp'), eager_sharding=False
    )
    self.w = nnx.Param(init(None, (WIDTH, WIDTH)))


def _example(index: int) -> dict:
  return {'x': np.random.default_rng(index).standard_normal(WIDTH).astype(np.float32)}


class RegressionTask:
  """Learns the teacher's map x -> 2x. Records every evaluator call."""

  name = 'regression'
  tokens_per_clip = 1
  progress_metrics = ('abs_error',)

  def __init__(self, config):
    self.config = config
    self.calls, self.errors = [], []

  def create_model(self, rngs):
    return Regression(rngs)

  def loss_fn(self, model, batch, rng, frozen, step):
    target = batch['x'] @ frozen['teacher']['w']
    error = model(batch['x']) - target
    return jnp.mean(error**2), {'abs_error': jnp.mean(jnp.abs(error))}

  def train_flops_per_clip(self):
    return 6 * WIDTH * WIDTH

  def abstract_batch(self):
    b = self.config.data.batch_size
    return {'x': jax.ShapeDtypeStruct((b, WIDTH), np.float32)}

  def prepare_data(self):
    return {'train': [_example(i) for i in range(64)]}

  def train_iterator(self, sources, start_step, process_index, process_count):
    ds = (
        grain.MapDataset.source(sources['train'])
        .repeat()
        .batch(self.config.data.batch_size, drop_remainder=True)
    )
    iterator = iter(ds.to_iter_dataset())
    if start_step:
      iterator.set_state({'next_index': start_step})
    return iterator

  def abstract_frozen(self, mesh):
    teacher = nnx.state(nnx.eval_shape(Teacher))
    return {'teacher': sharding.abstract_placed(teacher, mesh, self.config.sharding_rules)}

  def frozen(self, mesh):
    abstract = self.abstract_frozen(mesh)
    teacher = nnx.state(Teacher())
    return {'teacher': sharding.place(teacher, abstract['teacher'])}

  def evaluators(self):
    def error(kind):
      def run(context):
        self.calls.append((kind, context.step, context.params))
        x = jnp.asarray(np.stack([_example(1000 + i)['x'] for i in range(8)]))
        model = nnx.merge(context.graphdef, context.params)
        value = float(jnp.mean((model(x) - 2.0 * x) ** 2))
        self.errors.append((kind, value))
        return {f'{kind}_error': value}

      return run

    return [
        task_lib.Evaluator(
            'cheap', every=2, metrics=('raw_error',), run=error('raw'), use_ema=False
        ),
        task_lib.Evaluator('expensive', every=4, metrics=('ema_error',), run=error('ema')),
    ]

  def describe(self):
    return {'task': self.name, 'width': WIDTH}


def _config(steps=6):
  config = common_config.training_config('regression')
  config.update(
      total_steps=steps,
      log_every=1,
      ckpt_every=3,
      keep_best=1,
      best_metric='raw_error',
      best_mode='min',
  )
  config.data.batch_size = 8
  config.mesh.shape = (2, 4)
  config.optim.update(lr=0.2, warmup_steps=0, ema_decay=0.5, weight_decay=0.0)
  return config


def test_the_tokenizer_task_satisfies_the_contract(tiny_config):
  assert isinstance(stage1.TokenizerTask(tiny_config), task_lib.Task)
  assert isinstance(RegressionTask(_config()), task_lib.Task)


def test_another_family_trains_through_the_same_loop(tmp_path):
  config = _config()
  # Retention: the last checkpoint, and the best by raw_error. A checkpoint every 2 steps, so
  # that each is ranked by its step's evaluation; ranked by the largest error, so that the best
  # is not the latest (the error falls: the smallest is the last step's, kept anyway as the latest,
  # which would show nothing).
  config.update(ckpt_every=2, keep_checkpoints=1, best_mode='max')
  task = RegressionTask(config)
  workdir = tmp_path / 'run'
  result = trainer.train(task.config, str(workdir), task)
  # Cadences: the cheap evaluator every 2 steps, the expensive one every 4; both at the end.
  assert [(kind, step) for kind, step, _ in task.calls] == [
      ('raw', 2),
      ('raw', 4),
      ('ema', 4),
      ('raw', 6),
      ('ema', 6),
  ]
  final = {kind: params for kind, step, params in task.calls if step == 6}
  assert jax.tree.all(jax.tree.map(np.array_equal, final['raw'], result.state.params))
  assert jax.tree.all(jax.tree.map(np.array_equal, final['ema'], result.state.ema_params))
  assert not np.array_equal(result.state.params['w'][...], result.state.ema_params['w'][...])
  assert set(result.last_eval) == {'raw_error', 'ema_error'}
  raw = [value for kind, value in task.errors if kind == 'raw']
  assert raw == sorted(raw, reverse=True) and raw[-1] < 0.9 * raw[0], raw  # it learns
  # The frozen teacher was sharded by the rules like a parameter ('embed' over fsdp = 4 ways).
  frozen = task.frozen(sharding.make_mesh(task.config.mesh))
  assert frozen['teacher']['w'].sharding.shard_shape((WIDTH, WIDTH)) == (WIDTH // 4, WIDTH)
  # Checkpoints of this family restore like the tokenizer's; the best one is kept by its metric.
  # The best step, from what the run logged: one line of metrics.jsonl per evaluation, at the
  # steps the evaluators ran (2, 4, 6), all checkpointed.
  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  steps = sorted({step for _, step, _ in task.calls})
  assert steps == [2, 4, 6] and [m['raw_error'] for m in logged] == raw
  best_step, best = max(zip(steps, logged), key=lambda pair: pair[1]['raw_error'])
  assert best_step == 2  # not the latest
  kept = sorted(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  assert kept == [best_step, 6]  # step 4 deleted: neither the latest nor the best
  checkpointer = ckpt_lib.Checkpointer(str(workdir), create=False)
  assert checkpointer.all_steps() == kept and checkpointer.latest_step() == 6
  # The kept best checkpoint holds the parameters that scored it: their error, in numpy.
  abstract = trainer.create_layout(task, task.config).abstract.params
  w = np.asarray(checkpointer.restore_params(abstract, step=best_step)['w'][...], np.float64)
  x = np.stack([_example(1000 + i)['x'] for i in range(8)]).astype(np.float64)
  # (The run computed it in float32, to about 1e-6.)
  assert np.mean((x @ w - 2.0 * x) ** 2) == pytest.approx(best['raw_error'], rel=1e-5)
  checkpointer.close()


def test_a_best_metric_no_evaluator_reports_fails_at_start_up(tmp_path):
  config = _config()
  config.best_metric = 'psnr'
  with pytest.raises(
      ValueError,
      match=r"best_metric='psnr' is not a metric of the regression "
      r'evaluation \(raw_error, ema_error\)',
  ):
    trainer.train(config, str(tmp_path / 'run'), RegressionTask(config))
  assert not (tmp_path / 'run').exists()
