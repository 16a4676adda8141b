"""The DiT as a `vitok.core.task.Task`: class-conditional diffusion on the latents of a frozen
ViTok tokenizer, trained and evaluated by the shared loop.

Input (`latents.source`): 'cache' reads batches of cached latents ('mean', 'logvar', 'label'; see
dit/latents.py); 'video' reads `config.data`'s clips ('video', 'label', with the data pipeline's
augmentation) and encodes them with the frozen tokenizer inside the compiled step, for datasets
too large to cache. Each step samples z = mean + sigma eps from the tokenizer's posterior (or
takes the mean), normalises it per channel with the latent statistics, replaces labels by the
null class with probability `diffusion.label_dropout` (classifier-free guidance), and takes the
objective's loss.

Frozen arrays: the latent statistics and the tokenizer's parameters (sharded by the same logical
rules as trained parameters), which the 'video' input encodes with and the sampling evaluator
decodes with. The statistics are the cache's, or, encoding on the fly, measured at start-up on
`latents.stats_clips` training clips; either way they are recorded in the run's config.json.

Evaluators: 'loss' (cheap, every `eval_every` steps): the objective at fixed noise levels on the
held-out latents with fixed noise; 'samples' (every `sample.every` steps, and at the end): a grid
of generated clips per class, decoded to PNG and mp4; 'class_accuracy' (with
`accuracy.classifier`, every `accuracy.every` steps): the share of generated clips, with and
without guidance, that an independent classifier assigns to the class they were sampled for,
beside its accuracy on real held-out clips and on their reconstructions by the frozen tokenizer;
'generation' (every `generation.every` steps when > 0, always in launch.eval): gFVD and gFID
against the real held-out clips (dit/evaluation.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dit import diffusion, encoding, known_frames, post_tuning
from dit import evaluation as dit_evaluation
from dit import latents as latents_lib
from dit import model as dit_model
from vitok.core import config_checks, hardware, sharding
from vitok.core import task as task_lib
from vitok.data import DataError, builders, pipeline, pixels, video_io
from vitok.evals import digit_classifier
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
    'sample.every': config_checks.Range(0, note='0 = only at the end'),
    'model.num_classes': config_checks.Range(0, note='0 = from the latent cache'),
    'accuracy.classifier': config_checks.OneOf(('', 'moving_digits')),
    'accuracy.every': config_checks.Range(0, note='0 = only at the end'),
    'accuracy.per_class': config_checks.AT_LEAST_1,
    'accuracy.real_clips': config_checks.AT_LEAST_1,
    'generation.every': config_checks.Range(0, note='0 = gFVD / gFID only in launch.eval'),
    'generation.clips': config_checks.Range(0, note='0 = as many as the real held-out clips'),
    'latents.source': config_checks.OneOf(('cache', 'video')),
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
}
EVAL_LEVELS = (0.1, 0.5, 0.9)  # noise levels of the 'loss' evaluator (fraction of the way to noise)


class DiTTask:
  """See the module docstring."""

  name = 'dit'
  progress_metrics = ('mse',)

  def __init__(self, config):
    self.config = config
    config_checks.check_fields(config, FIELDS)
    self.on_the_fly = config.latents.source == 'video'
    if self.on_the_fly and config.latents.dir:
      raise config_checks.ConfigError(
          f"config.latents.source='video' encodes config.data's clips on the fly, but "
          f'config.latents.dir={config.latents.dir} names a cache: set one of them'
      )
    self.latents = self._latent_description(config)
    # The frozen tokenizer: the one named, else the one the cache was encoded with, else (plan,
    # bench: no weights needed) the architecture config.tokenizer describes.
    self.tokenizer_dir = config.tokenizer.dir or (self.latents.tokenizer if self.latents else '')
    if self.tokenizer_dir:
      tok_model = frozen_tokenizer.read_tokenizer_config(self.tokenizer_dir).model
    else:
      tok_model = dict(variant=config.tokenizer.variant, channels=config.tokenizer.channels)
    # dtype / attention 'auto' (a tokenizer trained with them) resolved for this run's clips.
    self.tokenizer_cfg = frozen_tokenizer.model_config(
        tok_model, config.data.frames, config.data.res
    )
    grid = self.tokenizer_cfg.latent_grid(config.data.frames, config.data.res)
    channels, num_classes = self.tokenizer_cfg.channels, config.model.num_classes
    if self.latents:
      grid, num_classes = self.latents.grid, num_classes or self.latents.num_classes
      if self.latents.channels != channels:
        raise config_checks.ConfigError(
            f'the latents of config.latents.dir={config.latents.dir} have '
            f'{self.latents.channels} channels but the tokenizer {self.tokenizer_dir} makes '
            f'{channels}: the DiT and the tokenizer do not fit together'
        )
    grid = self._window_grid(config, tuple(grid))
    if not num_classes and self.on_the_fly:
      num_classes = self._data_classes(config.data)
    if not num_classes:
      raise config_checks.ConfigError(
          'config.model.num_classes=0 means "from the latent cache", but config.latents.dir is empty'
      )
    self.model_cfg = dit_model.DiTConfig(
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
        frame_mask=bool(config.model.frame_mask),
        strides=self.strides,
        frame_positions=int(config.model.frame_positions),
    )
    if self.model_cfg.attention == 'auto':  # the kernel for the target and the token count
      attention = hardware.auto_attention(self.model_cfg.tokens, self.model_cfg.dtype)[0]
      self.model_cfg = dataclasses.replace(self.model_cfg, attention=attention)
    self._check_long_video_fields(config)
    layers.check_attention(
        self.model_cfg.attention, self.model_cfg.dtype, hardware.target_platform()
    )
    self.tokens_per_clip = self.model_cfg.tokens
    self.schedule = diffusion.linear_schedule(1000)
    s = config.sample
    if not s.guidance_low <= s.guidance_high:
      raise config_checks.ConfigError(
          f'config.sample.guidance_low={s.guidance_low} is above '
          f'sample.guidance_high={s.guidance_high}'
      )
    bad = [c for c in self.sample_classes() if not 0 <= c < num_classes]
    if bad:
      raise config_checks.ConfigError(
          f'config.sample.classes has {bad}: class ids are in [0, {num_classes})'
      )
    data_name = (self.latents.data or {}).get('name') if self.latents else None
    data_name = config.data.name if self.on_the_fly else data_name
    if config.accuracy.classifier and data_name not in (None, config.accuracy.classifier):
      raise config_checks.ConfigError(
          f'config.accuracy.classifier={config.accuracy.classifier!r} judges clips of that data '
          f'set, but the '
          + ('run encodes config.data.name=' if self.on_the_fly else 'latent cache holds ')
          + f'{data_name!r} clips'
      )
    self._ceilings = None  # the classifier's accuracy on real and reconstructed clips, once
    flow = config.diffusion.objective == 'flow'
    if flow != (s.sampler in ('euler', 'heun')):
      raise config_checks.ConfigError(
          f'config.sample.sampler={s.sampler!r} does not sample the {config.diffusion.objective} '
          "objective: ddpm samples with 'ddim' or 'ancestral', flow with 'euler' or 'heun'"
      )

  def _window_grid(self, config, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The DiT's latent grid: the cached one, or `latents.window` latent frames of it; sets
    `self.window` (0: none) and `self.strides` (parsed model.strides)."""
    try:
      self.strides = tuple(
          int(s) for s in str(config.model.strides).replace(' ', '').split(',') if s
      )
    except ValueError:
      raise config_checks.ConfigError(
          f'config.model.strides={config.model.strides!r} must be comma-separated integers, '
          "e.g. '1,3,9'"
      ) from None
    self.window = int(config.latents.window)
    if not self.window:
      if self.strides:
        raise config_checks.ConfigError(
            f'config.model.strides={config.model.strides!r} needs clips at several strides: '
            'set config.latents.window to the latent frames of a training clip, drawn from '
            "the cache's longer sequences"
        )
      return grid
    if self.on_the_fly:
      raise config_checks.ConfigError(
          f'config.latents.window={self.window} draws windows from cached latent sequences; '
          "config.latents.source='video' encodes single clips: use a cache (launch.encode)"
      )
    strides = self.strides or (1,)
    span = (self.window - 1) * min(strides) + 1
    if span > grid[0]:
      raise config_checks.ConfigError(
          f'config.latents.window={self.window} at stride {min(strides)} spans {span} latent '
          f'frames, but the cached sequences have {grid[0]}: encode longer videos or lower '
          'latents.window'
      )
    unfit = [s for s in strides if (self.window - 1) * s + 1 > grid[0]]
    if unfit:  # e.g. post-tuning on longer windows: those strides keep what they learned
      print(
          f'windows of {self.window} latent frames at strides {unfit} do not fit the cached '
          f'sequences of {grid[0]}: training draws the other strides only',
          flush=True,
      )
    return (self.window, *grid[1:])

  def _check_long_video_fields(self, config) -> None:
    k = config.known
    weights = (k.none, k.prefix, k.ends, k.sparse)
    if sum(weights) <= 0:
      raise config_checks.ConfigError('config.known: at least one kind of mask needs a weight > 0')
    if any(weights[1:]) and not config.model.frame_mask:
      raise config_checks.ConfigError(
          'config.known gives some training clips known frames, which the model is only told '
          'with config.model.frame_mask=True'
      )
    self.known_weights = tuple(float(w) for w in weights)
    # Generated clips are decoded in the tokenizer's own clips (of clip_latents latent frames).
    t, clip = self.model_cfg.grid[0], self.clip_latents
    if t > clip and t % clip:
      raise config_checks.ConfigError(
          f'the DiT generates clips of {t} latent frames, which do not split into the '
          f"tokenizer's clips of {clip} (config.latents.window)"
      )
    f = config.finetune
    if f.trainable != 'all' and not f.start:
      raise config_checks.ConfigError(
          f'config.finetune.trainable={f.trainable!r} post-tunes a trained DiT: set '
          'config.finetune.start to its run directory'
      )
    if f.trainable == 'time' and not (self.strides or config.model.frame_positions):
      raise config_checks.ConfigError(
          "config.finetune.trainable='time' trains the stride and frame embeddings, but the "
          'model has neither (config.model.strides, config.model.frame_positions)'
      )

  @property
  def clip_latents(self) -> int:
    """Latent frames per clip the frozen tokenizer codes at once."""
    if self.latents is not None and self.latents.clip_latents:
      return self.latents.clip_latents
    if self.tokenizer_dir:
      frames = int(frozen_tokenizer.read_tokenizer_config(self.tokenizer_dir).data.frames)
      return self.tokenizer_cfg.latent_grid(frames, self.tokenizer_cfg.parsed.p)[0]
    return self.model_cfg.grid[0]

  @staticmethod
  def _latent_description(config) -> latents_lib.Metadata | None:
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

  @staticmethod
  def _data_classes(data_cfg) -> int:
    try:
      return builders.num_classes(data_cfg)
    except Exception as e:  # noqa: BLE001 (tfds raises many kinds for a data set it cannot open)
      raise config_checks.ConfigError(
          f'config.model.num_classes=0 means "from the data", but config.data.name='
          f'{data_cfg.name!r} cannot say ({type(e).__name__}: {e}); set config.model.num_classes'
      ) from None

  @property
  def eval_split(self) -> str:
    """The held-out split: of the latent cache, or of config.data encoding on the fly."""
    return self.config.data.eval_split if self.on_the_fly else self.config.latents.eval_split

  def sample_classes(self) -> list[int]:
    classes = self.config.sample.classes
    if isinstance(classes, str):
      classes = [int(c) for c in classes.split(',') if c.strip()]
    return list(classes) or list(range(self.model_cfg.num_classes))

  # --- model and objective ---

  def create_model(self, rngs: nnx.Rngs) -> dit_model.DiT:
    return dit_model.DiT(self.model_cfg, rngs=rngs)

  def train_flops_per_clip(self) -> int:
    """Forward + backward of the DiT (2 FLOPs per MAC, backward = 2 x forward), plus the frozen
    encoder's forward when the step encodes its clips."""
    return 6 * dit_model.forward_macs(self.model_cfg) + 2 * self._encoder_macs()

  def _encoder_macs(self) -> int:
    if not self.on_the_fly:
      return 0
    d = self.config.data
    return tokenizer.forward_macs(self.tokenizer_cfg, d.frames, d.res)['encoder']

  def loss_fn(self, model, batch, rng, frozen, step=None):
    del step  # no schedule inside the objective
    z_key, drop_key, loss_key, mask_key = jax.random.split(rng, 4)
    x0 = self.normalized_latents(batch, frozen, z_key)
    drop = jax.random.bernoulli(drop_key, self.config.diffusion.label_dropout, batch['label'].shape)
    labels = jnp.where(drop, self.model_cfg.num_classes, batch['label'])
    known = None
    if self.model_cfg.frame_mask:  # W.A.L.T: some latent frames given clean, the rest generated
      mask = known_frames.training_masks(mask_key, *x0.shape[:2], self.known_weights)
      known = diffusion.Known(mask, x0)
    terms = self.loss_terms(model, x0, labels, loss_key, known, self.conditions(batch))
    metrics = {'mse': jnp.mean(terms['mse'])}
    if 'vb' in terms:
      metrics['vb'] = jnp.mean(terms['vb'])
    return jnp.mean(terms['loss']), metrics

  def conditions(self, batch) -> dict:
    """The per-clip conditions besides the class the model is told (the frame stride)."""
    return {'stride': batch['stride']} if self.strides else {}

  def loss_terms(self, model, x0, labels, key, known=None, conditions=None):
    if self.config.diffusion.objective == 'ddpm':
      return diffusion.ddpm_loss_terms(
          self.schedule, model, x0, labels, key, known=known, conditions=conditions
      )
    d = self.config.diffusion
    return diffusion.flow_loss_terms(
        model, x0, labels, key, d.t_mean, d.t_std, known=known, conditions=conditions
    )

  def sample_latents(self, model, labels, key, guide, steps, known=None, conditions=None):
    """Normalised latents (B, *grid_of_known_or_model, c) of the classes `labels` by the config's
    sampler; `known` frames (diffusion.Known) are kept as given."""
    s = self.config.sample
    tail = (
        known.values.shape[1:]
        if known is not None
        else (*self.model_cfg.grid, self.model_cfg.channels)
    )
    shape = (labels.shape[0], *tail)
    if self.config.diffusion.objective == 'ddpm':
      schedule = diffusion.respace(self.schedule, steps)
      eta = None if s.sampler == 'ancestral' else s.eta
      return diffusion.ddpm_sample(
          schedule, model, shape, labels, key, guide, eta=eta, known=known, conditions=conditions
      )
    return diffusion.flow_sample(
        model, shape, labels, key, steps, s.sampler, guide, known=known, conditions=conditions
    )

  def guidance(self, scale=None) -> diffusion.Guidance:
    s = self.config.sample
    return diffusion.Guidance(
        scale=s.guidance if scale is None else scale,
        null_class=self.model_cfg.num_classes,
        low=s.guidance_low,
        high=s.guidance_high,
    )

  def decode_latents(self, frozen, x):
    """Normalised latents (B, t, h, w, c) -> uint8 clips, decoded by the frozen tokenizer in its
    own clips of `clip_latents` latent frames, one after another (traceable)."""
    z = x * frozen['stats']['std'] + frozen['stats']['mean']
    decoder = nnx.merge(self.tokenizer_graphdef, frozen['tokenizer'])
    return pixels.to_uint8(encoding.in_clips(decoder.decode, z, self.clip_latents))

  def latent_moments(self, batch, frozen):
    """The posterior mean and log-variance of the batch's clips: cached, or encoded here by the
    frozen tokenizer (no gradient reaches it: only the DiT's parameters are differentiated)."""
    if 'video' not in batch:
      return batch['mean'], batch['logvar']
    encoder = nnx.merge(self.tokenizer_graphdef, frozen['tokenizer'])
    return encoder.encode_moments(pixels.to_unit_range(batch['video']))

  def normalized_latents(self, batch, frozen, key=None):
    mean, logvar = self.latent_moments(batch, frozen)
    z = mean
    if key is not None and self.config.latents.sample_posterior:
      z = tokenizer.sample(mean, logvar, key)
    return (z - frozen['stats']['mean']) / frozen['stats']['std']

  # --- input ---

  def abstract_batch(self) -> dict:
    d = self.config.data
    b, shape = d.batch_size, (*self.model_cfg.grid, self.model_cfg.channels)
    if self.on_the_fly:
      return {
          'video': jax.ShapeDtypeStruct((b, d.frames, d.res, d.res, 3), np.uint8),
          'label': jax.ShapeDtypeStruct((b,), np.int32),
      }
    batch = {
        'mean': jax.ShapeDtypeStruct((b, *shape), np.float32),
        'logvar': jax.ShapeDtypeStruct((b, *shape), np.float32),
        'label': jax.ShapeDtypeStruct((b,), np.int32),
    }
    if self.strides:
      batch['stride'] = jax.ShapeDtypeStruct((b,), np.int32)
    return batch

  def prepare_data(self) -> dict:
    if self.on_the_fly:
      if not self.tokenizer_dir:
        raise DataError(
            "config.latents.source='video' encodes clips with the tokenizer config.tokenizer.dir, "
            'which is empty'
        )
      return builders.prepare(self.config.data)
    directory = os.path.expanduser(self.config.latents.dir)
    if not os.path.exists(os.path.join(directory, latents_lib.METADATA)):
      raise DataError(
          f'config.latents.dir={self.config.latents.dir!r} holds no latent cache; training and '
          'evaluation read one (python -m launch.encode writes it)'
      )
    return {
        split: latents_lib.LatentSource(directory, split, self.latents)
        for split in self.latents.splits
    }

  def train_iterator(self, sources, start_step, process_index, process_count):
    d = self.config.data
    if self.on_the_fly:  # the tokenizer's input pipeline, augmentation included
      return pipeline.train_iterator(
          d, d.seed, start_step, process_index, process_count, source=sources[d.train_split]
      )
    source = sources.get(self.config.latents.train_split)
    if source is None or len(source) == 0:
      raise DataError(
          f'the latent cache {self.config.latents.dir} has no examples in split '
          f'{self.config.latents.train_split!r}'
      )
    examples = grain.MapDataset.source(source).seed(d.seed).shuffle().repeat()
    if self.window:  # a window of each long sequence, at a random start and stride
      examples = examples.random_map(latents_lib.LatentWindows(self.window, self.strides))
    ds = pipeline.process_batches(
        examples, d.batch_size, process_index, process_count, d.num_workers
    )
    return pipeline.positioned(ds, start_step, d.num_workers)

  # --- post-tuning (ExVideo, dit/post_tuning.py) ---

  def param_groups(self, total_steps: int):
    return post_tuning.param_groups(self.config, total_steps)

  def warm_start(self, params, mesh):
    params, report = post_tuning.warm_start(self.config, self.model_cfg, params, mesh)
    self.trainable_report = report
    return params

  # --- frozen: latent statistics and the tokenizer (sharded by the rules) ---

  def abstract_frozen(self, mesh):
    c = self.model_cfg.channels
    replicated = sharding.replicated(mesh)
    stats = {
        'mean': jax.ShapeDtypeStruct((c,), np.float32, sharding=replicated),
        'std': jax.ShapeDtypeStruct((c,), np.float32, sharding=replicated),
    }
    rules = self.config.sharding_rules
    graphdef, params = frozen_tokenizer.abstract_tokenizer_params(self.tokenizer_cfg, mesh, rules)
    self.tokenizer_graphdef = graphdef
    return {'stats': stats, 'tokenizer': params}

  def frozen(self, mesh):
    """The latent statistics and the tokenizer's weights (without a tokenizer to read, as in
    `launch.bench`: unit statistics and a randomly initialised tokenizer of the described shape).
    Encoding on the fly, the first call measures the statistics (`_measure_statistics`)."""
    abstract = self.abstract_frozen(mesh)
    if self.tokenizer_dir:
      params = frozen_tokenizer.open_tokenizer(
          self.tokenizer_dir, mesh, self.config.sharding_rules
      ).params
      if self.on_the_fly and self.latents is None:
        self.latents = self._measure_statistics(params, mesh)
    else:
      shardings = jax.tree.map(lambda a: a.sharding, abstract['tokenizer'])
      init = lambda: nnx.state(tokenizer.ViTok(self.tokenizer_cfg, rngs=nnx.Rngs(0)), nnx.Param)
      params = jax.jit(init, out_shardings=shardings)()
    c = self.model_cfg.channels
    mean = self.latents.channel_mean if self.latents else np.zeros(c)
    std = self.latents.channel_std if self.latents else np.ones(c)
    stats = {'mean': np.asarray(mean, np.float32), 'std': np.asarray(std, np.float32)}
    return {'stats': sharding.place(stats, abstract['stats']), 'tokenizer': params}

  def _measure_statistics(self, tokenizer_params, mesh) -> latents_lib.Metadata:
    """Encoding on the fly: the latent statistics of `latents.stats_clips` training clips, as a
    cache's description, recorded in the config (the run's config.json carries them, so
    sampling, evaluation and export need no data)."""
    d = self.config.data
    source = builders.prepare(d)[d.train_split]
    mean, std = encoding.sampled_statistics(
        self.tokenizer_graphdef,
        tokenizer_params,
        mesh,
        self.config.sharding_rules,
        d,
        source,
        self.config.latents.stats_clips,
        self.model_cfg.channels,
    )
    metadata = latents_lib.Metadata(
        grid=tuple(self.model_cfg.grid),
        channels=self.model_cfg.channels,
        num_classes=self.model_cfg.num_classes,
        splits={},
        channel_mean=tuple(map(float, mean)),
        channel_std=tuple(map(float, std)),
        tokenizer=os.path.abspath(os.path.expanduser(self.tokenizer_dir)),
        data=json.loads(d.to_json_best_effort()),
    )
    self.config.latents.recorded = json.dumps(dataclasses.asdict(metadata), sort_keys=True)
    print(
        f'latent statistics of {min(len(source), self.config.latents.stats_clips)} training '
        f'clips encoded on the fly: std {", ".join(f"{s:.3g}" for s in std)}',
        flush=True,
    )
    return metadata

  # --- evaluation ---

  def evaluators(self) -> list[task_lib.Evaluator]:
    levels = tuple(f'eval_mse_{int(100 * level)}' for level in EVAL_LEVELS)
    generation = dit_evaluation.generation_config(self.config)
    evaluators = [
        task_lib.Evaluator(
            'loss',
            every=self.config.eval_every,
            metrics=('eval_mse',) + levels,
            run=self.evaluate_loss,
        ),
        task_lib.Evaluator(
            'samples',
            every=self.config.sample.every or self.config.total_steps,
            metrics=(),
            run=self.evaluate_samples,
        ),
    ]
    if self.config.accuracy.classifier:
      evaluators.append(
          task_lib.Evaluator(
              'class_accuracy',
              every=self.config.accuracy.every or self.config.total_steps,
              metrics=('accuracy_guided', 'accuracy_unguided'),
              run=self.evaluate_class_accuracy,
          )
      )
    # gFVD / gFID against the real held-out clips (feature networks on many decoded clips:
    # costly on a CPU): every `generation.every` steps when > 0; always in launch.eval.
    evaluators.append(
        task_lib.Evaluator(
            'generation',
            every=max(generation.every, 1),
            metrics=('gfvd', 'gfid'),
            run=functools.partial(dit_evaluation.evaluate_generation, self),
            during_training=generation.every > 0,
        )
    )
    return evaluators

  def evaluate_loss(self, context: task_lib.EvalContext) -> dict:
    """The objective's MSE at fixed noise levels on the held-out latents, with fixed noise."""
    source = context.sources[self.eval_split]
    n = min(len(source), self.config.data.eval_batch_size * 4)
    if self.on_the_fly:  # the first n clips, centre-cropped, encoded in the evaluation program
      d = self.config.data
      view = pipeline.CenterClip(frames=d.frames, frame_stride=d.frame_stride, res=d.res)
      clips = [view.map(source[i]) for i in range(n)]
      batch = {k: np.stack([clip[k] for clip in clips]) for k in ('video', 'label')}
    else:
      view = (
          latents_lib.LatentWindows(self.window, self.strides).first if self.window else lambda x: x
      )
      examples = [view(source[i]) for i in range(n)]
      batch = {k: np.stack([x[k] for x in examples]) for k in examples[0] if k != 'stride'}
      if self.strides:
        batch['stride'] = np.stack([x['stride'] for x in examples])
    run = _eval_loss_fn(self, context.graphdef, context.mesh)
    per_level = jax.device_get(run(context.params, context.frozen, batch))
    result = {'step': context.step, 'split': self.eval_split, 'clips': int(n)}
    for level, value in zip(EVAL_LEVELS, per_level):
      result[f'eval_mse_{int(100 * level)}'] = float(value)
    result['eval_mse'] = float(np.mean(per_level))
    return result

  def evaluate_samples(self, context: task_lib.EvalContext) -> dict:
    """`sample.per_class` clips of every class in `sample.classes`, decoded; a PNG grid (a row per
    class, the clips' frames side by side) and one mp4 per clip in WORKDIR/samples/."""
    classes = self.sample_classes()
    labels = np.repeat(np.asarray(classes, np.int32), self.config.sample.per_class)
    videos = self.generate(
        context.graphdef,
        context.params,
        context.frozen,
        labels,
        context.mesh,
        seed=self.config.sample.seed,
    )
    if jax.process_index() == 0:
      directory = os.path.join(context.workdir, 'samples')
      write_sample_grid(videos, labels, directory, f'step{context.step:07d}')
    return {'samples': int(len(labels))}

  def evaluate_class_accuracy(self, context: task_lib.EvalContext) -> dict:
    """`accuracy.per_class` clips of every class, sampled with the config's guidance and without
    (guidance 1), labelled by the independent classifier; beside them, once per run, the
    classifier's accuracy on real held-out clips (the ceiling) and on their reconstructions by
    the frozen tokenizer (the ceiling of anything decoded by it)."""
    a = self.config.accuracy
    labels = np.repeat(np.asarray(self.sample_classes(), np.int32), a.per_class)
    result = {'step': context.step, 'clips': int(len(labels))}
    for name, guidance in (('guided', None), ('unguided', 1.0)):
      videos = self.generate(
          context.graphdef, context.params, context.frozen, labels, context.mesh, guidance=guidance
      )
      # Trained on real clips of up to 16 frames (its SVC grows with the frames); it scores
      # clips of any length, frame by frame.
      judge = digit_classifier.trained(min(videos.shape[1], 16), videos.shape[2])
      result[f'accuracy_{name}'] = judge.accuracy(videos, labels)
    if self._ceilings is None:
      real, real_labels = digit_classifier.real_clips(
          self.eval_split, a.real_clips, videos.shape[1], videos.shape[2]
      )
      decoded = np.concatenate(
          [
              _reconstruct_fn(
                  self.tokenizer_graphdef, self.clip_latents * self.tokenizer_cfg.parsed.q
              )(context.frozen['tokenizer'], real[i : i + 50])
              for i in range(0, len(real), 50)
          ]
      )
      self._ceilings = {
          'accuracy_real': judge.accuracy(real, real_labels),
          'accuracy_reconstructed': judge.accuracy(decoded, real_labels),
          'real_clips': int(len(real)),
      }
    result.update(self._ceilings)
    result['guidance'] = float(self.config.sample.guidance)
    return result

  def generate(self, graphdef, params, frozen, labels, mesh, seed=0, guidance=None, steps=None):
    """Clips (N, T, H, W, 3) uint8 of the classes `labels`, sampled with the config's sampler
    and decoded by the frozen tokenizer, the clips split over the mesh's batch axes."""
    guide = self.guidance(guidance)
    run = _sample_fn(
        self, graphdef, self.tokenizer_graphdef, mesh, guide, steps or self.config.sample.steps
    )
    labels = np.asarray(labels, np.int32)
    placed = sharding.place(labels, self._clip_placement(len(labels), mesh))
    with sharding.activation_sharding(mesh, self.config.sharding_rules):
      out = run(params, frozen, placed, jax.random.PRNGKey(seed))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  def lower_generation(self, graphdef, abstract_params, abstract_frozen, mesh, clips, steps=None):
    """The generation program of `generate` for `clips` clips, lowered from shapes only (for
    `launch.plan`: compile it for a pod slice before having one)."""
    run = _sample_fn(
        self,
        graphdef,
        self.tokenizer_graphdef,
        mesh,
        self.guidance(),
        steps or self.config.sample.steps,
    )
    labels = self._clip_placement(clips, mesh)
    key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    with sharding.activation_sharding(mesh, self.config.sharding_rules):
      return run.lower(abstract_params, abstract_frozen, labels, key)

  def _clip_placement(self, clips: int, mesh) -> jax.ShapeDtypeStruct:
    """Labels of `clips` clips split over the batch axes (replicated when they do not divide)."""
    dp = sharding.data_parallel_size(mesh, self.config.sharding_rules)
    placement = (
        sharding.batch_sharding(mesh, self.config.sharding_rules)
        if clips % dp == 0
        else sharding.replicated(mesh)
    )
    return jax.ShapeDtypeStruct((clips,), np.int32, sharding=placement)

  def describe(self) -> dict:
    cfg = self.model_cfg
    return {
        'task': self.name,
        'variant': cfg.variant,
        'recipe': cfg.recipe,
        'objective': self.config.diffusion.objective,
        'latent': [*cfg.grid, cfg.channels],
        'tokens_per_clip': cfg.tokens,
        'params_M': round(dit_model.count_params(cfg) / 1e6, 2),
        'gmacs_per_clip': round(dit_model.forward_macs(cfg) / 1e9, 3),
        'latents': 'encoded on the fly' if self.on_the_fly else 'cache',
        **(
            {
                'window_latent_frames': self.window,
                'strides': list(self.strides),
                'frame_mask': cfg.frame_mask,
            }
            if self.window
            else {}
        ),
        **(
            {'encoder_gmacs_per_clip': round(self._encoder_macs() / 1e9, 3)}
            if self.on_the_fly
            else {}
        ),
    }


@functools.lru_cache(maxsize=4)
def _eval_loss_fn(task: DiTTask, graphdef, mesh):
  """Jitted: the mean MSE at each of EVAL_LEVELS on a batch, with fixed noise."""

  @jax.jit
  def run(params, frozen, batch):
    model = nnx.merge(graphdef, params)
    x0 = task.normalized_latents(batch, frozen)
    noise = jax.random.normal(jax.random.PRNGKey(1234), x0.shape)
    out = []
    for level in EVAL_LEVELS:
      n = x0.shape[0]
      if task.config.diffusion.objective == 'ddpm':
        step = jnp.full((n,), int(level * 999), jnp.int32)
        xt = diffusion.q_sample(task.schedule, x0, step, noise)
        out_ = model(xt, step.astype(jnp.float32), batch['label'], **task.conditions(batch))
        eps = jnp.split(out_, 2, axis=-1)[0]
        out.append(jnp.mean(jnp.square(eps - noise)))
      else:
        t = jnp.full((n,), level)
        xt = diffusion.flow_interpolate(x0, noise, t)
        v = model(xt, 1000.0 * t, batch['label'], **task.conditions(batch))
        out.append(jnp.mean(jnp.square(v - diffusion.flow_target(x0, noise))))
    return jnp.stack(out)

  return run


@functools.lru_cache(maxsize=4)
def _sample_fn(task: DiTTask, graphdef, tokenizer_graphdef, mesh, guide, steps: int):
  """Jitted: labels -> decoded uint8 clips, the sampling loop and the decoder in one program."""
  del tokenizer_graphdef, mesh  # part of the cache key: the program is specific to them

  @jax.jit
  def run(params, frozen, labels, key):
    model = nnx.merge(graphdef, params)
    # Plain clips at the full frame rate (the finest stride), nothing known.
    conditions = {'stride': jnp.ones_like(labels)} if task.strides else None
    x = task.sample_latents(model, labels, key, guide, steps, conditions=conditions)
    return task.decode_latents(frozen, x)

  return run


@functools.lru_cache(maxsize=2)
def _reconstruct_fn(tokenizer_graphdef, clip_frames: int):
  """Jitted: uint8 clips -> the frozen tokenizer's reconstructions (posterior means), uint8."""

  @jax.jit
  def run(params, videos):
    model = nnx.merge(tokenizer_graphdef, params)
    code = lambda clips: model.decode(model.encode_moments(pixels.to_unit_range(clips))[0])
    return pixels.to_uint8(encoding.in_clips(code, videos, clip_frames))

  return lambda params, videos: np.asarray(
      multihost_utils.process_allgather(run(params, videos), tiled=True)
  )


def write_sample_grid(videos: np.ndarray, labels: np.ndarray, directory: str, name: str):
  """A PNG grid (a row per class: each clip's frames side by side, clips one after another) and
  an mp4 per clip."""
  os.makedirs(directory, exist_ok=True)
  rows = []
  for label in dict.fromkeys(labels.tolist()):
    clips = videos[labels == label]
    rows.append(np.concatenate([np.concatenate(list(clip), axis=1) for clip in clips], axis=1))
  video_io.write_png(os.path.join(directory, f'{name}_grid.png'), np.concatenate(rows, axis=0))
  for i, (clip, label) in enumerate(zip(videos, labels)):
    if clip.shape[0] > 1:
      video_io.write_mp4(os.path.join(directory, f'{name}_class{label}_{i}.mp4'), clip)
  with open(os.path.join(directory, f'{name}_labels.json'), 'w') as f:
    json.dump([int(x) for x in labels], f)
