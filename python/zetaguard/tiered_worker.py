"""The full pass of tiered monitoring on a worker thread (``ZetaGuard(full_pass="thread")``).

A scheduled full pass (every ``full_pass_interval`` steps, on a step whose cheap tier is
STABLE) is handed to one worker thread and overlaps the next training step; its finding
(non-finite counts in every parameter and gradient) arrives at the next ``monitor()`` call,
one step late. The engine releases the GIL around the pass, so the thread runs beside the
training thread's Python and the framework's kernels. docs/always-on.md states the trade.

What the worker reads: the tensors of the step it scores, through the snapshot it keeps (the
snapshot holds the tensor objects, so the memory stays valid). The gradients' addresses, and
the facts their raw read depends on, are read and checked by :meth:`FullPassWorker.submit`
on the training thread in that step's ``monitor()`` call, never on the worker. The worker
reads the elements in place, not a copy: a copy would read everything on the training thread, which is the cost being moved. The
reads may overlap the next optimizer update, and that cannot hide a finding: the pass only
counts non-finite values, non-finite weights stay non-finite under every optimizer update
(``w - lr * u``, weight decay), and gradients replaced by ``zero_grad()`` (torch's default
``set_to_none=True``) stay alive in the snapshot. A gradient zeroed in place was already
applied to the weights by the optimizer step before ``monitor()``. The guard itself waits for
the worker before anything it changes: ``reset()``, a rollback, ``load_state()``.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from zetaguard import _core
    from zetaguard.adapters import Snapshot

FullPass = Literal["inline", "thread"]
FULL_PASS_CHOICES: tuple[str, ...] = ("inline", "thread")


def check_full_pass(full_pass: Any) -> None:
    """Refuse a bad ``full_pass`` with a message naming the fix."""
    if not isinstance(full_pass, str) or full_pass not in FULL_PASS_CHOICES:
        raise ValueError(
            f"full_pass must be 'inline' (the full pass runs in the monitor() call) or "
            f"'thread' (on a worker thread, its finding one step late), got {full_pass!r}"
        )


def check_thread_applies(full_pass: str, mode: str, device: str) -> None:
    """``full_pass="thread"`` only moves the tiered mode's full pass; refuse it elsewhere."""
    if full_pass != "thread":
        return
    if mode != "auto":
        raise ValueError(
            f"full_pass='thread' needs mode='auto' (tiered monitoring): mode={mode!r} reads "
            "every element in every monitor() call, so there is no separate full pass to move "
            "off the training thread; use mode='auto', or full_pass='inline'"
        )
    if device != "auto":
        raise ValueError(
            f"full_pass='thread' cannot run on the device path (device={device!r}): it reads "
            "every element every step and brings back only sums; use device='auto' with "
            "parameters in host memory, or full_pass='inline'"
        )


def thread_refused(reason: str) -> ValueError:
    """The error for a step that reached a path where the worker cannot run (raised at once)."""
    return ValueError(
        f"full_pass='thread' cannot run here: {reason}; use ZetaGuard(full_pass='inline')"
    )


# Frameworks whose snapshot keeps the memory it points into valid while the snapshot is held
# (torch: the tensor objects; TensorFlow: the read's tensors, which make the next assign write
# a new buffer).
_HELD_FRAMEWORKS = frozenset({"torch", "keras-torch", "tensorflow"})


def unsafe_for_worker(snap: Snapshot) -> str | None:
    """Why the worker could not read this snapshot during the next step, or None. JAX arrays
    (a Keras fit's state, a jitted step with donated arguments) are deleted or reused by the
    next step: the worker would read freed memory."""
    if snap.framework in _HELD_FRAMEWORKS:
        return None
    if snap.framework == "numpy" and all(isinstance(t, np.ndarray) for t in snap.tensors):
        return None
    return (
        f"{snap.framework} arrays ({type(snap.tensors[0]).__name__}) may be freed or reused by "
        "the next step (JAX donates a fit's state to it), and the worker reads them during that "
        "step"
    )


@dataclass(slots=True)
class LatePass:
    """A full pass run on the worker: the tiered step it scored and what it found."""

    step: int  # the tiered step index (0-based) whose tensors it read
    param_nonfinite: npt.NDArray[np.float64]  # per tensor, engine order
    grads_bad: int  # non-finite gradient elements

    @property
    def found(self) -> bool:
        return self.grads_bad > 0 or bool(np.any(self.param_nonfinite > 0))

    @property
    def nonfinite(self) -> int:
        return int(np.sum(self.param_nonfinite)) + self.grads_bad


def scan(step: int, tracker: _core.Tracker, snap: Snapshot) -> LatePass:
    """Every parameter and gradient element read once: the non-finite counts."""
    full = tracker.norms_raw(snap.tensors) if snap.raw else tracker.norms(snap.tensors)
    bad = 0
    grads = snap.read_grads()  # on the worker: read already, by submit()
    if grads:
        _, bad = tracker.total_norm_raw(grads) if snap.grads_raw else tracker.total_norm(grads)
    return LatePass(step, full[:, 4].copy(), int(bad))


class FullPassWorker:
    """One worker thread and at most one pass in flight."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zetaguard-full-pass")
        self._pending: Future[LatePass] | None = None
        # A guard dropped without close() still ends its thread.
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        self.submitted = 0

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(self, step: int, tracker: _core.Tracker, snap: Snapshot) -> None:
        assert self._pending is None, "a full pass is still in flight: take() it first"
        # The gradients of the step the pass scores, read here on the training thread: the
        # next step replaces them, and the torch adapter's reads are no worker's business.
        snap.read_grads()
        self.submitted += 1
        self._pending = self._pool.submit(scan, step, tracker, snap)

    def take(self) -> LatePass | None:
        """The pending pass's finding (waiting for it), or None when none was submitted. An
        exception raised on the worker is raised here, in the caller's thread."""
        future, self._pending = self._pending, None
        if future is None:
            return None
        try:
            return future.result()
        except Exception as exc:
            raise RuntimeError(
                f"the full pass on the worker thread (ZetaGuard(full_pass='thread')) failed: "
                f"{exc}; its step is unscored for non-finite values. Fix the cause, or use "
                "full_pass='inline' to see the error where it happens"
            ) from exc

    def discard(self) -> None:
        """Wait for a pass in flight and drop its finding (reset, rollback, load_state: it
        describes a trajectory that is gone). Its error, if any, is dropped with it."""
        future, self._pending = self._pending, None
        if future is not None:
            future.exception()  # waits; the worker is then no longer reading the tensors

    def close(self) -> None:
        """Wait for a pass in flight, drop it and end the thread."""
        self.discard()
        self._finalizer()
