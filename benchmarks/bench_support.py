"""Pieces several benchmarks share. Imports no zetaguard at module level: the before/after
benchmarks must choose which copy of the package a worker imports before anything imports it.

* :func:`tiny_gpt2_trainer`: the tiny GPT-2 in the Hugging Face ``Trainer`` (built from a config,
  no download), on a fixed synthetic token set.
* :func:`alternate`, :func:`run_worker`, :func:`use_package`, :func:`before_after`: time this
  checkout against the package as it was at a git revision, in alternating worker processes of
  the same run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2_trainer(steps: int, output_dir: str) -> Any:
    """A ``Trainer`` over a 2-layer, 32-wide GPT-2 (batch 16, AdamW at 1e-3, no logging, no
    saving, no printer callback), seeded the same every call."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(0)
            start = torch.randint(0, 96, (4096, 1), generator=gen)
            self.ids = (start + torch.arange(32) * 3) % 96

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens())
    trainer.remove_callback(PrinterCallback)  # keep the tables readable
    return trainer


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def unpack_base(ref: str, into: Path) -> Path:
    """``python/zetaguard`` at ``ref`` under ``into``, with this checkout's built engine; returns
    the folder to put on ``sys.path``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "python/zetaguard"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    import zetaguard._core as core

    shutil.copy(core.__file__, into / "python" / "zetaguard" / Path(core.__file__).name)
    return into / "python"


def use_package(package: str | None) -> None:
    """Make ``import zetaguard`` find the copy under ``package`` (None: the installed one).
    Call before anything imports zetaguard."""
    if package is None:
        return
    # The editable install answers imports of zetaguard through its own finder, ahead of
    # sys.path: leave it out so the unpacked copy is the one imported.
    sys.meta_path[:] = [f for f in sys.meta_path if "zetaguard" not in type(f).__module__]
    sys.path.insert(0, package)


def run_worker(script: str, args: list[str], package: Path | None) -> dict[str, Any]:
    """``script --worker *args`` in a fresh process (importing the package under ``package``,
    else this checkout's); returns the JSON object it printed last."""
    extra = [] if package is None else ["--package", str(package)]
    done = subprocess.run(
        [sys.executable, script, "--worker", *args, *extra],
        check=True,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def alternate(
    base: str, rounds: int, run: Callable[[Path | None], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """``run`` with the package as committed at ``base`` ("before") and with this checkout
    ("after"), alternating for ``rounds`` rounds so that both see the same machine load."""
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = unpack_base(base, Path(tmp))
        for _ in range(rounds):
            for label, path in (("before", unpacked), ("after", None)):
                runs[label].append(run(path))
    return runs


def before_after(base: str) -> str:
    """What "before" and "after" are, for the header of a before/after table."""
    dirty = git("status", "--porcelain", "python")
    return (
        f"before: {base} ({git('rev-parse', '--short', base)}); after: this checkout "
        f"({git('rev-parse', '--short', 'HEAD')}{', uncommitted changes' if dirty else ''})"
    )
