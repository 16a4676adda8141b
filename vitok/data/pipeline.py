"""grain input pipelines: random training clips and the fixed evaluation pass.

Both read the random-access sources returned by `datasets.prepare` (each
example: 'video' uint8 (L, h, w, 3) with L = stored clip length, optional
'label', 'source') and produce, on each of P processes, its rows of the global
batches

  'video': np.uint8 (b, T, H, W, 3) with T = data.frames, H = W = data.res
  'label': np.int32 (b,)   (0 for unlabelled data sets)
  'mask':  np.bool_ (b,)   (eval only: False marks padding)

with b = B // P for the global batch size B. Global batch k is the same for
any process count: process p's k-th batch is rows [p * b, (p + 1) * b) of it,
and each process reads and decodes only those rows (ProcessRows).

A training clip takes `frames` frames `frame_stride` apart, starting at a
random offset inside the stored clip, from one random square window of the
frames (random-resized-crop) resized to res x res, optionally mirrored. The
randomness is keyed by the example's global position, so training batch k is
a pure function of (seed, k): train_iterator starts at any step in O(1), and
the iterators' get_state() / set_state() resume exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import signal

import grain
import numpy as np
from PIL import Image

from vitok.data import DataError, datasets


def required_frames(frames: int, frame_stride: int) -> int:
  """Stored frames needed for `frames` frames `frame_stride` apart."""
  return (frames - 1) * frame_stride + 1


def _as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def check_clip_length(example, frames: int, frame_stride: int) -> None:
  """Raises ValueError if a stored clip is too short for frames x frame_stride."""
  stored = example['video'].shape[0]
  if stored < required_frames(frames, frame_stride):
    raise DataError(
        f'Stored clip {_as_str(example.get("source", "?"))!r} has {stored} frames, but '
        f'data.frames={frames} with data.frame_stride={frame_stride} needs '
        f'{required_frames(frames, frame_stride)}. Lower data.frames / data.frame_stride '
        f'or rebuild with a larger data.clip_frames.'
    )


def crop_resize(video: np.ndarray, top: int, left: int, side: int, res: int) -> np.ndarray:
  """Crops the square [top:top+side, left:left+side] of every frame and resizes
  it to res x res (PIL bilinear, antialiased when shrinking). uint8 in and out."""
  window = video[:, top : top + side, left : left + side]
  if side == res:
    return np.ascontiguousarray(window)
  return np.stack(
      [
          np.asarray(Image.fromarray(frame).resize((res, res), Image.Resampling.BILINEAR))
          for frame in window
      ]
  )


def _label(example) -> np.int32:
  return np.int32(example.get('label', 0))


@dataclasses.dataclass
class RandomClip(grain.transforms.RandomMap):
  """Stored example -> {'video': uint8 (frames, res, res, 3), 'label': int32}.

  Random temporal offset, one random square crop for all frames (side a
  uniform fraction in [crop_min_scale, 1] of the shorter side, uniform
  position), resize to res, and a coin-flip mirror when hflip.
  """

  frames: int
  frame_stride: int
  res: int
  crop_min_scale: float = 1.0
  hflip: bool = True

  def random_map(self, element, rng: np.random.Generator):
    check_clip_length(element, self.frames, self.frame_stride)
    video = element['video']
    span = required_frames(self.frames, self.frame_stride)
    start = rng.integers(0, video.shape[0] - span + 1)
    video = video[start : start + span : self.frame_stride]
    height, width = video.shape[1:3]
    short = min(height, width)
    side = max(1, round(short * rng.uniform(self.crop_min_scale, 1.0)))
    top = rng.integers(0, height - side + 1)
    left = rng.integers(0, width - side + 1)
    video = crop_resize(video, top, left, side, self.res)
    if self.hflip and rng.random() < 0.5:
      video = video[:, :, ::-1]
    return {'video': np.ascontiguousarray(video), 'label': _label(element)}


@dataclasses.dataclass
class CenterClip(grain.transforms.Map):
  """Deterministic eval view: the first `frames` frames `frame_stride` apart,
  the centred square of side = shorter side, resized to res; no flip."""

  frames: int
  frame_stride: int
  res: int

  def map(self, element):
    check_clip_length(element, self.frames, self.frame_stride)
    video = element['video'][: required_frames(self.frames, self.frame_stride) : self.frame_stride]
    height, width = video.shape[1:3]
    side = min(height, width)
    video = crop_resize(video, (height - side) // 2, (width - side) // 2, side, self.res)
    return {'video': video, 'label': _label(element)}


class ProcessRows(grain.MapDataset):
  """This process's rows of the global batches of `parent`.

  Global batch k is parent elements [k * B, (k + 1) * B). Process p of P owns
  rows [p * b, (p + 1) * b) of each global batch (b = B // P): element j of
  this dataset is parent element (j // b) * B + p * b + j % b, so
  `.batch(b)` of it yields this process's share of global batch k as its
  batch k. Only those elements are read from `parent`: each process decodes
  1 / P of the input, never the whole global batch.

  Without `padding` a partial last global batch is dropped (training, where
  `parent` is endless anyway). With it the partial batch is kept and its rows
  past the end of `parent` are `padding` (evaluation).
  """

  _MUTATES_ELEMENT_SPEC = False  # only selects elements (read by grain's statistics)

  def __init__(
      self,
      parent: grain.MapDataset,
      global_batch_size: int,
      process_index: int,
      process_count: int,
      padding=None,
  ):
    super().__init__(parent)
    if global_batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(
          f'Process {process_index} of {process_count} cannot take an equal '
          f'share of global batches of {global_batch_size}.'
      )
    self._global_batch_size = global_batch_size
    self._rows = global_batch_size // process_count
    self._first_row = process_index * self._rows
    self._padding = padding
    if padding is None:
      self._num_global_batches = len(parent) // global_batch_size
    else:
      self._num_global_batches = -(-len(parent) // global_batch_size)

  def __len__(self) -> int:
    return self._num_global_batches * self._rows

  def parent_index(self, index: int) -> int:
    global_batch, row = divmod(index, self._rows)
    return global_batch * self._global_batch_size + self._first_row + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    parent_index = self.parent_index(index)
    if self._padding is not None and parent_index >= len(self._parent):
      return self._padding
    return self._parent[parent_index]

  def __str__(self) -> str:
    return (
        f'ProcessRows(global_batch_size={self._global_batch_size}, '
        f'rows=[{self._first_row}, {self._first_row + self._rows}))'
    )


def _read_options() -> grain.ReadOptions:
  # A few threads overlap ZLIB decoding and PIL resizing (both release the
  # GIL); grain's default of 16 threads only adds contention on small hosts.
  return grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')


def global_train_examples(data_cfg, seed: int, source) -> grain.MapDataset:
  """The endless stream of augmented training examples, the same on every
  process: element i is a pure function of (seed, i)."""
  return (
      grain.MapDataset.source(source)
      .seed(seed)
      .shuffle()  # a fresh permutation every epoch
      .repeat()  # endless
      # random_map seeds each element's generator with its index here, the
      # global position, so crops and flips do not depend on the process count.
      .random_map(
          RandomClip(
              frames=data_cfg.frames,
              frame_stride=data_cfg.frame_stride,
              res=data_cfg.res,
              crop_min_scale=data_cfg.crop_min_scale,
              hflip=data_cfg.hflip,
          )
      )
  )


def train_dataset(
    data_cfg, seed: int, process_index: int = 0, process_count: int = 1, source=None
) -> grain.IterDataset:
  """Endless, shuffled, augmented training batches: this process's rows of the
  global batches.

  Global batch k is examples [k * B, (k + 1) * B) of global_train_examples (B =
  data.batch_size), whatever the process count. Process p of P yields rows
  [p * b, (p + 1) * b) of it as its batch k (b = B // P) and reads only those,
  so concatenating the k-th batches of processes 0..P-1 gives global batch k.

  Args:
    data_cfg: the config's data fields (configs/common.py); reads name & storage
      fields (via datasets.prepare), train_split, frames, frame_stride, res,
      batch_size, crop_min_scale, hflip, num_workers.
    seed: shuffling / augmentation seed; same seed -> same batches.
    process_index, process_count: this process and the number of processes.
    source: a random-access source to use instead of
      datasets.prepare(data_cfg)[data_cfg.train_split] (tests).

  Returns:
    grain IterDataset of {'video': uint8 (b, T, res, res, 3), 'label': int32
    (b,)}. iter() of it is a grain DatasetIterator whose get_state() /
    set_state() checkpoint the position (per process: restore it with the
    same process count and data.num_workers); train_iterator starts one at
    any global step.
  """
  if data_cfg.batch_size % process_count:
    raise ValueError(
        f'data.batch_size={data_cfg.batch_size} is not divisible by the '
        f'process count {process_count}.'
    )
  _check_process(process_index, process_count)
  if source is None:
    source = datasets.prepare(data_cfg)[data_cfg.train_split]
  if len(source) == 0:
    raise DataError(f'data.train_split={data_cfg.train_split!r} is empty.')
  # Fail at start-up (not later inside a worker) when clips are too short.
  check_clip_length(source[0], data_cfg.frames, data_cfg.frame_stride)

  return process_batches(
      global_train_examples(data_cfg, seed, source),
      data_cfg.batch_size,
      process_index,
      process_count,
      data_cfg.num_workers,
  )


def process_batches(
    examples: grain.MapDataset,
    batch_size: int,
    process_index: int,
    process_count: int,
    num_workers: int = 0,
) -> grain.IterDataset:
  """This process's rows of the global batches of `examples` (an endless MapDataset whose
  element i is a pure function of i): batch k holds rows [p * b, (p + 1) * b) of examples
  [k * B, (k + 1) * B), B = batch_size, b = B / process_count, read by `num_workers` worker
  processes (0: in this process). Any model family's training input goes through here, so
  `positioned` can start it at any step."""
  rows = ProcessRows(examples, batch_size, process_index, process_count)
  ds = rows.batch(batch_size // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset(_read_options())
  if num_workers > 0:
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers),
        worker_init_fn=leave_ctrl_c_to_the_parent,
    )
  return ds


def positioned(ds: grain.IterDataset, start_step: int, num_workers: int = 0):
  """iter(ds) for a `process_batches` dataset, positioned so that its first batch is global
  batch `start_step` (O(1): the iterator state of one that returned `start_step` batches)."""
  if start_step < 0:
    raise ValueError(f'start_step={start_step} is negative.')
  iterator = iter(ds)
  if start_step:
    iterator.set_state(_state_after(iterator.get_state(), start_step, num_workers))
  return iterator


def leave_ctrl_c_to_the_parent(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: ignore SIGINT. Ctrl-C in a terminal reaches the whole process group;
  the training process answers it (saves its step, then stops its workers)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _state_after(fresh_state: dict, step: int, num_workers: int) -> dict:
  """The state of a train_dataset iterator that has returned `step` batches,
  built from the state of a fresh one (what grain 0.2 keeps for this
  pipeline: batch k is a pure function of k, so a count is enough)."""
  if num_workers == 0:
    # PrefetchDatasetIterator over the batched MapDataset: the next batch index.
    return {'next_index': step}
  # mp_prefetch: an interleave of one iterator per worker; worker w reads
  # batches w, w + W, w + 2W, ... and the interleave takes them in turn.
  expected = [{'next_index': 0}] * num_workers
  if (
      fresh_state.get('iterators_in_use_indices') != list(range(num_workers))
      or fresh_state.get('iterators_in_use_states') != expected
  ):
    raise NotImplementedError(
        f"train_iterator does not know this grain version's iterator state {fresh_state!r}; "
        f'use data.num_workers=0 or restore a saved iterator state.'
    )
  state = copy.deepcopy(fresh_state)
  state['next_index_in_cycle'] = step % num_workers
  # Worker w has returned the batches below `step` congruent to w: ceil((step - w) / W).
  state['iterators_in_use_states'] = [
      {'next_index': -(-(step - worker) // num_workers)} for worker in range(num_workers)
  ]
  return state


def train_iterator(
    data_cfg,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
) -> grain.DatasetIterator:
  """iter(train_dataset(...)) positioned so that its first batch is (this
  process's share of) global batch `start_step`.

  Positioning costs O(1) (no batch is read or skipped): it sets the iterator
  state to that of an iterator that has returned `start_step` batches. The
  state is absolute, so get_state() of the result can be saved and restored
  into an iterator from train_dataset or train_iterator alike. Use it to
  resume when no iterator state was saved, or when the process count changed
  (the saved state is per process and layout-specific).
  """
  if start_step < 0:
    raise ValueError(f'start_step={start_step} is negative.')
  ds = train_dataset(data_cfg, seed, process_index, process_count, source)
  return positioned(ds, start_step, data_cfg.num_workers)


def eval_batches(data_cfg, source, process_index: int = 0, process_count: int = 1):
  """Every example of `source` exactly once, in order, deterministically;
  this process's rows of each global batch.

  Global batch g is examples [g * E, (g + 1) * E) with E =
  data.eval_batch_size; the last one is zero-padded to E and its padding rows
  have mask False. Every process yields one batch per global batch, in the same
  order, holding rows [p * e, (p + 1) * e) (e = E // P), and decodes only its
  real rows, so processes can take part in the same collective steps.

  Yields dicts {'video': uint8 (e, T, res, res, 3), 'label': int32 (e,),
  'mask': bool (e,)}.
  """
  batch_size = data_cfg.eval_batch_size
  if batch_size % process_count:
    raise ValueError(
        f'data.eval_batch_size={batch_size} is not divisible by the '
        f'process count {process_count}.'
    )
  _check_process(process_index, process_count)
  if len(source) == 0:
    raise DataError('the evaluation split (data.eval_split) is empty.')
  check_clip_length(source[0], data_cfg.frames, data_cfg.frame_stride)
  rows = batch_size // process_count
  padding = {
      'video': np.zeros((data_cfg.frames, data_cfg.res, data_cfg.res, 3), np.uint8),
      'label': np.int32(0),
  }
  examples = grain.MapDataset.source(source).map(
      CenterClip(frames=data_cfg.frames, frame_stride=data_cfg.frame_stride, res=data_cfg.res)
  )
  process_rows = ProcessRows(examples, batch_size, process_index, process_count, padding)
  batches = process_rows.batch(rows, drop_remainder=True).to_iter_dataset(_read_options())
  for global_batch, batch in enumerate(batches):
    first = global_batch * batch_size + process_index * rows
    batch['mask'] = first + np.arange(rows) < len(source)
    yield batch
