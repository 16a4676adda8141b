"""The latent cache: a video dataset encoded once by a frozen tokenizer, read by grain for DiT
training, so the DiT never runs the tokenizer per step.

    DIR/latents.json                    shapes, record counts per split, per-channel statistics,
                                        the tokenizer and the data they came from
    DIR/<split>/c<chunk>.array_record   records of consecutive examples, in dataset order

A record may be one clip or a long video's whole latent sequence, encoded in consecutive clips of
the tokenizer's trained length (`clip_latents` latent frames each); a DiT then trains on windows
of it (`latents.window`).

A record is raw little-endian bytes: the posterior mean, float32 (t, h, w, c); its log-variance,
float32 (t, h, w, c); the label, int32 (so training can sample z = mean + sigma eps). No pickle.

Encoding is resumable: chunks are written whole (to a temporary name, then renamed), and a rerun
skips the chunks that exist. Every process encodes its rows of each batch (the tokenizer is
sharded like a trained model); process 0 gathers and writes, so the files do not depend on the
process count. The statistics (per-channel mean and standard deviation of the latents, from the
train split) normalise the DiT's input; they travel with the DiT's checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import grain
import jax
import numpy as np
from array_record.python import array_record_module
from jax.experimental import multihost_utils

from vitok.data import DataError

METADATA = 'latents.json'
CHUNK_BATCHES = 32  # global batches per chunk file: the unit of resumption


@dataclasses.dataclass(frozen=True)
class Metadata:
  grid: tuple[int, int, int]  # latent (t, h, w)
  channels: int
  num_classes: int
  splits: dict  # split -> number of records
  channel_mean: tuple  # per channel, of samples z = mean + sigma eps (train split)
  channel_std: tuple
  tokenizer: str  # what the latents were encoded with
  data: dict  # the data fields of the encoded dataset
  # Latent frames per clip the tokenizer coded at once: a cached sequence longer than this is a
  # long video encoded clip after clip (0: written before the field existed, one clip).
  clip_latents: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.grid, self.channels)


def read_metadata(directory: str) -> Metadata:
  path = os.path.join(directory, METADATA)
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(
        f'{directory} is not a finished latent cache (python -m launch.encode writes one): '
        f'cannot read {path}: {type(e).__name__}: {e}'
    ) from None
  raw['grid'] = tuple(raw['grid'])
  return Metadata(**raw)


def write_metadata(directory: str, metadata: Metadata) -> None:
  path = os.path.join(directory, METADATA)
  with open(path + '.tmp', 'w') as f:
    json.dump(dataclasses.asdict(metadata), f, indent=2)
  os.replace(path + '.tmp', path)


def to_record(mean: np.ndarray, logvar: np.ndarray, label: int) -> bytes:
  return (
      np.asarray(mean, '<f4').tobytes()
      + np.asarray(logvar, '<f4').tobytes()
      + np.asarray(label, '<i4').tobytes()
  )


def from_record(record: bytes, shape: tuple[int, ...]) -> dict:
  n = int(np.prod(shape))
  values = np.frombuffer(record, '<f4', count=2 * n)
  label = np.frombuffer(record, '<i4', count=1, offset=8 * n)[0]
  return {
      'mean': values[:n].reshape(shape),
      'logvar': values[n:].reshape(shape),
      'label': np.int32(label),
  }


def chunk_files(directory: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, split, 'c*.array_record')))


class LatentSource:
  """Random access to one split of a latent cache: {'mean', 'logvar', 'label'} per example."""

  def __init__(self, directory: str, split: str, metadata: Metadata | None = None):
    self.metadata = metadata or read_metadata(directory)
    if split not in self.metadata.splits:
      raise DataError(
          f'the latent cache {directory} has no split {split!r}; it has '
          f'{", ".join(self.metadata.splits)}'
      )
    files = chunk_files(directory, split)
    self._records = grain.sources.ArrayRecordDataSource(files) if files else []
    if len(self._records) != self.metadata.splits[split]:
      raise DataError(
          f'the latent cache {directory} split {split!r} holds {len(self._records)} records, '
          f'its {METADATA} says {self.metadata.splits[split]}: rerun launch.encode'
      )

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return from_record(self._records[index], self.metadata.shape)


class _Offset:
  """source[start:] as a random-access source (resuming an encoding)."""

  def __init__(self, source, start: int):
    self._source, self._start = source, start

  def __len__(self):
    return max(len(self._source) - self._start, 0)

  def __getitem__(self, index):
    return self._source[self._start + index]


def write_chunk(path: str, records: list[bytes]) -> None:
  """One chunk file, complete or not at all."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path + '.tmp', 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(path + '.tmp', path)


def encode_split(
    encode_batch, batches_from, source, directory: str, split: str, batch_size: int, log=print
) -> int:
  """Encodes every example of `source` into DIR/<split>/ (skipping finished chunks) and returns
  the number of records. `batches_from(offset_source)` yields this process's rows of each global
  batch of `batch_size` ('video', 'label', 'mask'); `encode_batch(video, label, mask)` returns the
  whole batch's (mean, logvar, label, mask) as host arrays on every process."""
  per_chunk = CHUNK_BATCHES * batch_size
  done = len(chunk_files(directory, split))
  start = done * per_chunk
  if start >= len(source):
    return len(source)
  if done:
    log(f'{split}: {done} chunk(s) already encoded, resuming at example {start}')
  records, chunk = [], done
  for batch in batches_from(_Offset(source, start)):
    mean, logvar, label, mask = encode_batch(batch['video'], batch['label'], batch['mask'])
    records += [to_record(mean[i], logvar[i], label[i]) for i in np.flatnonzero(mask)]
    if len(records) >= per_chunk:
      _write(directory, split, chunk, records[:per_chunk])
      records, chunk = records[per_chunk:], chunk + 1
  if records:
    _write(directory, split, chunk, records)
  return len(source)


def _write(directory: str, split: str, chunk: int, records: list[bytes]) -> None:
  if jax.process_index() == 0:
    write_chunk(os.path.join(directory, split, f'c{chunk:05d}.array_record'), records)
  multihost_utils.sync_global_devices(f'latents: {split} chunk {chunk}')


def channel_statistics(examples, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of samples z = mean + sigma eps over `examples`
  (dicts with the posterior 'mean' and 'logvar', any leading shape; exactly: var z = var(mean) +
  E[sigma^2]), in float64."""
  c = channels
  total, total_sq, total_var, n = np.zeros(c), np.zeros(c), np.zeros(c), 0
  for example in examples:
    mean = np.asarray(example['mean']).reshape(-1, c).astype(np.float64)
    total += mean.sum(0)
    total_sq += np.square(mean).sum(0)
    total_var += np.exp(np.asarray(example['logvar']).reshape(-1, c).astype(np.float64)).sum(0)
    n += mean.shape[0]
  if n == 0:
    raise DataError('no training latents to compute the per-channel statistics from')
  mu = total / n
  var = total_sq / n - mu**2 + total_var / n
  return mu, np.sqrt(np.maximum(var, 1e-12))


class LatentWindows(grain.transforms.RandomMap):
  """A window of `window` latent frames of a cached sequence (mean, logvar), evenly spaced by a
  stride drawn uniformly from `strides` (those whose span fits the sequence; (1,) when empty)
  at a start drawn uniformly where it fits: clips at several frame rates from long videos, for
  stride conditioning. With `strides` the example gains 'stride' (int32)."""

  def __init__(self, window: int, strides=()):
    self.window, self.strides = int(window), tuple(strides)

  def _cut(self, element: dict, start: int, stride: int) -> dict:
    index = slice(start, start + (self.window - 1) * stride + 1, stride)
    out = {
        'mean': np.ascontiguousarray(element['mean'][index]),
        'logvar': np.ascontiguousarray(element['logvar'][index]),
        'label': element['label'],
    }
    if self.strides:
      out['stride'] = np.int32(stride)
    return out

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    length = element['mean'].shape[0]
    fits = [s for s in self.strides or (1,) if (self.window - 1) * s + 1 <= length]
    if not fits:
      raise DataError(
          f'a cached sequence of {length} latent frames holds no window of {self.window}'
      )
    stride = fits[rng.integers(len(fits))]
    start = rng.integers(length - (self.window - 1) * stride)
    return self._cut(element, int(start), int(stride))

  def first(self, element: dict) -> dict:
    """The held-out view: the first window at the finest stride."""
    return self._cut(element, 0, min(self.strides or (1,)))
