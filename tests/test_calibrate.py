"""Calibration: exact population statistics, upstream layers first; the CLI writes a brn checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brn_cli.cli.app import main
from brn_cli.errors import BrnError
from brn_cli.evaluation.calibrate import calibrate
from brn_cli.nn.layer import BatchRenorm2d
from brn_cli.storage.checkpoint import load_checkpoint


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64).float() * 3 + 2
    return x, [(x[i : i + 12], torch.zeros(12, dtype=torch.long)) for i in range(0, n, 12)]


def _pop(h: torch.Tensor):
    h = h.double()
    return h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)


def test_conv_bn_gets_exact_population_stats():
    torch.manual_seed(0)
    x, loader = _data()
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Dropout(0.5), nn.Flatten())
    shifts = calibrate(model, loader, num_batches=4)
    with torch.no_grad():
        mean, var = _pop(model[0](x))
    assert torch.allclose(model[1].running_mean.double(), mean, atol=1e-6, rtol=1e-6)
    assert torch.allclose(model[1].running_var.double(), var, atol=1e-6, rtol=1e-6)
    assert len(shifts) == 1 and shifts[0].name == "1" and shifts[0].examples == 48
    assert shifts[0].mean_shift == pytest.approx(float(mean.abs().max()), rel=1e-5)  # old mu was 0
    assert model.training  # flags restored


def test_chain_second_layer_measured_after_first_is_calibrated():
    torch.manual_seed(1)
    x, loader = _data()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchRenorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    model[1].running_mean.fill_(5.0)  # stale statistics that calibration must not use downstream
    model.eval()
    calibrate(model, loader, num_batches=4)
    with torch.no_grad():
        h1 = model[0](x)
        m1, v1 = _pop(h1)
        assert torch.allclose(model[1].running_mean.double(), m1, atol=1e-6)
        assert torch.allclose(model[1].running_var.double(), v1, atol=1e-6, rtol=1e-6)
        h2 = model[3](model[2](model[1](h1)))  # eval mode: uses the calibrated first layer
        m2, v2 = _pop(h2)
    assert torch.allclose(model[4].running_mean.double(), m2, atol=1e-6)
    assert torch.allclose(model[4].running_var.double(), v2, atol=1e-6, rtol=1e-6)
    assert not model.training


def test_only_the_first_n_batches_count_and_bad_input():
    x, loader = _data()
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    calibrate(model, loader, num_batches=2)
    with torch.no_grad():
        mean, _ = _pop(model[0](x[:24]))
    assert torch.allclose(model[1].running_mean.double(), mean, atol=1e-6)
    with pytest.raises(BrnError, match="no BatchNorm"):
        calibrate(nn.Linear(2, 2), loader, num_batches=1)
    with pytest.raises(BrnError, match="`num_batches`"):
        calibrate(model, loader, num_batches=0)
    shuffled = iter(range(10**6))

    class Changing:
        def __iter__(self):
            k = next(shuffled)
            return iter([(x[k % 4 : k % 4 + 12], None)])

    with pytest.raises(BrnError, match="different batches"):
        calibrate(model, Changing(), num_batches=1)


def test_cli_calibrate_writes_brn_checkpoint(tmp_path, capsys):
    g = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=g.integers(0, 256, (64, 1, 4, 4), dtype=np.uint8), y_train=np.arange(64) % 4)
    model = _toy()
    src = tmp_path / "m.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "cal.pt"
    arch = ["--arch", "tests.test_calibrate:_toy"]
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "calibrate",
                str(src),
                "--data",
                str(data),
                "-o",
                str(out),
                "--batches",
                "3",
                "--batch-size",
                "16",
                *arch,
            ]
        )
    assert exit_info.value.code == 0, capsys.readouterr().err
    ckpt = load_checkpoint(out, arch="tests.test_calibrate:_toy")
    assert ckpt.provenance["command"] == "calibrate"
    assert torch.load(out, weights_only=True)["arch"]["spec"] == "tests.test_calibrate:_toy"
    assert not torch.equal(ckpt.model[2].running_var, torch.ones(8))
    # Existing output without --force: refused, file untouched.
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(src), "--data", str(data), "-o", str(out), *arch])
    assert exit_info.value.code != 0 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def _toy() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def test_cli_calibrate_gray_image_folder_takes_the_models_channels(tmp_path, run_cli):
    """Image folders used to load as RGB whatever the model; a 1-channel model failed mid-run."""
    from test_data import _write_gray_digits, tiny_gray

    _write_gray_digits(tmp_path / "data", count=8)
    torch.save(tiny_gray().state_dict(), tmp_path / "m.pt")
    common = ["--data", tmp_path / "data", "--arch", "test_data:tiny_gray", "--batch-size", "4"]
    out = tmp_path / "cal.pt"
    result = run_cli("calibrate", tmp_path / "m.pt", *common, "-o", out, "--json")
    assert result.code == 0, result.err
    assert not torch.equal(
        load_checkpoint(out, arch="test_data:tiny_gray").model[1].running_var, torch.ones(4)
    )
    refused = tmp_path / "refused.pt"
    result = run_cli("calibrate", tmp_path / "m.pt", *common, "-o", refused, "--channels", "3")
    assert result.code == 2 and result.err_lines == [
        f"brn: error: {tmp_path / 'data'}: the examples have 3 channels but the model's first layer (0) takes 1 "
        "(pass --channels 1)"
    ]
    assert not refused.exists()
