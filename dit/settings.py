"""Everything a DiT run derives from its config, resolved and checked once, when the task is made:
the latent cache's description, the frozen tokenizer's architecture, the DiT's config, the
training windows and strides, the known-frame mix, the classes to sample. A config that cannot
work fails here, naming the field, before any data, weights or workdir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dit import evaluation as dit_evaluation
from dit import latents as latents_lib
from dit import model as dit_model
from vitok.core import config_checks, hardware, sharding
from vitok.data import datasets
from vitok.nn import layers
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import model as tokenizer

FIELDS = {
    'diffusion.objective': config_checks.OneOf(('ddpm', 'flow')),
    'diffusion.label_dropout': config_checks.FRACTION,
    'diffusion.t_std': config_checks.POSITIVE,
    'diffusion.t_mean': config_checks.Range(),
    'sample.sampler': config_checks.OneOf(('ddim', 'ancestral', 'euler', 'heun')),
    'sample.steps': config_checks.AT_LEAST_1,
    'sample.eta': config_checks.FRACTION,
    'sample.guidance': config_checks.Range(0),
    'sample.guidance_low': config_checks.FRACTION,
    'sample.guidance_high': config_checks.FRACTION,
    'sample.per_class': config_checks.AT_LEAST_1,
    'model.num_classes': config_checks.Range(0, note='0 = from the latent cache'),
    'accuracy.classifier': config_checks.OneOf(('',) + tuple(dit_evaluation.JUDGES)),
    'accuracy.per_class': config_checks.AT_LEAST_1,
    'accuracy.real_clips': config_checks.AT_LEAST_1,
    'generation.clips': config_checks.Range(0, note='0 = as many as the real held-out clips'),
    'latents.source': config_checks.OneOf(('cache', 'video')),
    'tokenizer.context_attention': config_checks.OneOf(sharding.CONTEXT_SCHEMES),
    'latents.stats_clips': config_checks.AT_LEAST_1,
    'latents.window': config_checks.Range(0, note='0 = the cached clip whole'),
    'model.frame_positions': config_checks.Range(0, note='0 = no learned frame table'),
    'known.none': config_checks.Range(0),
    'known.prefix': config_checks.Range(0),
    'known.ends': config_checks.Range(0),
    'known.sparse': config_checks.Range(0),
    'finetune.trainable': config_checks.OneOf(('all', 'time')),
    'long.context': config_checks.AT_LEAST_1,
    'long.max_windows': config_checks.Range(0, note='0 = no limit'),
    **{f'evals.{name}.every': config_checks.EVAL_EVERY for name in dit_evaluation.EVALUATORS},
}


@dataclasses.dataclass(frozen=True)
class DiTSettings:
  on_the_fly: bool  # latents.source='video': clips encoded by the frozen tokenizer in the step
  latents: latents_lib.Metadata | None  # the cache's description (None encoding on the fly)
  tokenizer_dir: str  # '' (plan, bench): a tokenizer of config.tokenizer's shape, no weights
  tokenizer_cfg: tokenizer.TokenizerConfig
  model_cfg: dit_model.DiTConfig
  window: int  # latent frames of a training window of the cached sequences (0: the clip whole)
  strides: tuple[int, ...]  # frame strides the model is told (empty: none)
  known_weights: tuple[float, float, float, float]  # none / prefix / ends / sparse masks
  clip_latents: int  # latent frames the frozen tokenizer codes at once
  sample_classes: tuple[int, ...]
  eval_split: str  # the held-out split: of the latent cache, or of config.data


def resolve(config) -> DiTSettings:
  """The settings of `config` (see the module docstring). Raises ConfigError naming the field."""
  config_checks.check_fields(config, FIELDS)
  on_the_fly = config.latents.source == 'video'
  if on_the_fly and config.latents.dir:
    raise config_checks.ConfigError(
        f"config.latents.source='video' encodes config.data's clips on the fly, but "
        f'config.latents.dir={config.latents.dir} names a cache: set one of them'
    )
  latents = latent_description(config)
  # The frozen tokenizer: the one named, else the one the cache was encoded with, else (plan,
  # bench: no weights needed) the architecture config.tokenizer describes.
  tokenizer_dir = config.tokenizer.dir or (latents.tokenizer if latents else '')
  if tokenizer_dir:
    tok_run = frozen_tokenizer.read_tokenizer_config(tokenizer_dir)
    tok_model, tok_frames = tok_run.model, int(tok_run.data.frames)
  else:
    tok_model = dict(variant=config.tokenizer.variant, channels=config.tokenizer.channels)
    tok_frames = None
  # dtype / attention 'auto' (a tokenizer trained with them) resolved for this run's clips.
  tokenizer_cfg = frozen_tokenizer.model_config(tok_model, config.data.frames, config.data.res)
  tokenizer_cfg = dataclasses.replace(
      tokenizer_cfg, context_attention=config.tokenizer.context_attention
  )
  grid = tokenizer_cfg.latent_grid(config.data.frames, config.data.res)
  channels, num_classes = tokenizer_cfg.channels, config.model.num_classes
  if latents:
    grid, num_classes = latents.grid, num_classes or latents.num_classes
    if latents.channels != channels:
      raise config_checks.ConfigError(
          f'the latents of config.latents.dir={config.latents.dir} have {latents.channels} '
          f'channels but the tokenizer {tokenizer_dir} makes {channels}: the DiT and the '
          'tokenizer do not fit together'
      )
  strides = _strides(config)
  window = int(config.latents.window)
  grid = _window_grid(config, tuple(grid), window, strides, on_the_fly)
  if not num_classes and on_the_fly:
    num_classes = _data_classes(config.data)
  if not num_classes:
    raise config_checks.ConfigError(
        'config.model.num_classes=0 means "from the latent cache", but config.latents.dir is empty'
    )
  model_cfg = _model_config(config, grid, channels, num_classes, strides)
  if latents is not None and latents.clip_latents:
    clip_latents = latents.clip_latents
  elif tok_frames is not None:
    clip_latents = tokenizer_cfg.latent_grid(tok_frames, tokenizer_cfg.parsed.p)[0]
  else:
    clip_latents = model_cfg.grid[0]
  known_weights = _check_long_video_fields(config, model_cfg, strides, clip_latents)
  _check_sampling(config, num_classes)
  _check_judge(config, latents, on_the_fly)
  return DiTSettings(
      on_the_fly=on_the_fly,
      latents=latents,
      tokenizer_dir=tokenizer_dir,
      tokenizer_cfg=tokenizer_cfg,
      model_cfg=model_cfg,
      window=window,
      strides=strides,
      known_weights=known_weights,
      clip_latents=int(clip_latents),
      sample_classes=_sample_classes(config, num_classes),
      eval_split=config.data.eval_split if on_the_fly else config.latents.eval_split,
  )


def _model_config(config, grid, channels: int, num_classes: int, strides) -> dit_model.DiTConfig:
  model_cfg = dit_model.DiTConfig(
      variant=config.model.variant,
      recipe=config.model.recipe,
      grid=tuple(grid),
      channels=channels,
      learn_sigma=config.diffusion.objective == 'ddpm',
      num_classes=num_classes,
      rope_theta=config.model.rope_theta,
      dtype=hardware.compute_dtype(config.model.dtype),
      remat=config.model.remat,
      scan=config.model.scan,
      attention=config.model.attention,
      context_attention=config.model.context_attention,
      frame_mask=bool(config.model.frame_mask),
      strides=strides,
      frame_positions=int(config.model.frame_positions),
      mixer=config.model.mixer,
      ssd_chunk=int(config.model.ssd_chunk),
      ssd_state=int(config.model.ssd_state),
      window=_window(config),
      review_tokens=bool(config.model.review_tokens),
  )
  if model_cfg.attention == 'auto':  # the kernel for the target and the token count
    attention = hardware.auto_attention(model_cfg.tokens, model_cfg.dtype)[0]
    model_cfg = dataclasses.replace(model_cfg, attention=attention)
  layers.check_attention(model_cfg.attention, model_cfg.dtype, hardware.target_platform())
  return model_cfg


def _window(config) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in str(config.model.window).replace(' ', '').split(','))
  except ValueError:
    raise config_checks.ConfigError(
        f'model.window={config.model.window!r} must be three token counts "t,h,w", e.g. "8,4,4"'
    ) from None


def _strides(config) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in str(config.model.strides).replace(' ', '').split(',') if s)
  except ValueError:
    raise config_checks.ConfigError(
        f'config.model.strides={config.model.strides!r} must be comma-separated integers, '
        "e.g. '1,3,9'"
    ) from None


def _window_grid(config, grid, window: int, strides, on_the_fly: bool) -> tuple[int, int, int]:
  """The DiT's latent grid: the cached one, or `latents.window` latent frames of it."""
  if not window:
    if strides:
      raise config_checks.ConfigError(
          f'config.model.strides={config.model.strides!r} needs clips at several strides: '
          'set config.latents.window to the latent frames of a training clip, drawn from '
          "the cache's longer sequences"
      )
    return grid
  if on_the_fly:
    raise config_checks.ConfigError(
        f'config.latents.window={window} draws windows from cached latent sequences; '
        "config.latents.source='video' encodes single clips: use a cache (launch.encode)"
    )
  strides = strides or (1,)
  span = (window - 1) * min(strides) + 1
  if span > grid[0]:
    raise config_checks.ConfigError(
        f'config.latents.window={window} at stride {min(strides)} spans {span} latent '
        f'frames, but the cached sequences have {grid[0]}: encode longer videos or lower '
        'latents.window'
    )
  unfit = [s for s in strides if (window - 1) * s + 1 > grid[0]]
  if unfit:  # e.g. post-tuning on longer windows: those strides keep what they learned
    print(
        f'windows of {window} latent frames at strides {unfit} do not fit the cached '
        f'sequences of {grid[0]}: training draws the other strides only',
        flush=True,
    )
  return (window, *grid[1:])


def _check_long_video_fields(config, model_cfg, strides, clip_latents: int):
  """The known-frame mix (checked) and the post-tuning fields."""
  k = config.known
  weights = (k.none, k.prefix, k.ends, k.sparse)
  if sum(weights) <= 0:
    raise config_checks.ConfigError('config.known: at least one kind of mask needs a weight > 0')
  if any(weights[1:]) and not config.model.frame_mask:
    raise config_checks.ConfigError(
        'config.known gives some training clips known frames, which the model is only told '
        'with config.model.frame_mask=True'
    )
  # Generated clips are decoded in the tokenizer's own clips (of clip_latents latent frames).
  t = model_cfg.grid[0]
  if t > clip_latents and t % clip_latents:
    raise config_checks.ConfigError(
        f'the DiT generates clips of {t} latent frames, which do not split into the '
        f"tokenizer's clips of {clip_latents} (config.latents.window)"
    )
  f = config.finetune
  if f.trainable != 'all' and not f.start:
    raise config_checks.ConfigError(
        f'config.finetune.trainable={f.trainable!r} post-tunes a trained DiT: set '
        'config.finetune.start to its run directory'
    )
  if f.trainable == 'time' and not (strides or config.model.frame_positions):
    raise config_checks.ConfigError(
        "config.finetune.trainable='time' trains the stride and frame embeddings, but the "
        'model has neither (config.model.strides, config.model.frame_positions)'
    )
  return tuple(float(w) for w in weights)


def _sample_classes(config, num_classes: int) -> tuple[int, ...]:
  classes = config.sample.classes
  if isinstance(classes, str):
    classes = [int(c) for c in classes.split(',') if c.strip()]
  classes = tuple(classes) or tuple(range(num_classes))
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise config_checks.ConfigError(
        f'config.sample.classes has {bad}: class ids are in [0, {num_classes})'
    )
  return classes


def _check_sampling(config, num_classes: int) -> None:
  s = config.sample
  if not s.guidance_low <= s.guidance_high:
    raise config_checks.ConfigError(
        f'config.sample.guidance_low={s.guidance_low} is above '
        f'sample.guidance_high={s.guidance_high}'
    )
  flow = config.diffusion.objective == 'flow'
  if flow != (s.sampler in ('euler', 'heun')):
    raise config_checks.ConfigError(
        f'config.sample.sampler={s.sampler!r} does not sample the {config.diffusion.objective} '
        "objective: ddpm samples with 'ddim' or 'ancestral', flow with 'euler' or 'heun'"
    )


def _check_judge(config, latents, on_the_fly: bool) -> None:
  """A judge of generated clips judges clips of the data set it was trained for."""
  data_name = (latents.data or {}).get('name') if latents else None
  data_name = config.data.name if on_the_fly else data_name
  if config.accuracy.classifier and data_name not in (None, config.accuracy.classifier):
    raise config_checks.ConfigError(
        f'config.accuracy.classifier={config.accuracy.classifier!r} judges clips of that data '
        f'set, but the '
        + ('run encodes config.data.name=' if on_the_fly else 'latent cache holds ')
        + f'{data_name!r} clips'
    )


def latent_description(config) -> latents_lib.Metadata | None:
  """The latent cache's description: read from the cache, and recorded in the config (so that
  it travels in the run's config.json with the checkpoints: sampling needs no cache). A run
  whose cache is gone uses the recorded one; a cache that changed under a run is refused."""
  recorded = config.latents.recorded
  if config.latents.dir and os.path.exists(
      os.path.join(os.path.expanduser(config.latents.dir), latents_lib.METADATA)
  ):
    metadata = latents_lib.read_metadata(os.path.expanduser(config.latents.dir))
    as_json = json.dumps(dataclasses.asdict(metadata), sort_keys=True)
    if recorded and json.loads(recorded) != json.loads(as_json):
      raise config_checks.ConfigError(
          f'the latent cache config.latents.dir={config.latents.dir} is not the one this run '
          f'was started with (its latents.json changed); start a new run for it'
      )
    config.latents.recorded = as_json
    return metadata
  if recorded:
    raw = json.loads(recorded)
    return latents_lib.Metadata(**{**raw, 'grid': tuple(raw['grid'])})
  if config.latents.dir:
    latents_lib.read_metadata(os.path.expanduser(config.latents.dir))  # raises naming it
  return None


def _data_classes(data_cfg) -> int:
  try:
    return datasets.num_classes(data_cfg)
  except Exception as e:  # noqa: BLE001 (tfds raises many kinds for a data set it cannot open)
    raise config_checks.ConfigError(
        f'config.model.num_classes=0 means "from the data", but config.data.name='
        f'{data_cfg.name!r} cannot say ({type(e).__name__}: {e}); set config.model.num_classes'
    ) from None
