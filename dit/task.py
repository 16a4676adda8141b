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
decodes with. The statistics are the cache's, or, encoding on the fly, measured by the first
`frozen()` on `latents.stats_clips` training clips; either way they are recorded in
`config.latents.recorded`, which the run's config.json carries (sampling needs no data).

Evaluators: dit/evaluation.py. Everything derived from the config: dit/settings.py, once, when
the task is made.
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
from dit import settings as dit_settings
from vitok.core import sharding
from vitok.core import task as task_lib
from vitok.data import DataError, datasets, pipeline, pixels
from vitok.tokenizer import frozen as frozen_tokenizer
from vitok.tokenizer import model as tokenizer


class DiTTask:
  """See the module docstring."""

  name = 'dit'
  progress_metrics = ('mse',)

  def __init__(self, config):
    self.config = config
    settings = dit_settings.resolve(config)  # every field checked, everything derived, once
    self.on_the_fly = settings.on_the_fly
    self.latents = settings.latents
    self.tokenizer_dir = settings.tokenizer_dir
    self.tokenizer_cfg = settings.tokenizer_cfg
    self.model_cfg = settings.model_cfg
    self.window, self.strides = settings.window, settings.strides
    self.known_weights = settings.known_weights
    self.clip_latents = settings.clip_latents
    self.sample_classes = settings.sample_classes
    self.eval_split = settings.eval_split
    self.tokens_per_clip = self.model_cfg.tokens
    self.schedule = diffusion.linear_schedule(1000)
    self.tokenizer_graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: tokenizer.ViTok(self.tokenizer_cfg, rngs=nnx.Rngs(0)))
    )
    self._measured_latents = None  # encoding on the fly: the statistics frozen() measured

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
      return datasets.prepare(self.config.data)
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
    _, params = frozen_tokenizer.abstract_tokenizer_params(self.tokenizer_cfg, mesh, rules)
    return {'stats': stats, 'tokenizer': params}

  def frozen(self, mesh):
    """The latent statistics and the tokenizer's weights (without a tokenizer to read, as in
    `launch.bench`: unit statistics and a randomly initialised tokenizer of the described shape).
    Encoding on the fly, the first call measures the statistics (`_measure_statistics`)."""
    abstract, latents = self.abstract_frozen(mesh), self.latents
    if self.tokenizer_dir:
      params = frozen_tokenizer.open_tokenizer(
          self.tokenizer_dir, mesh, self.config.sharding_rules
      ).params
      if self.on_the_fly and latents is None:
        if self._measured_latents is None:
          self._measured_latents = self._measure_statistics(params, mesh)
        latents = self._measured_latents
    else:
      shardings = jax.tree.map(lambda a: a.sharding, abstract['tokenizer'])
      init = lambda: nnx.state(tokenizer.ViTok(self.tokenizer_cfg, rngs=nnx.Rngs(0)), nnx.Param)
      params = jax.jit(init, out_shardings=shardings)()
    c = self.model_cfg.channels
    mean = latents.channel_mean if latents else np.zeros(c)
    std = latents.channel_std if latents else np.ones(c)
    stats = {'mean': np.asarray(mean, np.float32), 'std': np.asarray(std, np.float32)}
    return {'stats': sharding.place(stats, abstract['stats']), 'tokenizer': params}

  def _measure_statistics(self, tokenizer_params, mesh) -> latents_lib.Metadata:
    """Encoding on the fly: the latent statistics of `latents.stats_clips` training clips, as a
    cache's description, recorded in the config (the run's config.json carries them, so
    sampling, evaluation and export need no data)."""
    d = self.config.data
    source = datasets.prepare(d)[d.train_split]
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

  # --- evaluation (dit/evaluation.py) and generation ---

  def evaluators(self) -> list[task_lib.Evaluator]:
    return dit_evaluation.evaluators(self)

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

  def attention_stacks(self) -> list[tuple[str, int, int, str]]:
    """(name, tokens, heads, context scheme) of every attention stack the run traces (the DiT's,
    none for MATE blocks, and the frozen tokenizer's), for the start-up check of a context mesh
    axis (vitok.core.trainer.check_context_split)."""
    cfg, tok = self.model_cfg, self.tokenizer_cfg
    stacks = [('DiT', cfg.tokens, cfg.size.heads, cfg.context_attention)]
    if cfg.mixer != 'attention':
      stacks = []
    # The frozen tokenizer decodes generated clips (and, with latents.source='video', encodes
    # the training clips) on the same mesh.
    v, latent_tokens = tok.parsed, int(np.prod(cfg.grid))
    for name, size in (
        ('encoder', tokenizer.SIZES[v.encoder]),
        ('decoder', tokenizer.SIZES[v.decoder]),
    ):
      stacks.append((f'frozen tokenizer {name}', latent_tokens, size.heads, tok.context_attention))
    return stacks

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
