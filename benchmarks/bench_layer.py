"""BatchRenorm2d vs nn.BatchNorm2d, measured side by side in one run.

Prints the training (forward + backward) and eval time ratios renorm / batchnorm and PASS/FAIL against
issue 2's targets (1.10 and 1.02). Timing logic: brn_cli.recipes.bench.bench_layer (interleaved repetitions,
warm-up, medians). Not a test: the numbers depend on the machine and its load.

    python benchmarks/bench_layer.py                       # (32,64,56,56) fp32 NCHW on CPU
    python benchmarks/bench_layer.py --threads 2 --reps 40 --channels-last
    python benchmarks/bench_layer.py --shape 8,32,28,28 --dtype float64
"""

from __future__ import annotations

import argparse
import json

import torch

from brn_cli.recipes.bench import bench_layer

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,56,56", help="input shape N,C,... (default 32,64,56,56)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per contender")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: keep)")
    parser.add_argument("--rmax", type=float, default=3.0)
    parser.add_argument("--dmax", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = [int(s) for s in args.shape.replace("x", ",").split(",") if s]
    res = bench_layer(
        shape,
        dtype=DTYPES[args.dtype],
        channels_last=args.channels_last,
        device=args.device,
        reps=args.reps,
        warmup=args.warmup,
        rmax=args.rmax,
        dmax=args.dmax,
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return
    layout = "channels_last" if res["channels_last"] else "NCHW"
    print(
        f"BatchRenorm vs nn.BatchNorm  shape={res['shape']} {res['dtype']} {layout} device={res['device']} "
        f"torch={res['torch']} threads={res['threads']} reps={res['reps']} warmup={res['warmup']}"
    )
    print(
        f"renorm rmax={res['rmax']:g} dmax={res['dmax']:g}: last step clipped r in "
        f"{res['r_clip_frac']:.0%} and d in {res['d_clip_frac']:.0%} of channels"
    )
    ms = res["ms"]
    for kind in ("train", "eval"):
        label = "train fwd+bwd" if kind == "train" else "eval fwd     "
        ratio, target = res["ratio"][kind], res["target"][kind]
        verdict = "PASS" if res["pass"][kind] else "FAIL"
        print(
            f"{label}  batchnorm {ms[kind + '_batchnorm']:8.3f} ms  renorm {ms[kind + '_renorm']:8.3f} ms  "
            f"ratio {ratio:.3f}  (target <= {target:.2f})  {verdict}"
        )


if __name__ == "__main__":
    main()
