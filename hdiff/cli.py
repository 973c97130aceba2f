"""The ``hdiff`` command line. Subcommands: ``demo`` (more arrive with later features)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hdiff never needs a hub; set before diffusers is imported


def _demo(args: argparse.Namespace) -> int:
    from hdiff.evaluation.quicklook import format_summary, run_quicklook

    summary = run_quicklook(args.out)
    print(format_summary(summary))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'samples.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hdiff`` command."""
    parser = argparse.ArgumentParser(prog="hdiff", description="Diffusion on generative hierarchical models with an exact BP oracle.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample the default GHM and denoise noisy copies with exact BP")
    demo.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hdiff`` console script."""
    from hdiff.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # BP's temporaries are reused instead of page-faulted in on every call
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
