"""Which latent frames a DiT is given clean (W.A.L.T / NUWA-XL conditioning; see dit/diffusion.py
`Known` for how they are used).

Training draws one kind of mask per clip, so one model learns every use it will be put to:

  none     nothing known: plain generation (and the keyframes of a long video)
  prefix   the first k frames known, k uniform in [1, t - 1]: continuation (autoregressive)
  ends     the first and the last frame known: infilling between two keyframes (diffusion over
           diffusion)
  sparse   each frame known with probability 1/2, at least one left unknown: interpolation and
           anything in between
"""

import jax
import jax.numpy as jnp

MODES = ('none', 'prefix', 'ends', 'sparse')


def training_masks(key: jax.Array, batch: int, frames: int, weights) -> jax.Array:
  """(batch, frames) bool: a mask per clip, of the kind drawn with probability proportional to
  `weights` (one per MODES). Every mask leaves at least one frame unknown: with 2 frames 'ends'
  becomes a 1-frame prefix, and with 1 frame every mask is 'none'."""
  mode_key, prefix_key, sparse_key, free_key = jax.random.split(key, 4)
  probabilities = jnp.asarray(weights, jnp.float32)
  mode = jax.random.choice(mode_key, len(MODES), (batch,), p=probabilities / probabilities.sum())
  position = jnp.arange(frames)[None]
  prefix = position < jax.random.randint(prefix_key, (batch, 1), 1, max(frames, 2))
  ends = (position == 0) | (position == frames - 1) if frames > 2 else position < 1
  ends = jnp.broadcast_to(ends, (batch, frames))
  free = jax.random.randint(free_key, (batch, 1), 0, frames)
  sparse = jax.random.bernoulli(sparse_key, 0.5, (batch, frames)) & (position != free)
  masks = jnp.stack([jnp.zeros((batch, frames), bool), prefix, ends, sparse], axis=1)
  chosen = masks[jnp.arange(batch), mode]
  return chosen if frames > 1 else jnp.zeros((batch, frames), bool)
