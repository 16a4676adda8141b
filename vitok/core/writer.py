"""Where training numbers go: TensorBoard scalars (tensorboardX, no TensorFlow) and the console."""

from __future__ import annotations

import os

from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str):
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict, prefix: str = '') -> None:
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f'{prefix}{name}', value, step)
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()
