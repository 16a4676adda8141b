"""Any-length, any-size reconstruction in tiles of the trained clip size (Movie Gen's tiled decoding).

A video of T frames of H x W pixels is cut into tiles of the trained size (F frames, R x R
pixels) that overlap by a chosen number of frames and pixels; each tile is encoded and decoded as
the clip the tokenizer was trained on, and the decoded tiles are blended back with weights that
ramp linearly across each overlap and sum to one at every pixel. A video shorter or smaller than
one tile is edge-padded to it and the padding is cropped away, so the output has exactly the
input's frame count and size whatever they are (1 frame, a prime number of frames, 97 x 131).

Frames are processed one temporal tile at a time and handed on as soon as no later tile covers
them, so the working memory depends on F, H and W, not on T.

    plan = TilePlan.make((T, H, W), tile=(16, 128, 128), overlap=(4, 32, 32))
    for frame in reconstruct_frames(plan, frames, codec):   # codec: (n, F, R, R, 3) -> same
      ...

A long video's latents are one sequence of latent frames (`encode_video`: consecutive clips,
no overlap), the form a DiT generates; `decode_latents` turns a sequence of any length back into
frames in overlapping windows of the trained length, blended the same way.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
  """Starts of the tiles of `tile` positions that cover [0, length): every `tile - overlap`
  positions, the last one moved back to end exactly at `length` (so it may overlap its neighbour
  by more). One tile at 0 when length <= tile (the video is padded to it)."""
  if tile < 1:
    raise ValueError(f'tile size {tile} must be positive')
  if not 0 <= overlap < tile:
    raise ValueError(f'overlap {overlap} must be in [0, tile size {tile})')
  if length <= tile:
    return [0]
  stride = tile - overlap
  starts = list(range(0, length - tile, stride))
  return starts + [length - tile]


def blend_weights(length: int, tile: int, starts: list[int]) -> list[np.ndarray]:
  """Per tile, the weight (tile,) of each of its positions in the blend: a linear ramp across the
  part it shares with the previous and with the next tile, normalised so that at every position
  of [0, length) the weights of the tiles covering it sum to one. Positions past `length` (the
  padding of a short video, or the part of a last latent window past the frames asked for) get
  weight 0."""
  raw = []
  for i, start in enumerate(starts):
    position = np.arange(tile, dtype=np.float64)
    weight = np.ones(tile)
    if i > 0:  # ramp up over the overlap with the previous tile
      shared = starts[i - 1] + tile - start
      weight = np.minimum(weight, (position + 1) / (shared + 1))
    if i + 1 < len(starts):  # ramp down over the overlap with the next tile
      shared = start + tile - starts[i + 1]
      weight = np.minimum(weight, (tile - position) / (shared + 1))
    weight[start + position >= length] = 0.0
    raw.append(weight)
  total = np.zeros(max(length, starts[-1] + tile))
  for start, weight in zip(starts, raw):
    total[start : start + tile] += weight
  return [
      weight / np.where(total[s : s + tile] > 0, total[s : s + tile], 1)
      for s, weight in zip(starts, raw)
  ]


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Where the tiles of a (T, H, W) video lie, and their blend weights, per axis."""

  shape: tuple[int, int, int]  # the video's (T, H, W)
  tile: tuple[int, int, int]  # the trained (F, R, R)
  overlap: tuple[int, int, int]
  starts: tuple[list[int], list[int], list[int]]
  weights: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]

  @classmethod
  def make(cls, shape, tile, overlap) -> 'TilePlan':
    names = ('frames', 'height', 'width')
    starts, weights = [], []
    for name, length, size, shared in zip(names, shape, tile, overlap):
      if length < 1:
        raise ValueError(f'the video has {length} {name}; it needs at least one')
      try:
        axis_starts = tile_starts(length, size, shared)
      except ValueError as e:
        raise ValueError(f'{name}: {e}') from None
      starts.append(axis_starts)
      weights.append(blend_weights(length, size, axis_starts))
    return cls(tuple(shape), tuple(tile), tuple(overlap), tuple(starts), tuple(weights))

  @property
  def spatial_tiles(self) -> list[tuple[int, int]]:
    """(top, left) of every spatial tile, row by row."""
    return [(top, left) for top in self.starts[1] for left in self.starts[2]]

  @property
  def num_tiles(self) -> int:
    return len(self.starts[0]) * len(self.spatial_tiles)

  def boundary_frames(self) -> np.ndarray:
    """Bool (T,): frames that two temporal tiles share (and, without overlap, the last frame of a
    tile and the first of the next): where seams would show."""
    T, F = self.shape[0], self.tile[0]
    boundary = np.zeros(T, bool)
    starts = self.starts[0]
    for previous, start in zip(starts, starts[1:]):
      end = previous + F  # exclusive end of the previous tile
      if end > start:
        boundary[start:end] = True
      else:
        boundary[[end - 1, start]] = True
    return boundary


def _pad_to(frames: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
  """Edge-pad (t, h, w, 3) at the end of each axis up to `size` (no-op where already as big)."""
  pad = [(0, max(0, s - n)) for n, s in zip(frames.shape[:3], size)] + [(0, 0)]
  return np.pad(frames, pad, mode='edge') if any(p[1] for p in pad) else frames


def reconstruct_frames(
    plan: TilePlan,
    frames: Iterable[np.ndarray],
    codec: Callable[[np.ndarray], np.ndarray],
) -> Iterator[np.ndarray]:
  """The blended reconstruction, frame by frame (float32 (H, W, 3) in the codec's range).

  `frames` yields the T input frames (H, W, 3) in order; `codec` maps a batch of tiles
  (n, F, R, R, 3) to their reconstructions of the same shape (n = the spatial tiles of one
  temporal tile: the batch has one shape for the whole video, so it compiles once)."""
  T, H, W = plan.shape
  F, R, _ = plan.tile

  def decoded_clips():
    source = iter(frames)
    window, window_start = [], 0  # input frames [window_start, window_start + len(window))
    for start in plan.starts[0]:
      while window_start + len(window) < min(start + F, T):
        window.append(np.asarray(next(source)))
      drop = start - window_start  # frames no later tile reads
      window, window_start = window[drop:], start
      clip = _pad_to(np.stack(window[:F]), (F, max(H, R), max(W, R)))
      tiles = [clip[:, top : top + R, left : left + R] for top, left in plan.spatial_tiles]
      yield _blend_in_space(plan, np.asarray(codec(np.stack(tiles)), np.float32))

  return blend_in_time(T, F, plan.starts[0], plan.weights[0], decoded_clips())


def _blend_in_space(plan: TilePlan, decoded: np.ndarray) -> np.ndarray:
  """The spatial tiles (n, F, R, R, 3) of one temporal tile -> its frames (F, H, W, 3)."""
  _, H, W = plan.shape
  R = plan.tile[1]
  blended = np.zeros((decoded.shape[1], H, W, 3), np.float32)
  for tile, (top, left) in zip(decoded, plan.spatial_tiles):
    h, w = min(R, H - top), min(R, W - left)
    weight = np.multiply.outer(
        plan.weights[1][plan.starts[1].index(top)][:h],
        plan.weights[2][plan.starts[2].index(left)][:w],
    )
    blended[:, top : top + h, left : left + w] += tile[:, :h, :w] * weight[None, :, :, None]
  return blended


def blend_in_time(
    length: int,
    tile: int,
    starts: list[int],
    weights: list[np.ndarray],
    clips: Iterable[np.ndarray],
) -> Iterator[np.ndarray]:
  """Frames [0, length) of the weighted sum of `clips` (tile, H, W, 3), one per start, yielded
  as soon as no later clip covers them (copies, not views of the working buffer)."""
  accumulator, emitted = None, 0  # output frames [emitted, emitted + len(accumulator))
  for i, (start, clip) in enumerate(zip(starts, clips)):
    count = min(tile, length - start)  # frames of this clip inside the video
    if accumulator is None:
      accumulator = np.zeros((0, *clip.shape[1:]), np.float32)
    needed = start + count - emitted
    if len(accumulator) < needed:
      grown = np.zeros((needed, *clip.shape[1:]), np.float32)
      grown[: len(accumulator)] = accumulator
      accumulator = grown
    accumulator[start - emitted : start - emitted + count] += (
        clip[:count] * weights[i][:count, None, None, None]
    )
    final = (starts[i + 1] if i + 1 < len(starts) else length) - emitted
    yield from (frame.copy() for frame in accumulator[:final])
    accumulator, emitted = accumulator[final:], emitted + final


# ----------------------------------------------------------------------------------------------
# Latents of long videos: a sequence of latent frames, coded clip by clip.
# ----------------------------------------------------------------------------------------------


def encode_video(
    video: np.ndarray, clip_frames: int, q: int, encode: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
  """Latents (ceil(T / q), h, w, c) of a video (T, H, W, 3) at the trained frame size, encoded in
  consecutive clips of `clip_frames` that do not overlap (the last one edge-padded): the latent
  sequence a DiT generates or is trained on. `encode` maps clips (n, F, H, W, 3) to latents
  (n, F / q, h, w, c)."""
  T = video.shape[0]
  if clip_frames % q:
    raise ValueError(f'clip_frames={clip_frames} is not divisible by the tubelet size q={q}')
  clips = [
      _pad_to(video[start : start + clip_frames], (clip_frames, *video.shape[1:3]))
      for start in range(0, T, clip_frames)
  ]
  latents = np.asarray(encode(np.stack(clips)))
  latents = latents.reshape(-1, *latents.shape[2:])  # clips one after another in time
  return latents[: -(-T // q)]


def decode_latents(
    latents: np.ndarray,
    clip_latents: int,
    overlap_latents: int,
    q: int,
    decode: Callable[[np.ndarray], np.ndarray],
    frames: int | None = None,
) -> Iterator[np.ndarray]:
  """Frames (H, W, 3) of a latent sequence (t, h, w, c) of any length, decoded in windows of the
  trained `clip_latents` latent frames that overlap by `overlap_latents` and blended linearly
  over the shared frames (Movie Gen's tiled decoding); `frames` (default t * q) crops the end.
  `decode` maps one window (1, clip_latents, h, w, c) to frames (1, clip_latents * q, H, W, 3)."""
  t = latents.shape[0]
  length = t * q if frames is None else frames
  if not (t - 1) * q < length <= t * q:
    raise ValueError(f'{t} latent frames of {q} frames each cannot give {length} frames')
  starts = [s * q for s in tile_starts(t, clip_latents, overlap_latents)]
  tile = clip_latents * q
  weights = blend_weights(length, tile, starts)

  def decoded_clips():
    for start in starts:
      window = latents[start // q : start // q + clip_latents]
      window = _pad_to(window, (clip_latents, *window.shape[1:3]))  # a sequence shorter than one
      yield np.asarray(decode(window[None]), np.float32)[0]

  return blend_in_time(length, tile, starts, weights, decoded_clips())
