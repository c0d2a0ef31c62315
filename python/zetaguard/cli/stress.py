"""``zeta-test``: the command-line shell of :mod:`zetaguard.stress` (the stability stress test
of a saved PyTorch model; the method is described there and in docs/cli.md). It parses the
arguments, runs the test, and prints the report (text, or ``--json``)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

from zetaguard.cli import fail
from zetaguard.store import json_safe
from zetaguard.stress import REFERENCE_LR, ModelLoadError, Report, load_model, run_stress


def _print(report: Report) -> None:
    try:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)

        def out(text: str, markup: bool = False) -> None:
            console.print(text, markup=markup)

    except ImportError:

        def out(text: str, markup: bool = False) -> None:
            print(re.sub(r"\[/?[a-z ]+\]", "", text) if markup else text)

    colour = "green" if report.score >= 7 else "yellow" if report.score >= 4 else "red"
    out(f"Model: {report.model} ({report.format}, {report.parameters:,} parameters)")
    out(f"[bold {colour}]Stability Score: {report.score:.1f}/10[/bold {colour}]", markup=True)
    out(
        "  parts: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report.parts.items())
        + f"; probe: {report.steps} SGD steps at lr {report.probe_lr:.3g} on {report.samples} samples"
    )
    if report.lambda_max is not None:
        stable = f"{report.max_stable_lr:.3g}" if report.max_stable_lr else "none"
        out(f"Sharpness: lambda_max = {report.lambda_max:.4g}; largest stable SGD LR = {stable}")
    c = report.status_counts
    out(f"Probe status: STABLE {c['STABLE']}, DRIFT {c['DRIFT']}, CRITICAL {c['CRITICAL']}")
    if report.weak_layers:
        out("Weak layers:")
        for w in report.weak_layers[:3]:
            z = "inf" if w["zeta"] is None else f"{max(0.0, w['zeta']):.2f}"
            u = "n/a" if w["update_ratio"] is None else f"{w['update_ratio']:.2e}"
            out(f"  {w['layer']}: zeta {z}, update/weight {u}")
    if report.critical_points:
        steps = ", ".join(str(p["step"]) for p in report.critical_points[:10])
        out(f"Critical points (probe steps): {steps}")
    if report.recommendations:
        out("Recommendations:")
        for r in report.recommendations:
            out(f"  - {r}")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--input-shape takes integers like 3,32,32: {e}") from e
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError("--input-shape dimensions must be >= 1")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeta-test",
        description="Stability stress test of a saved PyTorch model: sharpness (largest stable "
        "learning rate), a probe training watched by zetaguard, and a 0-10 score.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="TorchScript or state dict; torch.export (.pt2) with --trust-pickle",
    )
    p.add_argument("--factory", help="module:function that builds the module for a state dict")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow formats whose loading runs code from the file: a pickled nn.Module, a "
        "torch.export archive (only for files you made)",
    )
    p.add_argument("--samples", type=int, default=1000, help="probe samples (default 1000)")
    p.add_argument("--data", type=Path, help=".npz with 'x' (and optionally 'y') arrays")
    p.add_argument("--input-shape", type=_shape, help="per-sample input shape, e.g. 3,32,32")
    p.add_argument("--steps", type=int, default=100, help="probe training steps (default 100)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--lr",
        type=float,
        default=REFERENCE_LR,
        help=f"probe SGD learning rate: the one you mean to train with (default {REFERENCE_LR})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 2 or args.steps < 1 or args.batch_size < 1:
        fail("--samples must be >= 2, --steps and --batch-size >= 1")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        fail(f"--lr must be a positive number, got {args.lr}")
    try:
        import torch  # noqa: F401
    except ImportError:
        fail("zeta-test needs PyTorch: pip install torch")
    path = Path(args.model)
    try:
        module, fmt, example = load_model(path, args.factory, args.trust_pickle)
        report = run_stress(
            module,
            model_name=path.name,
            fmt=fmt,
            samples=args.samples,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            data=args.data,
            input_shape=args.input_shape,
            example=example,
            seed=args.seed,
            progress=not args.json and sys.stderr.isatty(),
        )
    except ModelLoadError as e:
        fail(str(e))
    except (RuntimeError, AssertionError) as e:  # a shape mismatch, an export's shape guard
        fail(
            f"the model could not run on the probe data: {str(e).splitlines()[0]}; check "
            "--input-shape or --data (torch.export archives need a dynamic batch dimension)"
        )
    except KeyboardInterrupt:
        print("zeta-test: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(json_safe(asdict(report)), indent=2, allow_nan=False))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
