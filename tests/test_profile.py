"""The profile breakdown (vitok/core/profile.py): HLO instructions assigned to the named parts,
trace events summed per instruction, and a real traced step split by part."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.profiler import ProfileData

from vitok.core import profile


def attention_like(x, w):
  """A step with the parts the model code names: a projection (plain matmul), RoPE-like
  elementwise work, and a scaled-dot-product attention core."""
  h = x @ w
  with jax.named_scope('rope'):
    h = h * jnp.cos(jnp.arange(h.shape[-1], dtype=h.dtype))
  with jax.named_scope('attention_core'):
    y = jax.nn.dot_product_attention(h[None, :, None], h[None, :, None], h[None, :, None])[0, :, 0]
  return jnp.sum(y**2)


def compiled_grad(length=256, width=64):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((length, width)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((width, width)), jnp.float32) / 8
  step = jax.jit(jax.grad(attention_like, argnums=1))
  return step, step.lower(x, w).compile(), (x, w)


def test_classify_assigns_every_dot_by_its_scope():
  _, compiled, _ = compiled_grad()
  text = compiled.as_text()
  parts = profile.classify(text)
  instructions = profile.parse_hlo(text)
  dots = {n: i for n, i in instructions.items() if i['opcode'] == 'dot'}
  assert len(dots) >= 6  # forward and backward of the projection and of both attention matmuls
  for name, info in dots.items():
    expected = 'attention' if 'attention_core' in info['op_name'] else 'matmul'
    assert parts[name] == expected, (name, info['op_name'])
  # Backward ops keep the scope: the attention's transposed matmuls are attention too.
  assert any('transpose' in i['op_name'] and parts[n] == 'attention' for n, i in dots.items())
  # Whatever runs a fusion whose body holds a scoped op gets the scope's part.
  callers = {n: parts[n] for n, i in instructions.items() if i['opcode'] == 'fusion' and i['calls']}
  assert 'attention' in callers.values()


def test_op_times_reads_gpu_kernels_by_their_hlo_op_and_skips_host_launches(tmp_path):
  """A GPU trace's kernels carry the instruction in an `hlo_op` stat; the host plane's events
  of the same names are launches and must not be counted as well."""
  text = """
  planes { id: 1 name: "/device:GPU:0"
    lines { id: 1 name: "Stream #7" timestamp_ns: 0
      events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000 stats { metadata_id: 1 str_value: "fusion.1" } }
      events { metadata_id: 2 offset_ps: 3000000 duration_ps: 1000000 stats { metadata_id: 1 str_value: "dot.2" } }
      events { metadata_id: 1 offset_ps: 5000000 duration_ps: 4000000 stats { metadata_id: 1 str_value: "fusion.1" } }
      events { metadata_id: 3 offset_ps: 9000000 duration_ps: 7000000 }
    }
    event_metadata { key: 1 value { id: 1 name: "loop_fusion_kernel" } }
    event_metadata { key: 2 value { id: 2 name: "sm90_xmma_gemm" } }
    event_metadata { key: 3 value { id: 3 name: "memcpy" } }
    stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
  }
  planes { id: 2 name: "/host:CPU"
    lines { id: 1 name: "launcher" timestamp_ns: 0
      events { metadata_id: 1 offset_ps: 0 duration_ps: 50000000 }
    }
    event_metadata { key: 1 value { id: 1 name: "fusion.1" } }
  }
  """
  run = tmp_path / 'plugins' / 'profile' / 'run'
  os.makedirs(run)
  (run / 'host.xplane.pb').write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
  times = profile.op_times(str(tmp_path), {'fusion.1', 'dot.2'})
  assert times == pytest.approx({'fusion.1': 6e-6, 'dot.2': 1e-6})


def test_step_breakdown_of_a_traced_cpu_step():
  """On CPU the worker threads' thunk events name the instructions: a traced step whose work is
  mostly its 2048 x 2048 attention is mostly attention, and the parts add up to the whole."""
  step, compiled, args = compiled_grad(length=2048, width=64)
  step(*args).block_until_ready()
  result = profile.step_breakdown(lambda: step(*args).block_until_ready(), compiled.as_text(), 2)
  shares = result['share']
  assert set(shares) == {'attention', 'matmul', 'rope', 'lpips', 'optimizer', 'other'}
  assert sum(shares.values()) == pytest.approx(1.0)
  assert result['traced_s_per_step'] > 0
  assert shares['attention'] > 0.5, shares  # 2 x 2048^2 x 64 MACs each way vs 2048 x 64^2
  assert shares['matmul'] > 0 and shares['lpips'] == shares['optimizer'] == 0
