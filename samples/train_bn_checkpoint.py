"""Train a sample architecture with plain BatchNorm on i.i.d. batches and save its state_dict.

The result is the kind of file users already hold: a plain ``torch.save(model.state_dict())``, loadable
weights-only, with nn.BatchNorm running statistics. Convert it with::

    brn convert OUT.pt --arch brn_cli.samples.models:small_resnet -o brn.pt

Usage::

    python samples/train_bn_checkpoint.py --arch small_resnet --steps 300 -o bn_small_resnet.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brn_cli.errors import BrnError, render_params  # noqa: E402
from brn_cli.samples.models import SAMPLE_ARCHS  # noqa: E402
from brn_cli.storage.atomic import check_writable, write_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_resnet", choices=sorted(SAMPLE_ARCHS))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="i.i.d. minibatch size (default 32)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, decayed linearly to 0")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="where to write the state_dict")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    return parser.parse_args(argv)


def _as_flag(name: str, value: str | None) -> str:
    """A parameter named in a library message, as this script's flag (argparse: --name-with-dashes)."""
    flag = "--" + name.replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {value}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_writable(args.output, force=args.force)  # fail before training, not after
        import torch

        from brn_cli.cli.progress import progress_if
        from brn_cli.recipes.pretrain import pretrain_batchnorm

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, metrics = pretrain_batchnorm(
            args.arch,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=progress_if(sys.stderr.isatty()),
        )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_atomic(args.output, lambda tmp: torch.save(state, tmp), force=args.force)
    except BrnError as exc:
        print(f"error: {render_params(str(exc), _as_flag)}", file=sys.stderr)
        return exc.exit_code
    print(
        f"{args.arch}: {metrics['steps']} steps of batch {metrics['batch_size']} in {metrics['seconds']:.1f} s "
        f"({torch.get_num_threads()} threads); inference-mode accuracy train {metrics['train_accuracy']:.2%}, "
        f"val {metrics['val_accuracy']:.2%} (val loss {metrics['val_loss']:.3f})"
    )
    print(f"wrote {args.output} (plain state_dict; arch spec brn_cli.samples.models:{args.arch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
