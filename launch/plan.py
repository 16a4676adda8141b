r"""Print what a config costs, without allocating any weights: parameter counts (encoder / decoder /
total), tokens per clip, E (latent floats per clip), pixels per latent float, forward GMACs per clip.

    python -m launch.plan --config=configs/vitok.py:variant=S-B/4x8,res=128,frames=16
"""

import json

from absl import app

from launch import common
from vitok import tokenizer


def plan(config) -> dict:
  task = common.make_task_or_exit(config)
  cfg = task.model_cfg
  frames, res = config.data.frames, config.data.res
  params = tokenizer.count_params(cfg)
  macs = tokenizer.forward_macs(cfg, frames, res)
  tokens = task.latent_floats // cfg.channels
  return {
      'variant': cfg.variant,
      'clip': [frames, res, res, 3],
      'latent': list(task.grid) + [cfg.channels],
      'params_encoder_M': round(params['encoder'] / 1e6, 2),
      'params_decoder_M': round(params['decoder'] / 1e6, 2),
      'params_total_M': round(params['total'] / 1e6, 2),
      'tokens_per_clip': tokens,
      'E': task.latent_floats,
      'pixels_per_latent_float': round(frames * res * res * 3 / task.latent_floats, 3),
      'gmacs_encoder': round(macs['encoder'] / 1e9, 2),
      'gmacs_decoder': round(macs['decoder'] / 1e9, 2),
      'gmacs_per_clip': round(macs['total'] / 1e9, 2),
  }


def main(argv):
  del argv
  print(json.dumps(plan(common.load_config()), indent=2))


if __name__ == '__main__':
  app.run(main)
