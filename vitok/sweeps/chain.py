"""The tokenizer -> latents -> DiT chain, defined once for everything that runs it (the demo in one
process, a sweep member as commands): its stages in order, the directory of each under the
chain's root, and the one field that links them (the DiT reads the latents the tokenizer wrote,
and finds the tokenizer through them)."""

from __future__ import annotations

import dataclasses
import os

STAGES = ('tokenizer', 'latents', 'dit')


@dataclasses.dataclass(frozen=True)
class Chain:
  root: str

  def dir(self, stage: str) -> str:
    """ROOT/<stage>: where the stage writes (a training workdir, or the latent cache)."""
    if stage not in STAGES and stage != 'long':
      raise ValueError(f'{stage!r} is not a stage of the chain ({", ".join(STAGES)})')
    return os.path.join(self.root, stage)

  @property
  def dit_fields(self) -> dict[str, str]:
    """The DiT config's fields the chain sets: its latents are the tokenizer's."""
    return {'latents.dir': self.dir('latents')}
