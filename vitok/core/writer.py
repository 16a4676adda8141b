"""Where training numbers go: TensorBoard scalars (tensorboardX, no TensorFlow) and the console."""

from __future__ import annotations

import os

from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str):
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict, prefix: str = '') -> None:
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f'{prefix}{name}', value, step)
    self._tb.flush()

  def log(self, step: int, values: dict, prefix: str = '') -> None:
    """Scalars to TensorBoard plus one readable line in the log."""
    self.scalars(step, values, prefix)
    line = ', '.join(
        f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in values.items()
    )
    logging.info('[%d] %s%s', step, prefix, line)

  def close(self) -> None:
    self._tb.close()
