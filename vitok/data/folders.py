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
class (files are found recursively below it). Otherwise the data set is
unlabelled and the media files directly in the root are used. Media files both
directly in the root and in sub-folders is an error (DataError): either would
silently drop the other.

Every path below the root is either used or reported with its reason (see
`Scan.skipped`): files with other extensions, hidden files and folders (names
starting with '.', and __MACOSX/, e.g. the '._x.mp4' files of Mac archives),
folders named like media files, broken symbolic links, unreadable or empty
folders. A symbolic link to a folder is followed when it leads out of the
source folder (once per target); a link to a folder inside it is reported,
since that folder's files are used where they are. File names need not be
UTF-8: they are hashed as the bytes on disk and shown with `display_name`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from vitok.data import DataError


def display_name(relpath: str) -> str:
  """`relpath` as printable UTF-8. Bytes of a name that are not UTF-8 (Python holds them as
  surrogate escapes) appear as \\xNN, so logs, dataset keys and metadata never fail on them; the
  file itself is still opened by its real name."""
  return relpath.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def stable_hash01(text: str) -> float:
  """A number in [0, 1) that depends only on `text` (its bytes on disk; not on PYTHONHASHSEED)."""
  digest = hashlib.sha1(text.encode('utf-8', 'surrogateescape')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def short_hash(*parts) -> str:
  """An 8-hex-digit fingerprint of `parts` (for builder config names)."""
  return hashlib.sha1(repr(parts).encode('utf-8')).hexdigest()[:8]


@dataclasses.dataclass
class Scan:
  """What is below one split's folder."""

  files: list[str]  # relative paths of the media files used, sorted
  class_names: list[str] | None  # sorted sub-folder names that hold media; None: unlabelled
  skipped: list[tuple[str, str]]  # (relative path, reason) of every other path


class _Walker:
  """Lists the media files below a root and records everything else as skipped."""

  def __init__(self, root: Path, extensions, kind: str):
    self.root, self.extensions, self.kind = root, extensions, kind
    self.skipped: list[tuple[str, str]] = []
    self._real_root = os.path.realpath(root)
    self._followed: set[str] = set()

  def rel(self, path: Path) -> str:
    return path.relative_to(self.root).as_posix()

  def skip(self, path: Path, reason: str) -> None:
    self.skipped.append((self.rel(path), reason))

  def entries(self, folder: Path) -> tuple[list[Path], list[Path]]:
    """(media files, sub-folders) directly in `folder`; anything else is skipped with its reason."""
    try:
      listing = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
      self.skip(folder, f'unreadable folder ({e.strerror})')
      return [], []
    if not listing and folder != self.root:
      self.skip(folder, 'an empty folder')
    media, folders = [], []
    for entry in listing:
      path = Path(entry.path)
      named_like_media = path.suffix.lower() in self.extensions
      if entry.name.startswith('.') or entry.name == '__MACOSX':
        self.skip(path, 'hidden')
      elif entry.is_symlink() and not path.exists():
        self.skip(path, 'broken symbolic link')
      elif entry.is_dir():
        if named_like_media:
          self.skip(path, f'a folder named like a {self.kind} file')
        elif not entry.is_symlink() or self._follow(path):
          folders.append(path)
      elif not entry.is_file():
        self.skip(path, 'not a regular file')
      elif named_like_media:
        media.append(path)
      else:
        self.skip(path, f'not a {self.kind} file ({path.suffix or "no extension"})')
    return media, folders

  def _follow(self, link: Path) -> bool:
    """Whether to scan the folder a symbolic link leads to (else it is reported): only out of the
    source folder, once per target, and never to a folder that holds the source folder."""
    target = os.path.realpath(link)
    inside = lambda path, folder: path == folder or path.startswith(folder + os.sep)
    if inside(target, self._real_root):
      self.skip(link, 'a symbolic link to a folder inside the source folder (used there)')
    elif inside(self._real_root, target):
      self.skip(link, 'a symbolic link to a folder that holds the source folder (a loop)')
    elif target in self._followed:
      self.skip(link, 'a second symbolic link to the same folder')
    else:
      self._followed.add(target)
      return True
    return False

  def media_below(self, folder: Path) -> list[Path]:
    media, folders = self.entries(folder)
    for sub in folders:
      media += self.media_below(sub)
    return media


def scan_folder(root, extensions, kind: str = 'media') -> Scan:
  """Lists one split's folder `root` (see the module doc)."""
  root = Path(root)
  walker = _Walker(root, extensions, kind)
  top_level, subfolders = walker.entries(root)
  per_class = {sub.name: walker.media_below(sub) for sub in subfolders}
  labelled = {name: found for name, found in per_class.items() if found}
  if not labelled:
    return Scan(sorted(walker.rel(p) for p in top_level), None, walker.skipped)
  if top_level:
    raise DataError(
        f'{root} holds {kind} files both directly ({len(top_level)}, e.g. {top_level[0].name}) '
        f'and in sub-folders ({", ".join(sorted(labelled)[:5])}), which would be classes: move '
        f'them all into class sub-folders, or out of the sub-folders (see data.manual_dir)'
    )
  files = sorted(walker.rel(p) for found in labelled.values() for p in found)
  return Scan(files, sorted(labelled), walker.skipped)


def holdout_split(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
  """Splits relative paths into (train, test) by a stable hash of each path.

  A file is held out when stable_hash01(path) < fraction, so adding or
  removing other files never moves a file between splits. With >= 2 files
  both splits get at least one file (the lowest-hash file goes to test, or
  the highest-hash one to train, when the hash left a split empty).
  """
  if not 0.0 <= fraction <= 1.0:
    raise DataError(f'data.holdout_fraction must be in [0, 1], got {fraction}')
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


def folder_splits(root, extensions, holdout_fraction: float, kind: str = 'media'):
  """Files per split for a video_folder / image_folder source (see module doc).

  Returns:
    splits: {'train': [(relpath, label), ...], 'test': [...]}; relpath is
      relative to root (so it starts with 'train/' or 'test/' in the explicit
      layout); label is an int class index, or None when unlabelled.
    class_names: sorted list of class names, or None (unlabelled).
    skipped: [(relpath, reason)] for every other path below root.
  """
  root = Path(root)
  if not root.is_dir():
    raise DataError(f'Source folder {root} does not exist (data.manual_dir).')
  if (root / 'train').is_dir() and (root / 'test').is_dir():
    scans = {split: scan_folder(root / split, extensions, kind) for split in ('train', 'test')}
    labelled = {split: scan.class_names is not None for split, scan in scans.items()}
    if labelled['train'] != labelled['test']:
      raise DataError(
          f'{root}: train/ and test/ must both use class sub-folders '
          'or both hold files directly.'
      )
    class_names = None
    if labelled['train']:
      class_names = sorted({n for scan in scans.values() for n in scan.class_names})
    splits = {
        split: _labelled(scan.files, class_names, prefix=f'{split}/')
        for split, scan in scans.items()
    }
    skipped = [
        (f'{split}/{path}', reason)
        for split, scan in scans.items()
        for path, reason in scan.skipped
    ]
    others = [e for e in sorted(os.listdir(root)) if e not in ('train', 'test')]
    skipped += [(e, 'outside train/ and test/') for e in others]
    return splits, class_names, skipped
  scan = scan_folder(root, extensions, kind)
  train, test = holdout_split(scan.files, holdout_fraction)
  splits = {'train': _labelled(train, scan.class_names), 'test': _labelled(test, scan.class_names)}
  return splits, scan.class_names, scan.skipped


# ----------------------------------------------------------------------------
# UCF-101 official layout.
# ----------------------------------------------------------------------------

UCF_VIDEO_DIR = 'UCF-101'
UCF_LIST_DIR = 'ucfTrainTestlist'


def _require(path: Path, what: str) -> Path:
  if not path.exists():
    raise DataError(
        f'UCF-101: expected {what} at {path}. Unpack UCF101.rar and '
        'UCF101TrainTestSplits-RecognitionTask.zip into data.manual_dir so '
        f'that it holds {UCF_VIDEO_DIR}/<Class>/v_*.avi and '
        f'{UCF_LIST_DIR}/{{classInd,trainlist0N,testlist0N}}.txt.'
    )
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
    raise DataError(f'data.ucf_fold must be 1, 2 or 3, got {fold}')
  manual_dir = Path(manual_dir)
  _require(manual_dir / UCF_VIDEO_DIR, 'the video folder')
  splits = {}
  for split, stem in (('train', 'trainlist'), ('test', 'testlist')):
    path = _require(
        manual_dir / UCF_LIST_DIR / f'{stem}{fold:02d}.txt',
        f'the official {split} list of fold {fold}',
    )
    splits[split] = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
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
