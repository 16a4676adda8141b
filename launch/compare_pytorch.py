r"""This project's train steps against the PyTorch code users would otherwise run, on this
machine, with one protocol: random input, the median of timed steps after warm-up, peak resident
memory of a process that runs nothing else. The tokenizer against the same network, loss and
optimizer written in PyTorch below; the DiT against facebookresearch/DiT's own model, diffusion
and train-step code.

    python -m launch.compare_pytorch --torch_python=/path/to/venv/bin/python
    python -m launch.compare_pytorch --torch_python=... --configs=small --dtypes=bfloat16
    python -m launch.compare_pytorch --torch_python=... --configs=dit-s2,dit-b2 --dit_repo=/path/to/DiT

PyTorch is not a dependency of the project: `--torch_python` is the interpreter of an
environment that has it (`python -m venv /tmp/torch && /tmp/torch/bin/pip install torch
--index-url https://download.pytorch.org/whl/cpu`). That interpreter runs this file's PyTorch half
(`torch_step_times`, which imports only torch and numpy); this project's half is `launch.bench` in
its own process. Both print one JSON line; this script prints the table. The DiT configs import
`models.py` and `diffusion/` from `--dit_repo`, a clone of github.com/facebookresearch/DiT, whose
model needs timm 0.6.x (and timm needs torchvision: e.g. `pip install torch torchvision
timm==0.6.13`).

The PyTorch network is written here, layer for layer the network of `vitok/tokenizer/model.py`:
tubelet embedding (a linear map per q x p x p tubelet), pre-LayerNorm blocks with fused q/k/v,
3-D axial RoPE, `F.scaled_dot_product_attention` (PyTorch's fused CPU flash attention), SwiGLU
MLP of width 2.67 x, final LayerNorm, linear bottleneck to (mean, log-variance), reparameterised
sample, the mirror-image decoder and pixel head; loss L2 + 1e-3 KL (LPIPS off on both sides);
AdamW with global-norm clipping at 1.0. bfloat16 on the PyTorch side is CPU autocast, on this
project's side `model.dtype=bfloat16`; parameters stay float32 on both.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# name: (config overrides for configs/vitok.py, description). Batch and frames as in issue 9.
CONFIGS = {
    'small': (
        'variant=cpu256-cpu256/4x8,channels=8,frames=8,res=64,batch=8',
        'width 256, 4 + 4 blocks, 8 heads, 4x8 tubelets, 8x64x64, c = 8, batch 8 (128 tokens)',
    ),
    'sb': (
        'variant=S-B/4x8,channels=16,frames=16,res=128,batch=1',
        'S-B/4x8, 16x128x128, c = 16, batch 1 (1,024 tokens)',
    ),
}
# name: (facebookresearch/DiT variant, latent size, batch, description). Image latents with 4
# channels as the DiT paper's (an 8x-downsampling tokenizer: latent size x 8 pixels); ours is
# the same network with recipe 'classic' and objective 'ddpm' (configs/dit.py), on a 1-frame clip.
DIT_CONFIGS = {
    'dit-s2': (
        'DiT-S/2',
        32,
        8,
        'DiT-S/2 (width 384, 12 blocks), 32x32x4 latents, 256 tokens, batch 8',
    ),
    'dit-b2': (
        'DiT-B/2',
        64,
        2,
        'DiT-B/2 (width 768, 12 blocks), 64x64x4 latents, 1,024 tokens, batch 2',
    ),
}
DIT_CHANNELS = 4
# configs/vitok.py sizes (vitok/tokenizer/model.py SIZES): width, depth, heads.
SIZES = {
    'cpu128': (128, 4, 4),
    'cpu256': (256, 4, 8),
    'S': (768, 6, 12),
    'B': (768, 12, 12),
    'L': (1152, 24, 16),
}


def _overrides(spec: str) -> dict:
  return dict(item.split('=') for item in spec.split(','))


# ----------------------------------------------------------------------------------------------
# The PyTorch half (runs in --torch_python; imports torch only here).
# ----------------------------------------------------------------------------------------------


def torch_step_times(spec: str, dtype: str, steps: int, warmup: int, threads: int) -> dict:
  import torch
  import torch.nn.functional as F
  from torch import nn

  torch.manual_seed(0)
  if threads:
    torch.set_num_threads(threads)
  o = _overrides(spec)
  enc_name, rest = o['variant'].split('-')
  dec_name, tubelet = rest.split('/')
  q, p = (int(v) for v in tubelet.split('x'))
  frames, res, batch, channels = (
      int(o['frames']),
      int(o['res']),
      int(o['batch']),
      int(o['channels']),
  )
  grid = (frames // q, res // p, res // p)
  tokens = grid[0] * grid[1] * grid[2]

  def rope_angles(head_dim, theta=10000.0):
    """(L, head_dim/2) angles: the rotary pairs split over t, h, w (remainder to t)."""
    pairs = head_dim // 2
    per = [pairs // 3] * 3
    per[0] += pairs - 3 * per[0]
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing='ij')
    coords = torch.stack([t, h, w], -1).reshape(-1, 3).float()
    parts = [
        coords[:, a : a + 1] * theta ** (-torch.arange(n).float() / max(n, 1))
        for a, n in enumerate(per)
    ]
    return torch.cat(parts, -1)

  def apply_rope(x, cos, sin):  # x (B, heads, L, head_dim), pairs (2i, 2i + 1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)

  class Block(nn.Module):

    def __init__(self, width, heads):
      super().__init__()
      self.heads = heads
      hidden = int(2.67 * width)
      self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
      self.qkv = nn.Linear(width, 3 * width, bias=False)
      self.out = nn.Linear(width, width)
      self.gate_up = nn.Linear(width, 2 * hidden)
      self.down = nn.Linear(hidden, width)

    def forward(self, x, cos, sin):
      b, n, d = x.shape
      qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
      q_, k_, v_ = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, head_dim)
      q_, k_ = apply_rope(q_, cos, sin), apply_rope(k_, cos, sin)
      y = F.scaled_dot_product_attention(q_, k_, v_)
      x = x + self.out(y.transpose(1, 2).reshape(b, n, d))
      gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
      return x + self.down(F.silu(gate) * up)

  class ViT(nn.Module):

    def __init__(self, name):
      super().__init__()
      width, depth, heads = SIZES[name]
      self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
      self.norm = nn.LayerNorm(width)
      angles = rope_angles(width // heads)
      self.register_buffer('cos', angles.cos())
      self.register_buffer('sin', angles.sin())

    def forward(self, x):
      for block in self.blocks:
        x = block(x, self.cos, self.sin)
      return self.norm(x)

  class Tokenizer(nn.Module):

    def __init__(self):
      super().__init__()
      tube = q * p * p * 3
      enc_w, dec_w = SIZES[enc_name][0], SIZES[dec_name][0]
      self.patch_embed, self.encoder = nn.Linear(tube, enc_w), ViT(enc_name)
      self.to_moments = nn.Linear(enc_w, 2 * channels)
      self.from_latent, self.decoder = nn.Linear(channels, dec_w), ViT(dec_name)
      self.to_pixels = nn.Linear(dec_w, tube)

    def forward(self, video):  # (B, T, H, W, 3)
      b = video.shape[0]
      t, h, w = grid
      x = video.view(b, t, q, h, p, w, p, 3).permute(0, 1, 3, 5, 2, 4, 6, 7)
      x = self.encoder(self.patch_embed(x.reshape(b, tokens, -1)))
      mean, logvar = self.to_moments(x).float().chunk(2, dim=-1)
      logvar = logvar.clamp(-30.0, 20.0)
      z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
      pixels = self.to_pixels(self.decoder(self.from_latent(z))).float()
      pixels = pixels.view(b, t, h, w, q, p, p, 3).permute(0, 1, 4, 2, 5, 3, 6, 7)
      recon = pixels.reshape(video.shape)
      kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
      return F.mse_loss(recon, video) + 1e-3 * kl.mean()

  model = Tokenizer()
  matrices = [x for x in model.parameters() if x.ndim >= 2]
  others = [x for x in model.parameters() if x.ndim < 2]
  optimizer = torch.optim.AdamW(
      [dict(params=matrices, weight_decay=1e-4), dict(params=others, weight_decay=0.0)],
      lr=1e-4,
      betas=(0.9, 0.95),
  )
  video = torch.rand(batch, frames, res, res, 3) * 2 - 1

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = model(video)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())

  return _time_steps(torch, model, step, steps, warmup)


def _time_steps(torch, model, step, steps: int, warmup: int) -> dict:
  """Median wall time of `steps` calls of `step` after `warmup` untimed ones."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
  times.sort()
  return {
      'step_time_s': times[len(times) // 2],
      'step_times_s': [round(t, 4) for t in times],
      'peak_rss_GiB': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
      'params': sum(x.numel() for x in model.parameters() if x.requires_grad),
      'torch': torch.__version__,
      'threads': torch.get_num_threads(),
  }


def torch_dit_step_times(
    name: str, dtype: str, steps: int, warmup: int, threads: int, dit_repo: str
) -> dict:
  """facebookresearch/DiT's own model and diffusion (imported from `dit_repo`, a clone of it),
  with its train.py step: a random timestep per example, `training_losses` (MSE on the noise
  plus the VLB term for the learned variance), AdamW (lr 1e-4, no weight decay), and its EMA
  update (decay 0.9999), on random latents and labels."""
  import copy

  import torch

  sys.path.insert(0, os.path.abspath(dit_repo))
  from diffusion import create_diffusion  # facebookresearch/DiT
  from models import DiT_models  # facebookresearch/DiT (needs timm)

  torch.manual_seed(0)
  if threads:
    torch.set_num_threads(threads)
  variant, latent_size, batch, _ = DIT_CONFIGS[name]
  model = DiT_models[variant](input_size=latent_size, in_channels=DIT_CHANNELS, num_classes=1000)
  ema = copy.deepcopy(model).requires_grad_(False)
  diffusion = create_diffusion(timestep_respacing='')
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  model.train()
  latents = torch.randn(batch, DIT_CHANNELS, latent_size, latent_size)
  labels = torch.randint(0, 1000, (batch,))

  @torch.no_grad()
  def update_ema(decay=0.9999):  # train.py's update_ema, which this file cannot import
    ema_params = dict(ema.named_parameters())
    for key, param in model.named_parameters():
      ema_params[key].mul_(decay).add_(param.data, alpha=1 - decay)

  def step():
    t = torch.randint(0, diffusion.num_timesteps, (batch,))
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = diffusion.training_losses(model, latents, t, dict(y=labels))['loss'].mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    update_ema()

  return _time_steps(torch, model, step, steps, warmup)


# ----------------------------------------------------------------------------------------------
# This project's half, and the table.
# ----------------------------------------------------------------------------------------------


def _last_json(text: str) -> dict:
  for line in reversed(text.splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise RuntimeError(f'no JSON line in the output:\n{text[-2000:]}')


def _run(cmd: list[str], env=None) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return _last_json(out.stdout)


def jax_step_times(spec: str, dtype: str, steps: int, warmup: int, attention: str) -> dict:
  cmd = [
      sys.executable,
      '-m',
      'launch.bench',
      f'--config=configs/vitok.py:demo,{spec}',
      '--config.loss.lpips=0',
      f'--config.model.dtype={dtype}',
      f'--config.model.attention={attention}',
      f'--steps={steps}',
      f'--warmup={warmup}',
      '--profile=0',
  ]
  return _run(cmd)


def dit_config_overrides(name: str, dtype: str, attention: str) -> tuple[str, dict]:
  """The configs/dit.py argument and the field overrides that make this project's DiT the
  network of facebookresearch/DiT's `name` config (tests/test_cli.py checks the parameter
  count), with its objective and optimizer: recipe 'classic', DDPM with learned variance, AdamW
  at lr 1e-4 without weight decay or clipping, EMA 0.9999 (configs/dit.py's defaults)."""
  variant, latent_size, batch, _ = DIT_CONFIGS[name]
  return f'variant={variant},batch={batch}', {
      'model.recipe': 'classic',
      'diffusion.objective': 'ddpm',
      'model.num_classes': 1000,
      # The latent grid follows from a tokenizer description: 8x8 pixel patches of one frame.
      'tokenizer.variant': 'S-B/8',
      'tokenizer.channels': DIT_CHANNELS,
      'data.frames': 1,
      'data.res': 8 * latent_size,
      'optim.clip_norm': 0,  # DiT's train.py does not clip
      'model.dtype': dtype,
      'model.attention': attention,
  }


def jax_dit_step_times(name: str, dtype: str, steps: int, warmup: int, attention: str) -> dict:
  arg, fields = dit_config_overrides(name, dtype, attention)
  cmd = [sys.executable, '-m', 'launch.bench', f'--config=configs/dit.py:{arg}']
  cmd += [f'--config.{key}={value}' for key, value in fields.items()]
  cmd += [f'--steps={steps}', f'--warmup={warmup}', '--profile=0']
  return _run(cmd)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--torch_python', help='interpreter of an environment with torch')
  parser.add_argument(
      '--configs',
      default='small,sb',
      help=f'of {sorted(CONFIGS)} (tokenizer), {sorted(DIT_CONFIGS)} (DiT)',
  )
  parser.add_argument(
      '--dit_repo',
      help='a clone of github.com/facebookresearch/DiT (for the dit-* configs; needs timm)',
  )
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--attention', default='xla,blockwise', help="this project's choices")
  parser.add_argument('--steps', type=int, default=0, help='timed steps (0: 10 small, 4 sb)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: its default)')
  parser.add_argument('--torch_worker', help=argparse.SUPPRESS)  # spec:dtype, internal
  args = parser.parse_args()

  if args.torch_worker:
    spec, dtype = args.torch_worker.rsplit(':', 1)
    if spec in DIT_CONFIGS:
      row = torch_dit_step_times(spec, dtype, args.steps, args.warmup, args.threads, args.dit_repo)
    else:
      row = torch_step_times(spec, dtype, args.steps, args.warmup, args.threads)
    print(json.dumps(row))
    return
  if not args.torch_python:
    parser.error('--torch_python is required (an interpreter whose environment has torch)')
  names = args.configs.split(',')
  for name in names:
    if name not in CONFIGS and name not in DIT_CONFIGS:
      parser.error(f'--configs: unknown {name!r} (known: {sorted(CONFIGS) + sorted(DIT_CONFIGS)})')
  if any(name in DIT_CONFIGS for name in names) and not args.dit_repo:
    parser.error('--dit_repo is required for the dit-* configs (a clone of facebookresearch/DiT)')

  rows = []
  for name in names:
    if name in DIT_CONFIGS:
      spec, description = name, DIT_CONFIGS[name][3]
    else:
      spec, description = CONFIGS[name]
    steps = args.steps or (10 if name == 'small' else 4)
    for dtype in args.dtypes.split(','):
      torch_row = _run(
          [
              args.torch_python,
              os.path.abspath(__file__),
              f'--torch_worker={spec}:{dtype}',
              f'--steps={steps}',
              f'--warmup={args.warmup}',
              f'--threads={args.threads}',
              f'--dit_repo={args.dit_repo or ""}',
          ],
          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
      )
      for attention in args.attention.split(','):
        timer = jax_dit_step_times if name in DIT_CONFIGS else jax_step_times
        jax_row = timer(spec, dtype, steps, args.warmup, attention)
        rows.append((description, dtype, attention, torch_row, jax_row))
        print(
            f'{name} {dtype} {attention}: torch {torch_row["step_time_s"]:.4f} s '
            f'{torch_row["peak_rss_GiB"]:.2f} GiB, this project {jax_row["step_time_s"]:.4f} s '
            f'{jax_row["peak_memory_GiB"]:.2f} GiB',
            flush=True,
        )

  print(
      '\n| config | precision | attention here | PyTorch s/step | this project s/step | '
      'speed vs PyTorch | PyTorch peak GiB | peak GiB here |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for description, dtype, attention, t, j in rows:
    speed = t['step_time_s'] / j['step_time_s']
    print(
        f'| {description} | {dtype} | {attention} | {t["step_time_s"]:.3f} | '
        f'{j["step_time_s"]:.3f} | {speed:.2f}x | {t["peak_rss_GiB"]:.2f} | '
        f'{j["peak_memory_GiB"]:.2f} |'
    )
  if rows:
    first = rows[0][3]
    print(
        f"\nPyTorch {first['torch']} ({first['threads']} threads); median step times after "
        "warm-up; peak memory is each process's peak resident set."
    )


if __name__ == '__main__':
  main()
