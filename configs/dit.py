r"""DiT training on the latents of a frozen ViTok tokenizer (class-conditional generation).

    python -m launch.encode --tokenizer=/tmp/vitok-run --out=/tmp/latents
    python -m launch.train --config=configs/dit.py:demo,latents=/tmp/latents --workdir=/tmp/dit
    python -m launch.plan --config=configs/dit.py:ucf101 --topology=v5p-128
    # -> 11.09 GiB of 95.74 per chip, step >= 20.24 ms (compute); docs/tpu.md
    python -m launch.plan --config=configs/dit.py:ucf101,mesh=16x16 --topology=v6e-256
    # -> 2.02 GiB of 31.25 per chip, >= 12.5 ms: FSDP beats data parallel on a v6e-256 (docs/tpu.md)

`get_config(arg)` takes an optional preset name followed by comma-separated `key=value` shortcuts:

  presets   demo      -- a small DiT for the 2-core CPU (rectified flow, a few minutes)
            digits    -- the DiT stage of launch.demo, on moving-digits latents, with the class
                         accuracy of its samples measured by an independent digit classifier
            long_digits -- the DiT stage of launch.long_demo: windows of long moving-digit videos
                         at several strides, with known frames (hierarchical / autoregressive
                         long generation, dit/long_video.py)
            digits_mate, long_digits_mate, ucf101_mate -- the same with LinGen's MATE mixer
                         (dit/mate.py) in place of self-attention: linear cost in the clip's
                         length; long_digits_mate trains on whole 128-frame videos and generates
                         longer ones in one pass (launch.sample_long --method=direct)
            ucf101    -- ViTok's video recipe: DiT-L on S-B/4x8 latents of 16x128x128 UCF-101
                         clips (1024 tokens), DDPM with learned variance, batch 256, LR 1e-4
            long_video -- DiT-XL/1 on 1,152-frame 128x128 clips of a video folder (73,728 tokens
                         each), every clip's tokens over a context axis of 8 chips
                         (docs/context_parallel.md)
            imagenet  -- DiT-XL on S-B/16 latents of 256x256 images (256 tokens)
            imagenet_xl2 -- DiT-XL/2 on 32 x 32 x 4 latents (S-B/8, c = 4) of 256x256 images: the
                         original DiT-XL/2's shapes
  shortcuts variant, latents (cache directory), source (cache | video), tokenizer, objective, batch,
            steps, lr, guidance, mesh, context (a context mesh axis of that size; e.g.
            `demo,latents=/tmp/latents,steps=500`).

The latent grid and channels come from the cache (its latents.json); `tokenizer.dir` defaults to
the tokenizer the cache was encoded with. Without a cache, `source=video,tokenizer=DIR` encodes
config.data's clips with that tokenizer inside every step:

    python -m launch.train --config=configs/dit.py:demo,source=video,tokenizer=/tmp/vitok-run \
        --config.data.name=moving_digits --config.data.frames=8 --config.data.res=64 --workdir=...

Every field can be overridden with --config.<path>=value.
"""

import ml_collections

from configs import common

SHORTCUTS = {
    'variant': 'model.variant',
    'latents': 'latents.dir',
    'source': 'latents.source',
    'tokenizer': 'tokenizer.dir',
    'objective': 'diffusion.objective',
    'batch': 'data.batch_size',
    'steps': 'total_steps',
    'lr': 'optim.lr',
    'guidance': 'sample.guidance',
    'mesh': 'mesh.shape',
}


def base_config() -> ml_collections.ConfigDict:
  """Every field of a DiT run, with its defaults (unknown-field checks compare against these)."""
  c = common.training_config('dit')
  c.best_metric = 'eval_mse'
  c.best_mode = 'min'
  c.optim.update(lr=1e-4, b2=0.999, weight_decay=0.0, warmup_steps=0, ema_decay=0.9999)
  c.data.batch_size = 256

  # The DiT: 'DiT-<size>/<patch>' with sizes S, B, L, XL (the DiT paper's) and cpu64 / cpu128 /
  # cpu256 (this project's CPU sizes); see dit/model.py.
  c.model = ml_collections.ConfigDict(
      dict(
          variant='DiT-L/1',
          recipe='vitok',  # 'vitok' (gated MLP, 3-D RoPE) | 'classic' (the original DiT)
          num_classes=0,  # 0 = the cache's; the null class for guidance is added on top
          rope_theta=10000.0,
          dtype='float32',  # compute dtype: 'bfloat16' | 'float32' | 'auto' (as configs/vitok.py)
          remat='none',
          scan=False,  # blocks as one lax.scan over stacked parameters (as configs/vitok.py)
          # 'xla' | 'cudnn' | 'blockwise' | 'pallas_tpu' | 'splash_tpu' | 'auto' (configs/vitok.py)
          attention='xla',
          context_attention='all_to_all',  # across a 'context' mesh axis (configs/vitok.py)
          # The token mixer of each block: 'attention' | 'mate' (LinGen's MATE, dit/mate.py:
          # a bidirectional Mamba2 scan in rotating axis orders with one review token per latent
          # frame, beside attention in (t, h, w) windows of `window` tokens shifted every other
          # block; its cost grows linearly with the clip's length). ssd_chunk: the tokens the
          # SSD computes as one matmul (a multiple of 64 suits TPU / GPU matrix units);
          # ssd_state: Mamba2's state size per head.
          mixer='attention',
          ssd_chunk=64,
          ssd_state=64,
          window='8,4,4',
          review_tokens=True,
          # Long video (dit/model.py, dit/long_video.py): a known-frames mask channel at the
          # input (continuation, infilling: see `known`); the latent-frame strides the model is
          # told, e.g. '1,3,9' ('' = none; with windows of K latent frames each stride must be
          # K - 1 times the next finer one, for hierarchical generation); a learned per-frame
          # embedding table of this many latent frames (0 = none).
          frame_mask=False,
          strides='',
          frame_positions=0,
      )
  )
  # The frozen tokenizer: `dir` (an export or a training workdir; '' = the one the latent cache was
  # encoded with). Without either (launch.plan, launch.bench), `variant` and `channels` describe
  # it, and the latent grid follows from them and data.frames / data.res. `context_attention`:
  # its scheme across a 'context' mesh axis when it encodes or decodes inside this run
  # (configs/vitok.py; 'ring' where its heads do not split over the axis).
  c.tokenizer = ml_collections.ConfigDict(
      dict(dir='', variant='S-B/4x8', channels=16, context_attention='all_to_all')
  )
  c.data.update(frames=16, res=128)
  c.latents = ml_collections.ConfigDict(
      dict(
          # 'cache': read the latent cache `dir` (python -m launch.encode); 'video': encode
          # config.data's clips with the frozen tokenizer inside each step (no cache: for data
          # sets too large to cache; the step also runs the encoder, and the data pipeline's
          # augmentation applies).
          source='cache',
          dir='',  # the latent cache
          train_split='train',  # of the cache ('video' reads data.train_split / eval_split)
          eval_split='test',
          stats_clips=1024,  # 'video': training clips the per-channel statistics are measured on
          # Latent frames per training clip, drawn from the cache's longer latent sequences at a
          # random start and one of model.strides (0 = the cached clip whole).
          window=0,
          sample_posterior=True,  # z = mean + sigma eps each step (else the posterior mean)
          # Filled in by the run from the cache's latents.json (grid, statistics, tokenizer), or
          # measured encoding on the fly, so that they travel in the run's config.json: sampling
          # needs no cache and no data.
          recorded='',
      )
  )
  c.diffusion = ml_collections.ConfigDict(
      dict(
          objective='ddpm',  # 'ddpm' (eps + learned variance, as ViTok) | 'flow' (velocity)
          label_dropout=0.1,  # classifier-free guidance: labels replaced by the null class
          t_mean=0.0,  # flow: logit-normal timestep sampling
          t_std=1.0,
      )
  )
  # Which latent frames a training clip is given clean (with model.frame_mask; the loss covers
  # the others): relative weights of the kinds of mask drawn per clip (dit/known_frames.py).
  c.known = ml_collections.ConfigDict(dict(none=1.0, prefix=0.0, ends=0.0, sparse=0.0))
  # Post-tuning (ExVideo): start from a finished DiT run (its workdir) and train `trainable`
  # parameters only: 'all', or 'time' (the stride and per-frame embeddings); parameters whose
  # shape changed (a longer frame table) are initialised from the run's cyclically.
  c.finetune = ml_collections.ConfigDict(dict(start='', trainable='all'))
  # Long generation (launch.sample_long, launch.long_demo): the latent frames each autoregressive
  # window (and the hierarchy's top level, when it has more keyframes than one window) is
  # conditioned on; the most windows one sampler batch runs (a call's windows are independent:
  # more are run in chunks; on a 2-core CPU ~32 windows of 64 tokens were fastest per window,
  # 0 = a call's windows in one batch, for accelerators).
  c.long = ml_collections.ConfigDict(dict(context=1, max_windows=32))
  c.sample = ml_collections.ConfigDict(
      dict(
          sampler='ddim',  # ddpm: 'ddim' | 'ancestral'; flow: 'euler' | 'heun'
          steps=50,
          eta=0.0,  # DDIM
          guidance=2.0,  # 1 = no guidance
          guidance_low=0.0,  # guidance only at noise levels in [low, high] (fractions of T)
          guidance_high=1.0,
          classes='',  # e.g. '0,3,7'; '' = every class
          per_class=2,
          seed=0,
      )
  )
  c.accuracy = ml_collections.ConfigDict(
      dict(
          # 'moving_digits': an independent classifier trained on real frames
          # (vitok/evals/digit_classifier.py) labels generated clips; '' = no class-accuracy evaluation
          classifier='',
          per_class=10,  # generated clips per class, with guidance and without
          real_clips=200,  # real held-out clips for the classifier's ceiling
      )
  )
  # gFVD / gFID of generated clips against every real held-out clip (dit/evaluation.py).
  c.generation = ml_collections.ConfigDict(
      dict(clips=0)  # generated clips, classes in turn (0 = as many as the real held-out clips)
  )
  # The evaluators (dit/evaluation.py): the held-out loss, sample grids, class accuracy (with
  # accuracy.classifier), gFVD / gFID (costly: not during training by default).
  c.evals = ml_collections.ConfigDict(
      dict(
          loss=dict(every=5_000),
          samples=dict(every=0),
          class_accuracy=dict(every=0),
          generation=dict(every=-1),
      )
  )
  return c


def _preset(config, name: str):
  if name == 'demo':
    # A ~0.1 s step on 2 CPU cores: width 128, 4 blocks, batch 32, rectified flow (which
    # needs no learned variance and samples well in few Euler steps).
    config.model.update(variant='DiT-cpu128/1', dtype='auto')
    config.diffusion.objective = 'flow'
    config.sample.update(sampler='euler', steps=30, guidance=3.0, per_class=4)
    config.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.995)
    config.data.update(batch_size=32, eval_batch_size=32)
    config.total_steps = 2000
    config.log_every = 50
    config.evals.loss.every = 500
    config.ckpt_every = 500
  elif name == 'digits':
    _preset(config, 'demo')
    # Patch 2 over the 2 x 8 x 8 latent grid: 32 tokens, ~0.1 s a step at batch 32 here, so
    # 8,000 steps fit the demo's budget. Measured with c = 16 latents: class accuracy with
    # guidance 3 of 37 / 67 / 79 / 80% after 2,000 / 4,000 / 6,000 / 8,000 steps (34% without);
    # at step 8,000 guidance 4 gave 84% and 5 gave 87%.
    config.model.variant = 'DiT-cpu128/2'
    # 'auto' (from 'demo'), same results either way. The step (launch.bench): Xeon with AMX-BF16
    # 0.072 s bfloat16 / 0.079 s float32; EPYC with AVX512-BF16 0.075 / 0.098 s; EPYC with AVX2
    # only 0.139 / 0.097 s, where 'auto' picks float32.
    config.sample.guidance = 4.0
    config.accuracy.update(classifier='moving_digits', per_class=20)
    config.evals.class_accuracy.every = 2000
    config.optim.lr = 2e-3
    config.data.update(batch_size=32, eval_batch_size=32)
    config.total_steps = 8000
    config.log_every = 100
    config.evals.loss.every = 1000
    config.ckpt_every = 1000
  elif name == 'long_digits':
    _preset(config, 'digits')
    # The DiT stage of launch.long_demo: windows of 4 latent frames (16 frames) from 128-frame
    # moving-digit videos encoded clip after clip, at strides 1, 3 and 9 latent frames, with a
    # known-frames mask, so that one model generates keyframes, fills between them and
    # continues (dit/long_video.py): 256 frames = 64 latent frames = 8 keyframes at stride 9.
    config.data.update(name='moving_digits', frames=128, res=64, hflip=False)
    config.latents.window = 4
    config.model.update(frame_mask=True, strides='1,3,9')
    # Hierarchical generation uses 'none' (the first keyframes), 'prefix' (more keyframes) and
    # 'ends' (every fill); autoregressive generation 'none' and 'prefix'.
    config.known.update(none=0.25, prefix=0.3, ends=0.35, sparse=0.1)
    config.accuracy.update(per_class=10)
    config.evals.class_accuracy.every = 0
    config.total_steps = 10000
    config.evals.loss.every = 2500
    config.ckpt_every = 2500
  elif name in ('digits_mate', 'long_digits_mate', 'ucf101_mate'):
    # LinGen's MATE mixer (dit/mate.py) in place of self-attention, everything else as the
    # attention preset of the same name; docs/long_video.md has the comparisons.
    _preset(config, name.removesuffix('_mate'))
    config.model.mixer = 'mate'
    if name == 'digits_mate':
      # 2 x 4 x 4 tokens: windows of 2 x 2 x 2 (a quarter of the clip each), so that what spans
      # the clip goes through the scan.
      config.model.update(window='2,2,2')
    elif name == 'long_digits_mate':
      # One pass over a whole long video (launch.sample_long --method=direct): trained on
      # windows of 32 latent frames (128 frames, 512 tokens) instead of 4, at stride 1 only,
      # with the known-frames mask kept so that it can also continue and infill.
      config.latents.window = 32
      config.model.update(strides='1', window='8,4,4', ssd_chunk=64)
      config.data.batch_size = 8
  elif name == 'ucf101':
    # On TPUs: bfloat16 and the splash-attention kernel, what the TPU compiler's plans chose
    # (docs/tpu.md); elsewhere 'auto' picks what that hardware runs best. The mesh is the slice's:
    # data parallel (the default) on a v5p-128, FSDP `mesh=16x16` on a v6e-256.
    config.model.update(variant='DiT-L/1', num_classes=101, dtype='auto', attention='auto')
    config.tokenizer.update(variant='S-B/4x8', channels=16)
    config.data.update(frames=16, res=128)
    config.data.batch_size = 256
    config.total_steps = 500_000
    config.sample.update(sampler='ddim', steps=250, guidance=2.0)
    config.evals.samples.every = 50_000
    config.evals.loss.every = 10_000
    config.ckpt_every = 10_000
  elif name == 'long_video':
    # Movie Gen's length: 1,152-frame 128x128 clips of your own videos (data.name=video_folder,
    # data.manual_dir=...), 288 x 16 x 16 = 73,728 latent tokens each, on DiT-XL/1. One clip
    # fits no chip: its tokens are split over a context axis of 8 (docs/context_parallel.md),
    # all-to-all around the splash kernel. The TPU compiler's plan on a v5p-16 (data 1 x fsdp 1 x
    # context 8, one clip): 26.99 GiB per chip, a step >= 0.97 s (compute-bound); context 4 is
    # the smallest that fits (python -m launch.plan --config=configs/dit.py:long_video,batch=1
    # --topology=v5p-16). On a v5p-128 the default mesh is data 8 x context 8.
    _preset(config, 'ucf101')
    config.model.update(variant='DiT-XL/1', scan=True, context_attention='all_to_all')
    config.tokenizer.context_attention = 'ring'  # S-B's 12 heads do not split 8 ways
    config.data.update(name='video_folder', frames=1152, res=128, hflip=True)
    config.data.batch_size = 8
    common.add_context_axis(config, 8)
  elif name == 'imagenet':
    config.model.update(variant='DiT-XL/1', num_classes=1000, dtype='auto', attention='auto')
    config.tokenizer.update(variant='S-B/16', channels=16)
    config.data.update(frames=1, res=256)
    config.data.batch_size = 256
    config.total_steps = 4_000_000
    config.sample.update(sampler='ddim', steps=250, guidance=4.0)
    config.evals.samples.every = 100_000
    config.evals.loss.every = 20_000
    config.ckpt_every = 20_000
  elif name == 'imagenet_xl2':
    # facebookresearch/DiT's DiT-XL/2 shapes: 256x256 images as 32 x 32 x 4 latents (here an
    # S-B/8 ViTok with c = 4: E = 4096 floats, as the SD-VAE's), patch 2 (256 tokens), batch 256,
    # LR 1e-4, EMA 0.9999, DDPM with learned variance; the model users compare against.
    _preset(config, 'imagenet')
    config.model.update(variant='DiT-XL/2')
    config.tokenizer.update(variant='S-B/8', channels=4)
  else:
    raise ValueError(
        f'unknown preset {name!r} in configs/dit.py (demo | digits | long_digits | ucf101 | '
        'long_video | imagenet | imagenet_xl2, and digits_mate | long_digits_mate | ucf101_mate)'
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.apply_arguments(base_config(), arg, SHORTCUTS, _preset, 'configs/dit.py')
