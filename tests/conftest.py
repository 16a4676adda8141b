"""Test set-up: 8 simulated CPU devices (as multi-device tests need) before JAX starts."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

# grain workers and absl-flag-reading code need parsed flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
