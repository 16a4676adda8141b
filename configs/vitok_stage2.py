r"""ViTok stage 2: the decoder fine-tuned against a discriminator, from a finished stage-1 run.

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo        # stage 1
    python -m launch.train --config=configs/vitok_stage2.py:demo --workdir=/tmp/vitok-demo-gan
    python -m launch.train --config=configs/vitok_stage2.py:ucf101,stage1=/ckpt/sb4x8 \
        --config.data.manual_dir=/data/ucf101 --workdir=/ckpt/sb4x8-gan

The model fields must be the stage-1 run's (the run fails at start-up naming any that differ).
The encoder, bottleneck and patch embedding stay frozen, so the latents a DiT learns are the
stage-1 ones; evaluation, checkpoints, resume, `launch.eval`, `launch.export` and the DiT's
`tokenizer=` all work on a stage-2 run as on a stage-1 run.

`get_config(arg)`: an optional preset, then comma-separated `key=value` shortcuts:

  presets   demo      -- after `configs/vitok.py:demo` (reads /tmp/vitok-demo), <= 15 min on 2 cores
            ucf101    -- the paper's UCF-101 16x128x128 S-B/4x8 stage 2
            imagenet  -- the paper's ImageNet 256p S-B/16 stage 2
  shortcuts stage1 (the stage-1 run directory), gan_weight, disc (2d | 3d), disc_lr, steps, batch,
            lr, variant, channels, res, frames, data, manual_dir, mesh.
"""

import ml_collections

from configs import common, vitok

SHORTCUTS = dict(
    vitok.SHORTCUTS,
    stage1='stage1',
    gan_weight='gan.weight',
    disc='disc.kind',
    disc_lr='disc_optim.lr',
)


def base_config() -> ml_collections.ConfigDict:
  """Every field of a stage-2 run: stage 1's, plus the stage-1 source, the adversarial objective,
  the discriminator and its optimizer."""
  c = vitok.base_config()
  c.task = 'vitok_stage2'
  c.stage1 = ''  # the stage-1 run (training workdir or launch.export directory) to start from
  c.best_metric = 'lpips'
  c.best_mode = 'min'
  c.optim.ema_decay = 0.9999  # EMA of the trained (decoder and discriminator) parameters
  c.gan = ml_collections.ConfigDict(
      dict(
          weight=0.05,  # lambda of the generator's -D(recon) term (the paper's ablation value)
          start_step=5_000,  # the generator's adversarial term is 0 before this step...
          ramp_steps=5_000,  # ...then ramps linearly to `weight` over this many steps
          lecam=0.0,  # LeCam regularisation weight (e.g. 0.001); 0 = off
          lecam_decay=0.99,  # EMA decay of the LeCam anchors
          adaptive_weight=False,  # VQGAN's ratio of gradient norms at the decoder's last layer
          adaptive_max=1e4,  # clip of that ratio
      )
  )
  c.disc = ml_collections.ConfigDict(
      dict(
          kind='2d',  # '2d': every frame judged alone | '3d': 3-D convolutions over the clip
          channels=64,  # width of the first block, doubled per block...
          max_channels=512,  # ...up to this
          dtype='float32',  # compute dtype ('auto' as model.dtype); parameters stay float32
          frames=0,  # frames per clip a '2d' discriminator judges each step, drawn at random; 0 = all
      )
  )
  c.disc_optim = ml_collections.ConfigDict(
      dict(
          lr=2e-5,  # the paper's discriminator LR (1e-5 was worse, 4e-5 diverged after ~60k steps)
          b1=c.optim.b1,
          b2=c.optim.b2,
          weight_decay=c.optim.weight_decay,
          warmup_steps=c.optim.warmup_steps,
          end_lr_fraction=c.optim.end_lr_fraction,
          clip_norm=c.optim.clip_norm,
      )
  )
  return c


def _preset(config, name: str):
  if name == 'demo':
    # After the stage-1 CPU demo: the same model and data, 64x64 frames, ~12 minutes on the
    # 2-core Xeon (1.3 s per step). A 10x higher discriminator LR than the paper's (as stage 1's
    # demo raised its LR), because the run is hundreds of steps instead of 100k. A small
    # discriminator on 2 random frames per clip (on all 8 frames with channels 32-128 a step took
    # 8.2 s; the 3-D one over 6 s). The generator's term waits until the discriminator has trained
    # for 250 steps, at a small weight with LeCam: with it from step 100 at weight 0.1, held-out
    # LPIPS fell (0.4749 -> 0.4727) but rFVD rose (951.7 -> 969.0). README: both runs' numbers.
    vitok._preset(config, 'demo')
    config.stage1 = '/tmp/vitok-demo'
    config.disc.update(channels=16, max_channels=64, frames=2, dtype='auto')
    config.gan.update(weight=0.02, start_step=250, ramp_steps=100, lecam=0.001)
    config.optim.update(lr=3e-4, warmup_steps=50, ema_decay=0.99)
    config.disc_optim.update(lr=2e-4, warmup_steps=50)
    config.total_steps = 500
    config.log_every = 25
    config.evals.reconstruction.every = 500
    config.ckpt_every = 250
  elif name in ('ucf101', 'imagenet'):
    # The paper's stage 2: 100k steps at batch 128 videos / 256 images, EMA 0.9999.
    vitok._preset(config, name)
    config.data.batch_size = 128 if name == 'ucf101' else 256
  else:
    raise ValueError(
        f'unknown preset {name!r} in configs/vitok_stage2.py (demo | ucf101 | imagenet)'
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.apply_arguments(base_config(), arg, SHORTCUTS, _preset, 'configs/vitok_stage2.py')
