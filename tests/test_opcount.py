"""Operations dispatched per training step: the renorm layer's per-channel bookkeeping against nn.BatchNorm.

Counts, not clocks: every dispatched operation costs fixed CPU overhead and, on a GPU, one kernel launch,
so the count decides small layers' speed and is deterministic enough to assert.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brn_cli.nn.layer import BatchRenorm2d
from brn_cli.nn.opcount import count_layer_step, count_renorm_vs_batchnorm

# Eager CPU target: the renorm forward at most this many operations above BatchNorm's; the backward adds
# only dgamma = r * dw' + d * db' (two operations) to BatchNorm's own backward.
FORWARD_EXTRA = 10
BACKWARD_EXTRA = 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(256, 512), (8, 16, 14, 14), (2, 3, 4, 5, 6)])
def test_eager_cpu_step_is_within_target_of_batchnorm(shape, dtype):
    counts = count_renorm_vs_batchnorm(shape, dtype=dtype)
    bn, brn = counts["batchnorm"], counts["renorm"]
    assert bn.forward > 0 and bn.backward > 0
    assert brn.forward <= bn.forward + FORWARD_EXTRA, brn.forward_ops
    assert brn.backward <= bn.backward + BACKWARD_EXTRA, brn.backward_ops


def test_mixed_precision_input_costs_no_more_than_fp32():
    """Autocast gives the layer bf16 activations with fp32 parameters and buffers: statistics in fp32,
    no conversions or scratch allocations beyond the fp32 path. (A module converted to bf16 as a whole
    pays conversions of its parameters and buffers to fp32 and back on top.)"""
    x = torch.randn(8, 16, 14, 14)
    fp32 = count_layer_step(BatchRenorm2d(16, rmax=3.0, dmax=5.0), x)
    mixed = count_layer_step(BatchRenorm2d(16, rmax=3.0, dmax=5.0), x.bfloat16())
    assert mixed.forward == fp32.forward and mixed.backward == fp32.backward, mixed.forward_ops


def test_count_does_not_grow_with_channels_or_memory_format():
    """The per-channel work is a fixed number of vector operations, whatever C or the layout."""
    small = count_layer_step(BatchRenorm2d(3, rmax=2.0, dmax=1.0), torch.randn(4, 3, 5, 5))
    wide = count_layer_step(BatchRenorm2d(640, rmax=2.0, dmax=1.0), torch.randn(2, 640, 3, 3))
    nhwc = count_layer_step(
        BatchRenorm2d(64, rmax=2.0, dmax=1.0),
        torch.randn(4, 64, 6, 6).contiguous(memory_format=torch.channels_last),
    )
    assert small.forward == wide.forward == nhwc.forward
    assert small.backward == wide.backward == nhwc.backward


def test_training_step_never_synchronises_with_the_host():
    """A host sync (.item(), bool(tensor), .tolist()) appears as aten._local_scalar_dense."""
    counts = count_renorm_vs_batchnorm((16, 32), rmax=1.5, dmax=0.5)["renorm"]
    ops = {**counts.forward_ops, **counts.backward_ops}
    assert "aten._local_scalar_dense" not in ops and "aten.item" not in ops


def test_counter_counts_each_dispatched_operation():
    class Affine(nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    count = count_layer_step(Affine(), torch.randn(3, 4))
    assert count.forward_ops == {"aten.mul": 1, "aten.add": 1} and count.forward == 2
    assert count.backward_ops.get("aten.mul", 0) == 1  # d(2x)/dx = 2 * grad


def test_bench_reports_op_counts_for_fp32_and_autocast_activations():
    from brn_cli.recipes.bench import bench_ops, benchmarks_markdown, machine_info

    rows = bench_ops([(32, 8)])
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        assert r["renorm"][0] <= r["batchnorm"][0] + FORWARD_EXTRA
        assert r["renorm"][0] == sum(r["renorm_forward_ops"].values())
    table = benchmarks_markdown({"machine": machine_info(), "device": "cpu", "ops": rows})
    assert f"| {rows[0]['batchnorm'][0]} / {rows[0]['batchnorm'][1]} | {rows[0]['renorm'][0]} / " in table
