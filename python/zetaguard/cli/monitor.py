"""``zeta-monitor``: watch a checkpoint file that a training job rewrites, or tail a run store,
and print one line per update::

    Epoch 127 | Loss: 1.28 | zeta: 1.62 CRITICAL

Checkpoints are read without executing code: PyTorch files with ``torch.load(weights_only=True)``,
``.safetensors`` with safetensors' NumPy loader, Keras ``.weights.h5`` with h5py. The file type is
taken from its first bytes, not its name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard.cli import fail
from zetaguard.store import RunReader, StoreError

STATUS_STYLE = {"STABLE": "green", "DRIFT": "yellow", "CRITICAL": "bold red"}
ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Checkpoint dict keys that hold the weights, in the order they are tried.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
EPOCH_KEYS = ("epoch", "step", "global_step", "iteration")
LOSS_KEYS = ("loss", "train_loss", "val_loss")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as weights."""


@dataclass
class Checkpoint:
    weights: dict[str, npt.NDArray[Any]]
    epoch: int | None
    loss: float | None


def sniff(path: Path) -> str:
    """The checkpoint format from the file's first bytes: torch, torch-legacy, safetensors,
    hdf5; raises :class:`CheckpointError` for anything else."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return "torch"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < path.stat().st_size:
            return "safetensors"
    if head[:1] == b"\x80":  # a bare pickle: torch's legacy format
        return "torch-legacy"
    raise CheckpointError(
        f"{path} is not a checkpoint zeta-monitor reads (PyTorch .pt/.pth, .safetensors or "
        f"Keras .weights.h5); its first bytes are {head[:8]!r}"
    )


def _scalar(value: Any) -> float | None:
    try:
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return None


def _flatten(tree: Mapping[str, Any], prefix: str, out: dict[str, npt.NDArray[Any]]) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", out)
            continue
        array = _to_numpy(value)
        if array is not None and array.dtype.kind == "f" and array.size > 0:
            out[name] = np.ascontiguousarray(array)


def _to_numpy(value: Any) -> npt.NDArray[Any] | None:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            t = t.float()
        return np.asarray(t.numpy())
    return None


def _pick(meta: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        if k in meta:
            v = _scalar(meta[k])
            if v is not None:
                return v
    return None


def _from_mapping(obj: Mapping[str, Any], path: Path) -> Checkpoint:
    tree: Mapping[str, Any] = obj
    for key in WEIGHT_KEYS:
        if isinstance(obj.get(key), Mapping):
            tree = obj[key]
            break
    weights: dict[str, npt.NDArray[Any]] = {}
    _flatten(tree, "", weights)
    if not weights:
        raise CheckpointError(f"{path} holds no floating-point tensors to monitor")
    epoch = _pick(obj, EPOCH_KEYS)
    return Checkpoint(weights, None if epoch is None else int(epoch), _pick(obj, LOSS_KEYS))


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint's floating-point weights (and its epoch and loss when it records
    them) without executing code from the file."""
    p = Path(path)
    kind = sniff(p)
    try:
        if kind in ("torch", "torch-legacy"):
            import torch

            obj = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping):
                raise CheckpointError(
                    f"{p} holds a {type(obj).__name__}, not a state dict; save "
                    "model.state_dict() (or a dict holding it)"
                )
            return _from_mapping(obj, p)
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as f:
                weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
                meta = f.metadata() or {}
            ckpt = _from_mapping(weights, p)
            epoch = _pick(meta, EPOCH_KEYS)
            return Checkpoint(
                ckpt.weights, None if epoch is None else int(epoch), _pick(meta, LOSS_KEYS)
            )
        import h5py

        weights = {}
        with h5py.File(p, "r") as f:

            def visit(name: str, node: Any) -> None:
                if isinstance(node, h5py.Dataset) and node.dtype.kind == "f" and node.size > 0:
                    weights[name] = np.asarray(node[()])

            f.visititems(visit)
            epoch = _pick(dict(f.attrs), EPOCH_KEYS)
            loss = _pick(dict(f.attrs), LOSS_KEYS)
        if not weights:
            raise CheckpointError(f"{p} holds no floating-point weights")
        return Checkpoint(weights, None if epoch is None else int(epoch), loss)
    except CheckpointError:
        raise
    except ImportError as e:
        raise CheckpointError(f"reading {p} ({kind}) needs {e.name}: pip install {e.name}") from e
    except Exception as e:  # a truncated or damaged file, whatever the library raises
        raise CheckpointError(f"cannot read {p} as a {kind} checkpoint: {e}") from e


def _console() -> Callable[[str, str], None]:
    try:
        from rich.console import Console
    except ImportError:
        return lambda text, status: print(text, flush=True)
    console = Console(highlight=False, soft_wrap=True)

    def emit(text: str, status: str) -> None:
        head, _, word = text.rpartition(" ")
        style = STATUS_STYLE.get(status)
        if style and word == status:
            console.print(f"{head} [{style}]{word}[/{style}]")
        else:
            console.print(text, markup=False)

    return emit


def format_line(
    label: str, number: int, loss: float | None, zeta: float | None, status: str
) -> str:
    """``Epoch 127 | Loss: 1.28 | zeta: 1.62 CRITICAL``."""
    loss_text = "n/a" if loss is None else (f"{loss:.4g}" if math.isfinite(loss) else str(loss))
    zeta_text = "inf" if zeta is None or not math.isfinite(zeta) else f"{zeta:.2f}"
    return f"{label} {number} | Loss: {loss_text} | zeta: {zeta_text} {status}"


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def watch_checkpoint(args: argparse.Namespace, emit: Callable[[str, str], None]) -> int:
    from zetaguard import ZetaGuard

    path = Path(args.model)
    if not path.is_file():
        fail(f"checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        first = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    guard = ZetaGuard(warmup_steps=args.warmup, auto_recover=False, run_dir=args.run_dir)
    seen = _signature(path)
    ckpt: Checkpoint | None = first
    updates = 0
    while True:
        if ckpt is not None:
            try:
                result = guard.monitor(ckpt.weights, loss=ckpt.loss)
            except ValueError:
                # The checkpoint's parameter set changed (another model): start over.
                guard.reset()
                result = guard.monitor(ckpt.weights, loss=ckpt.loss)
            label, number = (
                ("Epoch", ckpt.epoch) if ckpt.epoch is not None else ("Version", updates)
            )
            emit(
                format_line(label, number, ckpt.loss, result.zeta_value, result.status),
                result.status,
            )
            updates += 1
            if args.count and updates >= args.count:
                return 0
            ckpt = None
        time.sleep(args.interval)
        sig = _signature(path)
        if sig is None or sig == seen:
            continue
        time.sleep(min(0.2, args.interval))  # let a writer finish
        if _signature(path) != sig:
            continue  # still being written: read it next time
        seen = sig
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipped this version: {e}", file=sys.stderr, flush=True)


def tail_run(args: argparse.Namespace, emit: Callable[[str, str], None]) -> int:
    try:
        reader = RunReader(args.run)
        with reader.consistent():
            reader.info()
    except StoreError as e:
        fail(str(e))
    last_id = 0
    if not args.from_start:
        tail = reader.tail(1)
        last_id = int(tail[0]["id"]) - 1 if tail else 0
    updates = 0
    with reader:
        while True:
            try:
                rows = reader.steps(since_id=last_id)
            except StoreError as e:
                fail(str(e))
            # Every non-STABLE step, and the latest one, so a long STABLE stretch stays quiet.
            for i, row in enumerate(rows):
                if row["status"] != "STABLE" or i == len(rows) - 1:
                    emit(
                        format_line("Step", row["step"], row["loss"], row["zeta"], row["status"]),
                        row["status"],
                    )
                    updates += 1
                    if args.count and updates >= args.count:
                        return 0
            if rows:
                last_id = int(rows[-1]["id"])
            time.sleep(args.interval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeta-monitor",
        description="Watch a checkpoint that a training job rewrites (or tail a run store) and "
        "print its stability after every update.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint file: .pt/.pth (torch), .safetensors, .weights.h5")
    src.add_argument("--run", help="a run's directory (or its run.sqlite) to tail")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between checks (default 5)")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="checkpoint versions used for calibration (default 10)",
    )
    p.add_argument("--run-dir", default=None, help="also record each version in a run store here")
    p.add_argument("--count", type=int, default=0, help="exit after this many lines (0: never)")
    p.add_argument(
        "--from-start", action="store_true", help="with --run: print the whole run first"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.interval > 0 and math.isfinite(args.interval)):
        fail(f"--interval must be a positive number of seconds, got {args.interval}")
    if args.warmup < 1:
        fail(f"--warmup must be >= 1, got {args.warmup}")
    emit = _console()
    try:
        return watch_checkpoint(args, emit) if args.model else tail_run(args, emit)
    except KeyboardInterrupt:
        print("zeta-monitor: stopped", file=sys.stderr, flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
