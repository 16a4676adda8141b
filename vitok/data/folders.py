"""Finding source files and deciding their train/test split.

Pure file-system helpers used by the dataset builders (no decoding here).
Paths returned are *relative* to the source folder, with '/' separators, so
they are stable across machines and can be hashed for a deterministic split.

Supported folder layouts (video_folder / image_folder):

  <root>/train/[<Class>/]...files   and   <root>/test/[<Class>/]...files
      explicit splits: used whenever both `train/` and `test/` exist.
  <root>/[<Class>/]...files
      a held-out fraction of the files (chosen by a stable hash of the
      relative path) becomes 'test', the rest 'train'.

Class labels come from the immediate sub-folders (of the root, or of
train/ and test/): if any sub-folder holds media files, each sub-folder is a
class (files are found recursively below it) and media files lying directly
in the root are not used (they are reported as skipped). Otherwise the data
set is unlabelled and the media files directly in the root are used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def stable_hash01(text: str) -> float:
  """A number in [0, 1) that depends only on `text` (not on PYTHONHASHSEED)."""
  digest = hashlib.sha1(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def short_hash(*parts) -> str:
  """An 8-hex-digit fingerprint of `parts` (for builder config names)."""
  return hashlib.sha1(repr(parts).encode('utf-8')).hexdigest()[:8]


def _media_below(folder: Path, extensions, recursive: bool) -> list[Path]:
  pattern = folder.rglob('*') if recursive else folder.iterdir()
  return sorted(p for p in pattern
                if p.is_file() and p.suffix.lower() in extensions)


def scan_folder(root, extensions) -> tuple[list[str], list[str] | None, list[str]]:
  """Lists media files below `root` (one split's folder).

  Returns:
    files: relative paths ('Class/sub/x.mp4' or 'x.mp4'), sorted.
    class_names: sorted immediate sub-folder names that hold media, or None
      when the folder is unlabelled.
    stray: relative paths of media files ignored because they sit in the
      root of a class-labelled folder.
  """
  root = Path(root)
  subdirs = sorted(d for d in root.iterdir() if d.is_dir())
  per_class = {d.name: _media_below(d, extensions, recursive=True) for d in subdirs}
  per_class = {name: paths for name, paths in per_class.items() if paths}
  top_level = _media_below(root, extensions, recursive=False)
  rel = lambda p: p.relative_to(root).as_posix()
  if not per_class:
    return [rel(p) for p in top_level], None, []
  files = [rel(p) for paths in per_class.values() for p in paths]
  return sorted(files), sorted(per_class), [rel(p) for p in top_level]


def holdout_split(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
  """Splits relative paths into (train, test) by a stable hash of each path.

  A file is held out when stable_hash01(path) < fraction, so adding or
  removing other files never moves a file between splits. With >= 2 files
  both splits get at least one file (the lowest-hash file goes to test, or
  the highest-hash one to train, when the hash left a split empty).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'data.holdout_fraction must be in [0, 1], got {fraction}')
  ranked = sorted(files, key=stable_hash01)
  n_test = sum(stable_hash01(f) < fraction for f in ranked)
  if len(ranked) >= 2:
    n_test = min(max(n_test, 1), len(ranked) - 1)
  test, train = ranked[:n_test], ranked[n_test:]
  return sorted(train), sorted(test)


def _labelled(files: list[str], class_names: list[str] | None, prefix: str = ''):
  """[(prefix + relpath, label or None)]; the label is the class folder's index."""
  label = lambda f: None if class_names is None else class_names.index(f.split('/')[0])
  return [(prefix + f, label(f)) for f in files]


def folder_splits(root, extensions, holdout_fraction: float):
  """Files per split for a video_folder / image_folder source (see module doc).

  Returns:
    splits: {'train': [(relpath, label), ...], 'test': [...]}; relpath is
      relative to root (so it starts with 'train/' or 'test/' in the explicit
      layout); label is an int class index, or None when unlabelled.
    class_names: sorted list of class names, or None (unlabelled).
    stray: media files that are not used (root files of a labelled folder).
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'Source folder {root} does not exist (data.manual_dir).')
  if (root / 'train').is_dir() and (root / 'test').is_dir():
    scans = {split: scan_folder(root / split, extensions) for split in ('train', 'test')}
    labelled = {split: names is not None for split, (_, names, _) in scans.items()}
    if labelled['train'] != labelled['test']:
      raise ValueError(f'{root}: train/ and test/ must both use class sub-folders '
                       'or both hold files directly.')
    class_names = None
    if labelled['train']:
      class_names = sorted({n for _, names, _ in scans.values() for n in names})
    splits = {split: _labelled(files, class_names, prefix=f'{split}/')
              for split, (files, _, _) in scans.items()}
    stray = [f'{split}/{f}' for split, (_, _, ign) in scans.items() for f in ign]
    return splits, class_names, stray
  files, class_names, stray = scan_folder(root, extensions)
  train, test = holdout_split(files, holdout_fraction)
  splits = {'train': _labelled(train, class_names), 'test': _labelled(test, class_names)}
  return splits, class_names, stray


# ----------------------------------------------------------------------------
# UCF-101 official layout.
# ----------------------------------------------------------------------------

UCF_VIDEO_DIR = 'UCF-101'
UCF_LIST_DIR = 'ucfTrainTestlist'


def _require(path: Path, what: str) -> Path:
  if not path.exists():
    raise FileNotFoundError(
        f'UCF-101: expected {what} at {path}. Unpack UCF101.rar and '
        'UCF101TrainTestSplits-RecognitionTask.zip into data.manual_dir so '
        f'that it holds {UCF_VIDEO_DIR}/<Class>/v_*.avi and '
        f'{UCF_LIST_DIR}/{{classInd,trainlist0N,testlist0N}}.txt.')
  return path


def ucf_class_names(manual_dir) -> list[str]:
  """The 101 class names in classInd.txt order ('1 ApplyEyeMakeup' -> label 0)."""
  path = _require(Path(manual_dir) / UCF_LIST_DIR / 'classInd.txt', 'the class list')
  entries = []
  for line in path.read_text().splitlines():
    if line.strip():
      index, name = line.split()
      entries.append((int(index), name))
  return [name for _, name in sorted(entries)]


def ucf_split_files(manual_dir, fold: int) -> dict[str, list[str]]:
  """{'train': [...], 'test': [...]} paths relative to <manual_dir>/UCF-101.

  trainlist lines are 'Class/v_Class_g08_c01.avi 1'; testlist lines carry no
  label. Labels are derived from the class folder (see ucf_label).
  """
  if fold not in (1, 2, 3):
    raise ValueError(f'data.ucf_fold must be 1, 2 or 3, got {fold}')
  manual_dir = Path(manual_dir)
  _require(manual_dir / UCF_VIDEO_DIR, 'the video folder')
  splits = {}
  for split, stem in (('train', 'trainlist'), ('test', 'testlist')):
    path = _require(manual_dir / UCF_LIST_DIR / f'{stem}{fold:02d}.txt',
                    f'the official {split} list of fold {fold}')
    splits[split] = [line.split()[0] for line in path.read_text().splitlines()
                     if line.strip()]
  return splits


def ucf_label(relpath: str, class_names: list[str]) -> int:
  """Label of 'Class/v_....avi'; case-insensitive because the official files
  disagree on case for one class (HandstandPushups vs HandStandPushups)."""
  lower = [name.lower() for name in class_names]
  return lower.index(relpath.split('/')[0].lower())


def find_case_insensitive(root: Path, relpath: str) -> Path | None:
  """root/relpath if it exists, else a case-insensitive match, else None."""
  path = root / relpath
  if path.exists():
    return path
  folder = root
  for part in relpath.split('/'):
    if not folder.is_dir():
      return None
    matches = [c for c in os.listdir(folder) if c.lower() == part.lower()]
    if not matches:
      return None
    folder = folder / matches[0]
  return folder
