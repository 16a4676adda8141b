r"""Tokenizer size sweeps: E (through the channels c and the tubelet size) and encoder vs decoder
size, the questions of the ViTok paper (see vitok/sweeps/sweep.py for the format).

    python -m launch.sweep --config=configs/sweeps/vitok_sizes.py:demo --workdir=/tmp/vitok-sweep
    python -m launch.sweep --config=configs/sweeps/vitok_sizes.py:ucf101 --workdir=/ckpt/sweep \
        --emit=slurm

  demo      on the offline real-video demo data (configs/vitok.py:demo at 32x32), 9 runs:
            E from 128 to 1024 floats per clip with three tubelet sizes, and a bigger encoder or
            decoder at E = 256; <= 45 minutes on 2 CPU cores
  ucf101    the paper's UCF-101 16x128x128 grid: S-B with tubelets 4x8 / 4x16 / 8x8 / 2x8 and
            c in 4 / 8 / 16 / 32, then S-S, S-B, S-L and B-B, L-B at E = 4x8, c = 16
  digits    the demo sweep on moving digits with a DiT chained on every tokenizer (generation
            against E)

`get_config(arg)` takes the preset's name; `--config.base=...` changes the config every member
starts from and `--config.dit=<configs/dit.py argument>` chains a DiT on every member.
"""

import ml_collections

from vitok.sweeps.sweep import chain, product, sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = ''  # the config every member starts from, as --config takes it
  c.members = []  # the members: {dotted field: value} each (vitok/sweeps/sweep.py)
  c.dit = ''  # '' or the configs/dit.py argument of a DiT chained on every member's latents
  c.evaluate = True  # launch.eval after training: every metric (False: training's final one)
  preset = arg or 'demo'
  if preset == 'demo':
    # 32x32 crops of the real-video demo data, 8 frames: each run is 1200 steps of batch 8 on
    # L2 + KL (LPIPS in the loss took 91% of a 1.1 s step at this size on a 2-core CPU; without
    # it a cpu128-cpu128/4x8 step takes 0.06 s). Evaluated by training's final evaluation (PSNR,
    # SSIM, LPIPS, the pooled codec's PSNR / SSIM); --config.evaluate=True adds launch.eval's
    # rFVD / rFID (about 3 more minutes per run on this CPU).
    c.base = 'configs/vitok.py:demo,res=32'
    c.evaluate = False
    c.members = chain(
        # E = tokens x c against the tubelet size q x p: 2x8 and 4x4 have 2x and 4x the tokens
        # of 4x8, so the same E comes from fewer channels.
        product(
            sweep('model.variant', ['cpu128-cpu128/4x8']), sweep('model.channels', [4, 8, 16, 32])
        ),
        product(sweep('model.variant', ['cpu128-cpu128/2x8']), sweep('model.channels', [2, 8])),
        product(sweep('model.variant', ['cpu128-cpu128/4x4']), sweep('model.channels', [4])),
        # encoder vs decoder at E = 256 (4x8, c = 8)
        product(
            sweep('model.variant', ['cpu256-cpu128/4x8', 'cpu128-cpu256/4x8']),
            sweep('model.channels', [8]),
        ),
    )
    common = {
        'total_steps': 1200,
        'evals.reconstruction.every': 1200,
        'ckpt_every': 400,
        'loss.lpips': 0.0,
    }
    c.members = [{**m, **common} for m in c.members]
  elif preset == 'ucf101':
    c.base = 'configs/vitok.py:ucf101'
    c.members = chain(
        product(
            sweep('model.variant', ['S-B/4x8', 'S-B/4x16', 'S-B/8x8', 'S-B/2x8']),
            sweep('model.channels', [4, 8, 16, 32]),
        ),
        product(
            sweep('model.variant', ['S-S/4x8', 'S-L/4x8', 'B-B/4x8', 'L-B/4x8']),
            sweep('model.channels', [16]),
        ),
    )
  elif preset == 'digits':
    c.base = 'configs/vitok.py:digits'
    c.members = product(sweep('model.channels', [4, 8, 16, 32]))
    c.dit = 'digits'
  else:
    raise ValueError(
        f'unknown preset {preset!r} in configs/sweeps/vitok_sizes.py (demo | ucf101 | digits)'
    )
  return c
