"""Every speed comparison of issue 5, printed as the markdown tables docs/benchmarks.md records.

    python benchmarks/bench_all.py                      # CPU, 1 thread: layer sweep, ResNet steps, ONNX, torchrl
    python benchmarks/bench_all.py --device cuda        # the same on a GPU (layer and model timings synchronized)
    python benchmarks/bench_all.py --what models --json out.json

Same code as `brn bench` (brn_cli.recipes.bench.run_benchmarks). torchrl is measured only when it imports; do not
install it into the project's environment (it may pull another torch): use a throwaway venv that sees the
project's packages, e.g. a `.pth` file pointing at them, and `pip install --no-deps torchrl tensordict pyvers`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="layer,models,onnx,peer", help="comma-separated parts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)

    import torch

    from brn_cli.nn.device import set_threads
    from brn_cli.recipes.bench import benchmarks_markdown, run_benchmarks

    set_threads(args.threads)
    results = run_benchmarks(
        [w.strip() for w in args.what.split(",") if w.strip()],
        device=torch.device(args.device),
        quick=args.quick,
        progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True),
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(benchmarks_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
