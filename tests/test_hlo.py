"""vitok.core.hlo and hlo_cost on hand-written HLO: replica groups in each format XLA prints, the
mesh axes they span, loop trip counts, matmul FLOPs, collective and HBM bytes; the roofline bound
from them. (tests/test_tpu_compile.py checks the same accounting on programs the TPU compiler
wrote.)"""

import numpy as np
import pytest

from vitok.core import hlo, hlo_cost


def _inst(attrs: str, op: str = 'all-reduce') -> hlo.Instruction:
  return hlo.Instruction('x', op, 'f32[8]{0}', ['a'], '%a', attrs)


@pytest.mark.parametrize(
    'attrs, groups',
    [
        ('replica_groups={{0,1},{2,3}}, to_apply=%add', [[0, 1], [2, 3]]),
        ('replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add', [[0, 2, 4, 6], [1, 3, 5, 7]]),
        ('replica_groups={}, to_apply=%add', [list(range(8))]),
        # iota: arange(8) reshaped [2,4]: rows are groups.
        ('replica_groups=[2,4]<=[8], to_apply=%add', [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # arange(8).reshape(2,4).T.reshape(4,2)
        ('replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add', [[0, 4], [1, 5], [2, 6], [3, 7]]),
        # mesh axes: devices [0,2,1,3] on a (2,2) mesh, grouped over axis_0 -> columns
        (
            "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, "
            'to_apply=%add',
            [[0, 1], [2, 3]],
        ),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", [list(range(8))]),
        # a sub-axis: the middle 2 of axis_1 (8 = 2 x 2 x 2, pre-size 2): ids differing by 2
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1':(2)2}",
            [[0, 2], [1, 3], [4, 6], [5, 7]],
        ),
        ('source_target_pairs={{0,1},{1,2},{2,3},{3,0}}', [[0, 1], [1, 2], [2, 3], [3, 0]]),
    ],
)
def test_replica_groups_in_every_format(attrs, groups):
  assert hlo.replica_groups(_inst(attrs), 8) == groups


def test_group_axes_are_the_mesh_axes_a_group_varies_along():
  mesh = {'data': 2, 'fsdp': 4}  # device id = 4 * data + fsdp (row-major)
  assert hlo.group_axes([[0, 1, 2, 3], [4, 5, 6, 7]], mesh) == ('fsdp',)
  assert hlo.group_axes([[0, 4], [1, 5], [2, 6], [3, 7]], mesh) == ('data',)
  assert hlo.group_axes([list(range(8))], mesh) == ('data', 'fsdp')
  assert hlo.group_axes([[0, 2], [1, 3], [4, 6], [5, 7]], mesh) == ('fsdp',)


LOOP = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[4,8], f32[8,8])) -> (s32[], f32[4,8], f32[8,8]) {
  %p = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} get-tuple-element(%p), index=2
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %y = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[8,8]{1,0} all-gather(%y), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  ROOT %t = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) tuple(%next, %y, %w)
}

%cond (q: (s32[], f32[4,8], f32[8,8])) -> pred[] {
  %q = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[4,8], b: f32[8,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], f32[4,8]{1,0}, f32[8,8]{1,0}) while(%init), condition=%cond, body=%body
  %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
  ROOT %r = f32[4,8]{1,0} all-reduce(%out), channel_id=2, replica_groups={{0,1}}, to_apply=%add
}
"""


def test_loop_bodies_count_once_per_iteration():
  comps = hlo.parse(LOOP)
  loop = next(i for i in comps['main'].instructions if i.op == 'while')
  assert hlo.trip_count(loop, comps) == 6  # i = 0, 2, ..., 10 < 12
  counts, unknown = hlo.run_counts(comps)
  assert counts['body'] == 6 and counts['main'] == 1 and not unknown
  cost = hlo_cost.analyze(LOOP, {'data': 2})
  assert cost.matmul_flops == 6 * 2 * 4 * 8 * 8
  gathers = [c for c in cost.collectives if c.kind == 'all-gather']
  reduces = [c for c in cost.collectives if c.kind == 'all-reduce']
  assert [(c.times, c.payload_bytes, c.axes) for c in gathers] == [(6, 8 * 8 * 4, ('data',))]
  assert [(c.times, c.payload_bytes) for c in reduces] == [(1, 4 * 8 * 4)]
  # A ring of 2 sends half an all-gather's result and (reduce, then gather) a whole all-reduce.
  assert gathers[0].wire_bytes == 8 * 8 * 4 / 2 and reduces[0].wire_bytes == 4 * 8 * 4
  rows = {r['kind']: r for r in cost.by_kind()}
  assert rows['all-gather']['runs'] == 6 and rows['all-gather']['wire_bytes'] == 6 * 128


def test_a_loop_whose_count_cannot_be_read_is_counted_once_and_named():
  text = LOOP.replace('direction=LT', 'direction=NE')
  cost = hlo_cost.analyze(text, {'data': 2})
  assert cost.loops_without_trip_count == ['loop'] and cost.matmul_flops == 2 * 4 * 8 * 8


def test_arrays_in_on_chip_memory_are_not_hbm_traffic():
  arrays = hlo.parse_arrays('(bf16[128,64]{1,0:T(8,128)(2,1)S(1)}, f32[10]{0}, s4[4]{0})')
  assert [(a.dtype, a.dims, a.on_chip, a.bytes) for a in arrays] == [
      ('bf16', (128, 64), True, 128 * 64 * 2),
      ('f32', (10,), False, 40),
      ('s4', (4,), False, 2),
  ]


ASYNC_SLICES = """
ENTRY %main (p: s8[7077888]) -> s8[7077888] {
  %p = s8[7077888]{0} parameter(0)
  %slice-start.1 = ((s8[7077888]{0}), s8[4194304]{0:T(1024)S(1)}, s32[]{:S(2)}) slice-start(%p), slice={[0:4194304]}
  %slice-done.1 = s8[4194304]{0:T(1024)S(1)} slice-done(%slice-start.1)
  %slice.2 = s8[1000]{0} slice(%p), slice={[0:1000]}
  ROOT %copy = s8[7077888]{0} copy(%p)
}
"""


def test_slices_move_the_piece_they_take_not_the_whole_buffer():
  """The TPU compiler prefetches pieces of a buffer into on-chip memory with asynchronous
  slice-start / slice-done: one HBM read of the piece (4 MiB), not the 7 MiB buffer and the tuple
  around it; a plain slice reads and writes its piece; the copy reads and writes the buffer."""
  cost = hlo_cost.analyze(ASYNC_SLICES, {'data': 1})
  assert cost.hbm_bytes == 4194304 + 2 * 1000 + 2 * 7077888


def test_convolution_flops_count_the_taps_that_meet_input():
  """A 3x3 'SAME' convolution: the border outputs' windows reach one row / column of padding, so a
  16-wide dimension has 14 x 3 + 2 x 2 = 46 taps on real input, not 16 x 3."""
  lhs, rhs = hlo.parse_arrays('f32[2,16,16,3]{3,2,1,0}')[0], hlo.parse_arrays('f32[3,3,3,8]')[0]
  out = hlo.parse_arrays('f32[2,16,16,8]{3,2,1,0}')[0]
  attrs = ', window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f'
  assert hlo.convolution_flops(attrs, out, lhs, rhs) == 2 * 2 * 8 * 3 * 46 * 46


def test_a_batched_matmul_written_as_a_dilated_convolution_counts_as_the_matmul():
  """How the TPU compiler writes q k^T for 4 x 4 (batch, heads) blocks of 2048 x 32: batch and
  heads as "spatial" dimensions, the input dilated by the window, one tap per window real."""
  lhs = hlo.parse_arrays('bf16[4,4,2048,32]')[0]
  out = hlo.parse_arrays('f32[4,4,2048,2048]')[0]
  attrs = ', window={size=4x4 stride=3x3 lhs_dilate=4x4}, dim_labels=01bf_01oi->01bf'
  assert hlo.convolution_flops(attrs, out, lhs, lhs) == 2 * 4 * 4 * 2048 * 2048 * 32
  # x (4, 2048, 128) . w (128, 3, 4, 32): size-1 dims padded out to 3 and 4, one real tap each.
  lhs = hlo.parse_arrays('f32[4,2048,128,1,1]')[0]
  rhs = hlo.parse_arrays('f32[128,3,4,32,1]')[0]
  out = hlo.parse_arrays('f32[4,2048,3,4,32]')[0]
  attrs = ', window={size=1x3x4 pad=0_0x2_2x3_3 rhs_reversal=0x1x1}, dim_labels=0bf12_i12o0->0b12f'
  assert hlo.convolution_flops(attrs, out, lhs, rhs) == 2 * 4 * 2048 * 128 * 3 * 4 * 32


def test_attention_kernels_without_a_cost_estimate_count_their_matmuls():
  """Flash attention's kernels over (heads, L, d) blocks: the forward pass 2 matmuls of L x L x d,
  the dq kernel 3, the dkv kernel 4 (recomputing the scores); other kernels are not guessed."""
  comp = hlo.Computation('c', False, [], {'q': 'bf16[2,4,256,32]{3,2,1,0}', 'm': 's8[1,2,2]'})
  kernel = lambda name: hlo.Instruction(name, 'custom-call', 'bf16[2,4,256,32]', ['m', 'q'], '', '')
  per_matmul = 2 * 2 * 4 * 256 * 256 * 32
  assert hlo.attention_kernel_flops(kernel('splash_mha_fwd_residuals.4'), comp) == 2 * per_matmul
  assert hlo.attention_kernel_flops(kernel('splash_mha_dq_no_residuals.1'), comp) == 3 * per_matmul
  assert hlo.attention_kernel_flops(kernel('splash_mha_dkv_no_residuals.1'), comp) == 4 * per_matmul
  assert hlo.attention_kernel_flops(kernel('my_kernel.1'), comp) is None


def test_the_bound_and_the_collectives_the_schedule_leaves_exposed():
  """v5p: 459 TFLOP/s, 2765 GB/s, 100 GB/s per link each way; on CPU devices (no torus
  coordinates) a group spans one link. 4.59 TFLOP = 10 ms, 13.825 GB = 5 ms; an all-reduce of
  100 MB over 2 devices sends 100 MB = 0.5 ms over 2 x 100 GB/s, overlapped or not."""
  import jax
  from jax.sharding import Mesh

  from vitok.core import roofline, topology

  def collective(overlapped: bool) -> hlo_cost.Collective:
    return hlo_cost.Collective(
        'all-reduce', ('data',), 2, 1e8, 1.0, overlapped, False, (1,), 'f32', 'psum', 'x'
    )

  cost = hlo_cost.ProgramCost(4.59e12, 0.0, 13.825e9, [collective(True), collective(False)], [], [])
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  bound = roofline.bound_seconds(cost, topology.CHIPS['v5p'], mesh)
  assert bound['bound_by'] == 'compute' and bound['bound_s'] == pytest.approx(0.010)
  assert bound['hbm_s'] == pytest.approx(0.005) and bound['ici_s'] == pytest.approx(0.001)
  assert bound['exposed_collectives_s'] == pytest.approx(0.0005)
  assert bound['exposed_estimate_s'] == pytest.approx(0.0105)
