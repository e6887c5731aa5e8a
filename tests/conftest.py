"""Shared fixtures: running the real `brn` CLI in-process (importing torch once is what makes tests fast)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys) -> Callable[..., CliResult]:
    """Call `brn_cli.cli.app.main(argv)` as the console script would; return exit code, stdout and stderr."""
    from brn_cli.cli.app import DEBUG, main

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        DEBUG["on"] = False
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main() always exits
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread: CPU results then do not depend on the machine's core count, and two
    threads on a shared 2-core machine do not spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shufflenet_bn():
    """torchvision's shufflenet_v2_x0_5 (10 classes, seeded random weights) with non-trivial BatchNorm
    statistics, in eval mode: a real BatchNorm model for the checkpoint and CLI tests.

    Shared by every test in the session: read it (state_dict) or deep-copy it, never change it.
    """
    pytest.importorskip("torchvision", reason="the BatchNorm test model is a torchvision architecture")
    import torch
    from torch import nn

    from brn_cli.storage.checkpoint import build_arch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_arch("torchvision:shufflenet_v2_x0_5", {"num_classes": 10})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Every distributed or science test is also slow, so `-m "not slow"` (the edit loop) leaves it out."""
    for item in items:
        if item.get_closest_marker("distributed") or item.get_closest_marker("science"):
            if not item.get_closest_marker("slow"):
                item.add_marker(pytest.mark.slow)
