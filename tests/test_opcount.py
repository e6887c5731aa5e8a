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


# Compiled steps: what one torch.compile'd training step launches (generated kernels + operations that still
# reach the dispatcher, an opaque custom op counted as the operations it runs). Target for the fused paths:
# at most 3 launches above compiled BatchNorm in the forward and 1 in the backward.
COMPILED_FORWARD_EXTRA = 3
COMPILED_BACKWARD_EXTRA = 1


@pytest.mark.slow
def test_compiled_step_is_within_target_of_compiled_batchnorm():
    from brn_cli.nn.opcount import count_compiled_renorm_vs_batchnorm

    counts = count_compiled_renorm_vs_batchnorm((8, 16, 14, 14))
    bn, brn = counts["batchnorm"], counts["renorm"]
    assert bn.forward_kernels >= 1 and bn.backward_kernels >= 1
    assert brn.forward <= bn.forward + COMPILED_FORWARD_EXTRA, brn
    assert brn.backward <= bn.backward + COMPILED_BACKWARD_EXTRA, brn
    # The one opaque op copies the moving averages (r and d are computed from the copy); its inside is counted.
    assert brn.forward_opaque == {"brn.running_snapshot": 1} and brn.forward_ops == {"aten.stack": 1}
    assert not brn.backward_opaque and brn.backward_ops == bn.backward_ops


@pytest.mark.slow
def test_compiled_counter_sees_generated_kernels_and_dispatched_operations():
    """x * 2 + 1 compiles to one fused kernel; an op inductor leaves to the dispatcher (mm) is counted as
    dispatched; a custom op is counted as the operations its body runs."""
    from brn_cli.nn.opcount import count_compiled_step

    class Affine(nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    class MatMul(nn.Module):
        def forward(self, x):
            return torch.ops.brn.running_snapshot(x.detach(), x.detach()).sum(0) @ x.t() @ x

    affine = count_compiled_step(Affine(), torch.randn(3, 4))
    assert (affine.forward_kernels, affine.forward_ops) == (1, {})
    matmul = count_compiled_step(MatMul(), torch.randn(3, 4))
    assert matmul.forward_opaque == {"brn.running_snapshot": 1}
    assert matmul.forward_ops["aten.stack"] == 1 and matmul.forward_ops.get("aten.mm", 0) >= 1


@pytest.mark.slow
def test_bench_compiled_reports_times_and_launches():
    from brn_cli.recipes.bench import benchmarks_markdown, machine_info, run_benchmarks

    results = run_benchmarks(["compiled"], quick=True)
    (row,) = results["compiled"]["layers"]
    bn, brn = row["launches"]["batchnorm"], row["launches"]["renorm"]
    assert row["ms"]["batchnorm"] > 0 and row["ms"]["renorm"] > 0 and row["ratio"] > 0
    assert brn["forward"] <= bn["forward"] + COMPILED_FORWARD_EXTRA
    assert brn["backward"] <= bn["backward"] + COMPILED_BACKWARD_EXTRA
    (crossq,) = results["compiled"]["crossq"]
    assert crossq["compiled"] and crossq["ms"]["renorm"] > 0
    table = benchmarks_markdown({**results, "machine": machine_info()})
    assert f"| 16x32 (cpu, {row['threads']} thread" in table
    assert f"| {bn['forward']} / {bn['backward']} | {brn['forward']} / {brn['backward']} | " in table
    assert "(opaque: brn.running_snapshot x1, counted as the operations it runs)" in table
    assert "thread, compiled) |" in table or "threads, compiled) |" in table
