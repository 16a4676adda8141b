"""A sweep's results: one row per run, a table sorted by E, a log-linear fit, and plots.

Each row holds what the run is (the swept fields; encoder / decoder / total parameters, GMACs per
clip, tokens, E, pixels per latent float, from the task's `describe()`), what it cost (steps,
seconds when the sweep ran it), its newest evaluation at its last step (PSNR, SSIM, LPIPS; rFID /
rFVD when they were available) beside the pooled codec's at no more floats than E and the run's
margin over it, and with a chained DiT its generation metrics. Rows come from the runs' own
files (config.json, metrics.jsonl, status.json if the sweep ran them), so runs launched from
emitted commands are collected the same way.

The paper's finding, checked by `fit`: reconstruction is close to linear in log2 E whatever the
tubelet size. `fit` returns the line and its R^2.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import ml_collections
import numpy as np

from vitok.sweeps import sweep

RECONSTRUCTION = ('psnr', 'ssim', 'lpips', 'rfvd', 'rfid')  # with a pooled-codec value each
LOWER_IS_BETTER = {'lpips', 'lpips_alex', 'rfvd', 'rfid', 'gfvd', 'gfid', 'eval_mse'}
GENERATION = ('gfvd', 'gfid', 'accuracy_guided', 'accuracy_unguided', 'eval_mse')
BASELINE = {
    'psnr': 'baseline_psnr',
    'ssim': 'baseline_ssim',
    'rfvd': 'baseline_rfvd',
    'rfid': 'baseline_rfid',
}
LABELS = {
    'psnr': 'PSNR (dB)',
    'ssim': 'SSIM',
    'lpips': 'LPIPS (VGG16)',
    'lpips_alex': 'LPIPS (AlexNet)',
    'rfvd': 'rFVD',
    'rfid': 'rFID (per frame)',
    'gfvd': 'gFVD',
    'gfid': 'gFID (per frame)',
    'accuracy_guided': 'class accuracy, guided',
    'accuracy_unguided': 'class accuracy, unguided',
    'eval_mse': 'DiT held-out loss (MSE)',
}


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_status(path: str) -> dict:
  """A member's status.json (written by the sweep runner), or {} for a run it did not run."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def final_evaluation(workdir: str, total_steps: int, key: str) -> dict | None:
  """The newest record of workdir/metrics.jsonl at step `total_steps` that holds `key`, with the
  records of the same step merged (training's evaluation, then launch.eval's)."""
  at_end = [
      r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if r.get('step') == total_steps
  ]
  if not any(key in r for r in at_end):
    return None
  merged = {}
  for record in at_end:
    merged.update(record)
  return merged


def _tubelet(variant: str) -> str:
  return variant.rsplit('/', 1)[-1]


def run_row(sweep_config, member: sweep.Member, directory: str, describe) -> dict[str, Any]:
  """The row of one member; 'state' says whether its results are in ('done') or why not.
  `describe(config)` gives the sizes of a config's model (its task's `describe()`)."""
  root = os.path.join(directory, member.name)
  tokenizer_dir = os.path.join(root, 'tokenizer')
  status = read_status(os.path.join(root, 'status.json'))
  saved = os.path.join(tokenizer_dir, 'config.json')
  if os.path.exists(saved):  # what ran
    with open(saved) as f:
      config = ml_collections.ConfigDict(json.load(f))
  else:
    config = sweep.member_config(sweep_config, member)
  row: dict[str, Any] = {'name': member.name, **{k: v for k, v in member.fields.items()}}
  description = describe(config)
  row.update(
      variant=description['variant'],
      tubelet=_tubelet(description['variant']),
      channels=config.model.channels,
      encoder=description['variant'].split('-', 1)[0],
      decoder=description['variant'].split('/')[0].split('-', 1)[1],
      params_encoder_M=description['params_encoder_M'],
      params_decoder_M=description['params_decoder_M'],
      params_total_M=description['params_total_M'],
      gmacs_per_clip=description['gmacs_per_clip'],
      tokens=description['tokens_per_clip'],
      E=description['E'],
      pixels_per_float=description['pixels_per_latent_float'],
      steps=config.total_steps,
      train_seconds=status.get('seconds', {}).get('train'),
  )
  evaluation = final_evaluation(tokenizer_dir, config.total_steps, 'psnr')
  if evaluation is None:
    state = status.get('state') or ('running' if os.path.isdir(tokenizer_dir) else 'pending')
    # A run the sweep finished whose metrics.jsonl has no evaluation at its last step (an
    # cadence that misses total_steps, or a deleted file) is reported, not shown empty.
    row['state'] = f'no evaluation at step {config.total_steps}' if state == 'done' else state
    row['error'] = status.get('error')
    return row
  for metric in (*RECONSTRUCTION, 'lpips_alex'):
    if metric in evaluation:
      row[metric] = evaluation[metric]
  for metric, baseline in BASELINE.items():
    if baseline in evaluation:
      row[baseline] = evaluation[baseline]
      if metric in row:
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        row[f'{metric}_margin'] = sign * (row[metric] - evaluation[baseline])
  row['baseline_floats'] = evaluation.get('baseline_floats')
  row['eval_clips'] = evaluation.get('clips')
  row['state'] = 'done'
  if sweep_config.get('dit'):
    dit_dir = os.path.join(root, 'dit')
    dit_config = os.path.join(dit_dir, 'config.json')
    dit_eval = None
    if os.path.exists(dit_config):
      with open(dit_config) as f:
        dit_eval = final_evaluation(dit_dir, json.load(f)['total_steps'], 'eval_mse')
    if dit_eval is None:
      row['state'] = status.get('state') if status.get('state') == 'failed' else 'dit pending'
      row['error'] = status.get('error')
    for metric in GENERATION:
      if dit_eval and metric in dit_eval:
        row[metric] = dit_eval[metric]
  return row


def collect(sweep_config, members: list[sweep.Member], directory: str, describe) -> list[dict]:
  return [run_row(sweep_config, m, directory, describe) for m in members]


# --- the fit ---


def fit(x, y) -> tuple[float, float, float]:
  """Least-squares y = a + b log2(x): returns (a, b, R^2)."""
  u, y = np.log2(np.asarray(x, np.float64)), np.asarray(y, np.float64)
  b, a = np.polyfit(u, y, 1)
  residual = y - (a + b * u)
  total = y - y.mean()
  r2 = (
      1.0 - float(residual @ residual) / float(total @ total) if total @ total > 0 else float('nan')
  )
  return float(a), float(b), r2


def fits(rows: list[dict]) -> dict[str, tuple[float, float, float, int]]:
  """The log2-E fit of every reconstruction metric over the finished runs (3 or more of them,
  at 2 or more values of E): metric -> (a, b, R^2, runs)."""
  result = {}
  for metric in (*RECONSTRUCTION, *GENERATION):
    points = [(r['E'], r[metric]) for r in rows if r.get('state') == 'done' and metric in r]
    if len(points) >= 3 and len({e for e, _ in points}) >= 2:
      result[metric] = (*fit(*zip(*points)), len(points))
  return result


# --- tables ---

COLUMNS = (
    'name', 'state', 'tubelet', 'channels', 'encoder', 'decoder', 'params_encoder_M',
    'params_decoder_M', 'params_total_M', 'gmacs_per_clip', 'tokens', 'E', 'pixels_per_float',
    'steps', 'train_seconds', 'psnr', 'baseline_psnr', 'psnr_margin', 'ssim', 'baseline_ssim',
    'ssim_margin', 'lpips', 'lpips_alex', 'rfvd', 'baseline_rfvd', 'rfvd_margin', 'rfid',
    'baseline_rfid', 'rfid_margin', 'baseline_floats', 'eval_clips', *GENERATION, 'error',
)  # fmt: skip


def _sorted(rows):
  return sorted(rows, key=lambda r: (r['E'], r['name']))


def write_csv(rows: list[dict], path: str) -> None:
  swept = [k for r in rows for k in r if '.' in k]
  columns = list(dict.fromkeys([*COLUMNS[:2], *swept, *COLUMNS[2:]]))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(_sorted(rows))


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def markdown(rows: list[dict], fitted: dict, title: str) -> str:
  shown = [
      ('run', 'name'), ('tubelet', 'tubelet'), ('c', 'channels'), ('encoder', 'encoder'),
      ('decoder', 'decoder'), ('enc M', 'params_encoder_M'), ('dec M', 'params_decoder_M'),
      ('GMACs', 'gmacs_per_clip'), ('tokens', 'tokens'), ('E', 'E'),
      ('px / float', 'pixels_per_float'), ('steps', 'steps'), ('train s', 'train_seconds'),
      ('PSNR', 'psnr'), ('pooled PSNR', 'baseline_psnr'), ('margin', 'psnr_margin'),
      ('SSIM', 'ssim'), ('pooled SSIM', 'baseline_ssim'), ('LPIPS', 'lpips'),
  ]  # fmt: skip
  for metric, label in (('rfvd', 'rFVD'), ('rfid', 'rFID')):
    if any(metric in r for r in rows):
      shown += [(label, metric), (f'pooled {label}', f'baseline_{metric}')]
  for metric in GENERATION:
    if any(metric in r for r in rows):
      shown.append((LABELS[metric], metric))
  done = [r for r in _sorted(rows) if r['state'] == 'done']
  lines = [f'# {title}', '', '| ' + ' | '.join(h for h, _ in shown) + ' |']
  lines.append('|' + '---|' * len(shown))
  lines += ['| ' + ' | '.join(_cell(r.get(k)) for _, k in shown) + ' |' for r in done]
  lines += [
      '',
      '"pooled": the trivial codec (average-pool, then resize back) with no more floats than E,',
      'at the pooling that gives it the best PSNR; "margin": the run minus it (PSNR, dB).',
  ]
  if fitted:
    lines += [
        '',
        '| metric | fit over runs | slope per doubling of E | R^2 | runs |',
        '|---|---|---|---|---|',
    ]
    for metric, (a, b, r2, n) in fitted.items():
      lines.append(f'| {metric} | {a:.4g} + {b:.4g} log2 E | {b:.4g} | {r2:.3f} | {n} |')
  missing = [r for r in rows if r['state'] != 'done']
  if missing:
    lines += ['', f'Not finished ({len(missing)}):', '']
    lines += [
        f'- {r["name"]}: {r["state"]}' + (f' ({r["error"]})' if r.get('error') else '')
        for r in missing
    ]
  return '\n'.join(lines) + '\n'


# --- plots ---


def _axis_label(metric: str) -> str:
  return LABELS.get(metric, metric) + (', lower is better' if metric in LOWER_IS_BETTER else '')


def _color_map(rows):
  import matplotlib

  tubelets = sorted({r['tubelet'] for r in rows})
  palette = matplotlib.colormaps['tab10']
  return {t: palette(i % 10) for i, t in enumerate(tubelets)}


def plot_against_e(rows: list[dict], metric: str, fitted, path: str) -> None:
  """`metric` against E on a log2 axis, a colour per tubelet size, the fitted line with its R^2
  and the pooled codec's values on the same axes."""
  import matplotlib.pyplot as plt

  done = [r for r in rows if r['state'] == 'done' and metric in r]
  colors = _color_map(done)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for tubelet, color in colors.items():
    pts = sorted((r['E'], r[metric]) for r in done if r['tubelet'] == tubelet)
    ax.scatter(*zip(*pts), color=color, s=36, zorder=3, label=f'ViTok, tubelet {tubelet} (q x p)')
  baseline = BASELINE.get(metric)
  pooled = sorted({(r['E'], r[baseline]) for r in done if baseline and baseline in r})
  if pooled:
    ax.plot(*zip(*pooled), 'k--', marker='x', label='pooled codec, <= E floats')
  if metric in fitted:
    a, b, r2, _ = fitted[metric]
    xs = np.array(sorted({r['E'] for r in done}), np.float64)
    ax.plot(xs, a + b * np.log2(xs), color='0.4', lw=1,
            label=f'fit {a:.3g} + {b:.3g} log2 E, R$^2$ = {r2:.2f}')  # fmt: skip
  ax.set_xscale('log', base=2)
  ax.set_xlabel('E: latent floats per clip (log2 scale)')
  ax.set_ylabel(_axis_label(metric))
  ax.set_title(f'Held-out {LABELS.get(metric, metric)} against E')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_against_size(rows: list[dict], side: str, metrics: list[str], path: str) -> bool:
  """Each metric against the `side` ('encoder' | 'decoder') parameter count, one line per group
  of runs that differ only in that side (same E, tubelet and other side). False if no group has
  two sizes."""
  import matplotlib.pyplot as plt

  other = 'decoder' if side == 'encoder' else 'encoder'
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if r['state'] == 'done':
      groups.setdefault((r['E'], r['tubelet'], r[other]), []).append(r)
  groups = {k: v for k, v in groups.items() if len({r[side] for r in v}) >= 2}
  if not groups:
    return False
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.0), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for (e, tubelet, other_size), members in sorted(groups.items()):
      pts = sorted((r[f'params_{side}_M'], r[metric]) for r in members if metric in r)
      if pts:
        ax.plot(*zip(*pts), marker='o', label=f'E = {e}, {tubelet}, {other} {other_size}')
    ax.set_xlabel(f'{side} parameters (millions)')
    ax.set_ylabel(_axis_label(metric))
    ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f'Held-out reconstruction against {side} size, at fixed E')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write(sweep_config, members: list[sweep.Member], directory: str, describe) -> dict[str, str]:
  """results.csv, results.md and plots/*.png in `directory` from whatever has finished; prints
  and returns the paths written."""
  import matplotlib

  matplotlib.use('Agg')
  rows = collect(sweep_config, members, directory, describe)
  fitted = fits(rows)
  os.makedirs(os.path.join(directory, 'plots'), exist_ok=True)
  written = {
      'csv': os.path.join(directory, 'results.csv'),
      'md': os.path.join(directory, 'results.md'),
  }
  write_csv(rows, written['csv'])
  with open(written['md'], 'w') as f:
    f.write(
        markdown(
            rows,
            fitted,
            f'Sweep {directory}: {sum(r["state"] == "done" for r in rows)} of {len(rows)} runs',
        )
    )
  done = [r for r in rows if r['state'] == 'done']
  for metric in (*RECONSTRUCTION, *GENERATION):
    if any(metric in r for r in done):
      path = os.path.join(directory, 'plots', f'{metric}_vs_E.png')
      plot_against_e(rows, metric, fitted, path)
      written[f'{metric}_vs_E'] = path
  size_metrics = [m for m in ('psnr', 'ssim', 'lpips', 'rfvd') if any(m in r for r in done)]
  for side in ('encoder', 'decoder'):
    path = os.path.join(directory, 'plots', f'{side}_size.png')
    if size_metrics and plot_against_size(rows, side, size_metrics, path):
      written[f'{side}_size'] = path
  for path in written.values():
    print(f'wrote {path}')
  return written
