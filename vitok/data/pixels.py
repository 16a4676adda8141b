"""The pixel convention every model and metric shares: clips are uint8 [0, 255] on disk and in
batches, float in [-1, 1] inside the networks."""

import jax
import jax.numpy as jnp


def to_unit_range(video_uint8: jax.Array) -> jax.Array:
  """uint8 pixels [0, 255] -> float32 in [-1, 1] (the models' input convention)."""
  return video_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(video: jax.Array) -> jax.Array:
  """float in [-1, 1] -> uint8 [0, 255], clipping out-of-range values."""
  return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)
