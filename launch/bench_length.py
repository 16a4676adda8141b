r"""Cost of a DiT against the length of its clip, self-attention against LinGen's MATE mixer.

    python -m launch.bench_length --variant=DiT-cpu128/1 --spatial=4x4 --frames=8,32,128,512
    python -m launch.bench_length --variant=DiT-L/1 --spatial=16x16 --frames=8,32,128,512 \
        --time_limit=0

For every mixer and number of latent frames, one clip (batch 1) of `frames` x `spatial` tokens,
the forward and backward pass of the DiT (the train step without the optimizer update, whose cost
does not depend on the length) compiled for this machine's first device:

  flops       what XLA counts in the compiled program, and per token
  macs        the model's own count (dit/model.py forward_macs) x 3 (forward + backward), per clip
  memory      the compiled program's arguments + temporaries (XLA's memory analysis)
  step        the measured median of --steps runs, where the step fits --memory_limit and XLA's
              FLOPs at the machine's --tflops would take less than --time_limit seconds (0: never)

and then the crossover (the shortest length at which MATE needs fewer FLOPs) and, per mixer, the
longest length that fits in --memory_limit GiB. The last line is JSON.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from dit import model as dit_model
from launch import common

_VARIANT = flags.DEFINE_string('variant', 'DiT-cpu128/1', 'DiT variant (dit/model.py).')
_SPATIAL = flags.DEFINE_string('spatial', '4x4', 'Latent grid per frame, h x w.')
_FRAMES = flags.DEFINE_string('frames', '8,32,128,512', 'Latent frames per clip.')
_MIXERS = flags.DEFINE_string('mixers', 'attention,mate', 'Token mixers to compare.')
_CHANNELS = flags.DEFINE_integer('channels', 16, 'Latent channels.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_CHUNK = flags.DEFINE_integer('ssd_chunk', 64, "MATE's SSD chunk.")
_WINDOW = flags.DEFINE_string('window', '8,4,4', "MATE's temporal Swin window (t,h,w tokens).")
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed runs per measured step.')
_TIME_LIMIT = flags.DEFINE_float('time_limit', 30.0, 'Skip timing steps estimated longer (s).')
_TFLOPS = flags.DEFINE_float('tflops', 0.1, 'Throughput assumed for that estimate (TFLOP/s).')
_MEMORY_LIMIT = flags.DEFINE_float('memory_limit', 20.0, 'GiB a step may take to be run.')


def model_config(mixer: str, frames: int) -> dit_model.DiTConfig:
  h, w = (int(n) for n in _SPATIAL.value.lower().split('x'))
  return dit_model.DiTConfig(
      variant=_VARIANT.value,
      grid=(frames, h, w),
      channels=_CHANNELS.value,
      learn_sigma=False,
      num_classes=10,
      dtype=_DTYPE.value,
      mixer=mixer,
      ssd_chunk=_CHUNK.value,
      window=tuple(int(n) for n in _WINDOW.value.split(',')),
  )


def measure(cfg: dit_model.DiTConfig) -> dict:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: dit_model.DiT(cfg, rngs=nnx.Rngs(0))))

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x, jnp.full((1,), 500.0), jnp.zeros((1,), jnp.int32))
    return jnp.mean((out - x) ** 2)

  x = jax.ShapeDtypeStruct((1, *cfg.grid, cfg.channels), jnp.float32)
  step = jax.jit(jax.value_and_grad(loss))
  started = time.perf_counter()
  compiled = step.lower(state, x).compile()
  memory = compiled.memory_analysis()
  row = {
      'mixer': cfg.mixer,
      'frames': cfg.grid[0],
      'tokens': cfg.tokens,
      'compile_s': round(time.perf_counter() - started, 1),
      'xla_gflop': compiled.cost_analysis()['flops'] / 1e9,
      'model_gflop': 3 * 2 * dit_model.forward_macs(cfg) / 1e9,
      'memory_gib': (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30,
  }
  row['xla_kflop_per_token'] = row['xla_gflop'] * 1e6 / cfg.tokens
  estimate = row['xla_gflop'] / (_TFLOPS.value * 1e3)
  if row['memory_gib'] <= _MEMORY_LIMIT.value and estimate <= _TIME_LIMIT.value:
    model = dit_model.DiT(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model)
    value = jax.random.normal(jax.random.key(0), x.shape)
    jax.block_until_ready(compiled(params, value))
    times = []
    for _ in range(_STEPS.value):
      started = time.perf_counter()
      jax.block_until_ready(compiled(params, value))
      times.append(time.perf_counter() - started)
    row['step_s'] = statistics.median(times)
  return row


def table(rows: list[dict]) -> str:
  lines = [
      '| mixer | latent frames | tokens | XLA GFLOP | per token (kFLOP) | model GFLOP | '
      'memory GiB | step s |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    step = f'{r["step_s"]:.3f}' if 'step_s' in r else '-'
    lines.append(
        f'| {r["mixer"]} | {r["frames"]} | {r["tokens"]:,} | {r["xla_gflop"]:,.4g} | '
        f'{r["xla_kflop_per_token"]:,.0f} | {r["model_gflop"]:,.4g} | {r["memory_gib"]:.3g} | '
        f'{step} |'
    )
  return '\n'.join(lines)


def summary(rows: list[dict]) -> dict:
  by = {(r['mixer'], r['frames']): r for r in rows}
  frames = sorted({r['frames'] for r in rows})
  out = {}
  if {'attention', 'mate'} <= {r['mixer'] for r in rows}:
    cheaper = [f for f in frames if by['mate', f]['xla_gflop'] < by['attention', f]['xla_gflop']]
    out['mate_cheaper_from_frames'] = cheaper[0] if cheaper else None
  for mixer in sorted({r['mixer'] for r in rows}):
    fits = [f for f in frames if by[mixer, f]['memory_gib'] <= _MEMORY_LIMIT.value]
    out[f'{mixer}_longest_fitting_frames'] = max(fits) if fits else None
  return out


def main(argv):
  del argv
  common.quiet_library_logs()
  rows = []
  for mixer in _MIXERS.value.split(','):
    for frames in (int(f) for f in _FRAMES.value.split(',')):
      row = measure(model_config(mixer, frames))
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(f'{jax.devices()[0].device_kind}: {_VARIANT.value}, {_SPATIAL.value} tokens per frame')
  print(table(rows))
  result = summary(rows)
  print(json.dumps({'rows': rows, **result}))


if __name__ == '__main__':
  app.run(main)
