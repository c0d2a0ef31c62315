"""The PyTorch recovery backend (imported only when the user's model is a torch object)."""

from __future__ import annotations

import copy
import operator
import weakref
from collections.abc import Callable, Mapping
from itertools import repeat
from pathlib import Path
from typing import Any

import torch

from zetaguard.recovery.backend import StateSnapshot, capture_host_rng, restore_host_rng

# A gradient mark (TorchBackend.grad_mark): each trained parameter's gradient tensor, held
# weakly (None: no gradient), and its version counter (-1: none).
GradMark = tuple[list["weakref.ref[torch.Tensor] | None"], list[int]]
_GRAD = operator.attrgetter("grad")


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside nested dicts, lists and tuples (a
    state dict, an optimizer state); everything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        if all(map(isinstance, obj.values(), repeat(torch.Tensor))):  # parameters: C-level maps
            return dict(zip(obj, map(fn, obj.values()), strict=True))
        return {k: map_tensors(v, fn) if isinstance(v, _CONTAINERS) else v for k, v in obj.items()}
    if isinstance(obj, list):  # e.g. a param group's "params": hundreds of ints, no call each
        return [map_tensors(v, fn) if isinstance(v, _CONTAINERS) else v for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) if isinstance(v, _CONTAINERS) else v for v in obj)
    return obj


_CONTAINERS = (torch.Tensor, dict, list, tuple)


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors inside ``obj``, in the order :func:`map_tensors` visits them."""
    leaves: list[torch.Tensor] = []
    map_tensors(obj, leaves.append)
    return leaves


def _is_dense(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized


_layout_of = operator.attrgetter("layout")
_is_quantized = operator.attrgetter("is_quantized")


def _all_dense(tensors: list[torch.Tensor]) -> bool:
    """:func:`_is_dense` for every tensor, in C-level maps (a capture runs it on every tensor
    of model and optimizer state)."""
    return all(map(operator.is_, map(_layout_of, tensors), repeat(torch.strided))) and not any(
        map(_is_quantized, tensors)
    )


def _same_layout(buffers: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
    return len(buffers) == len(sources) and all(
        b.shape == s.shape and b.dtype == s.dtype for b, s in zip(buffers, sources, strict=True)
    )


def _clone(obj: Any) -> Any:
    """A deep copy keeping devices (what ``load_state_dict`` gets, so live state never aliases
    the snapshot: ``Optimizer.load_state_dict`` keeps tensors already on the right device)."""
    return map_tensors(obj, lambda t: t.clone())


def _named_targets(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor a rollback writes: a module's state_dict (parameters and buffers, as live
    references), or the given parameters."""
    if isinstance(model, torch.nn.Module):
        return dict(model.state_dict(keep_vars=True))
    if isinstance(model, torch.Tensor):
        return {"0": model}
    if isinstance(model, Mapping):
        return {str(k): v for k, v in model.items()}
    items = list(model)
    if items and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in items):
        return dict(items)
    return {f"param.{i}": t for i, t in enumerate(items)}


class TorchBackend:
    """Rollback, LR control and checkpoints for a torch model or parameter list.

    ``model`` is an ``nn.Module`` (parameters and buffers are snapshotted) or parameters (a
    list, a dict, ``named_parameters()`` pairs); ``optimizer`` any ``torch.optim.Optimizer``;
    ``scheduler`` any ``torch.optim.lr_scheduler.LRScheduler`` (what Lightning and the Hugging
    Face ``Trainer`` use).
    """

    framework = "torch"

    def __init__(self, model: Any, optimizer: Any = None, scheduler: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.targets = _named_targets(model)
        self._spare: list[list[torch.Tensor]] = []  # buffers of dropped snapshots
        self._step_hooks: list[Any] = []  # handles of the LR watch's optimizer hooks

    def set_params(self, params: Any) -> None:
        """Point at a new parameter set (used when only parameters were handed to monitor())."""
        self.model = params
        self.targets = _named_targets(params)

    # ---- snapshots -----------------------------------------------------------------------

    def capture(self, step: int, data_position: Any = None) -> StateSnapshot:
        opt_state = self.optimizer.state_dict() if self.optimizer is not None else None
        live = (self.targets, opt_state)
        sources = _tensor_leaves(live)
        buffers = self._spare_buffers(sources)
        with torch.no_grad():
            if _all_dense(sources):
                torch._foreach_copy_(buffers, sources)  # one call for every tensor, not one each
            else:  # a sparse or quantized tensor cannot be copied into a dense buffer
                for i, t in enumerate(sources):
                    if _is_dense(t):
                        buffers[i].copy_(t)
                    else:
                        buffers[i] = t.detach().to("cpu", copy=True)
        copied = iter(buffers)
        params, opt_state = map_tensors(live, lambda _: next(copied))
        rng = capture_host_rng()
        rng["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            rng["cuda"] = torch.cuda.get_rng_state_all()
        snap = StateSnapshot(
            step=step,
            params=params,
            optimizer_state=opt_state,
            scheduler_state=_scheduler_state(self.scheduler),
            lrs=self.get_lrs(),
            rng=rng,
            data_position=data_position,
            # numel x element size: a sparse buffer has no nbytes
            nbytes=sum(
                map(
                    operator.mul,
                    map(torch.Tensor.numel, buffers),
                    map(torch.Tensor.element_size, buffers),
                )
            ),
            has_optimizer_state=opt_state is not None,
        )
        # Once the keeper lets this snapshot go, its host buffers serve the next capture:
        # allocating a fresh copy of model and optimizer state every few steps costs page
        # faults (on a 25M-parameter Adam run, 300 MB: 2x the time of the copy itself).
        weakref.finalize(snap, self._spare.append, buffers).atexit = False
        return snap

    def _spare_buffers(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host buffers for a capture: those of a snapshot no one holds any more when they fit
        (at most one such set is kept), fresh ones otherwise."""
        spare = self._spare.pop() if self._spare else None
        self._spare.clear()
        if spare is not None and _same_layout(spare, sources):
            return spare
        return [torch.empty(t.shape, dtype=t.dtype, device="cpu") for t in sources]

    def restore(self, snapshot: StateSnapshot) -> None:
        saved: dict[str, torch.Tensor] = snapshot.params
        missing = set(self.targets) ^ set(saved)
        if missing:
            raise ValueError(
                f"the snapshot does not match the model ({len(missing)} tensors differ, e.g. "
                f"{sorted(missing)[:3]}); roll back only with the model it was taken from"
            )
        with torch.no_grad():
            for name, live in self.targets.items():
                live.copy_(saved[name])
        if self.optimizer is not None and snapshot.optimizer_state is not None:
            lrs = self.get_lrs()
            self.optimizer.load_state_dict(_clone(snapshot.optimizer_state))
            # The snapshot's param_groups carry the LR of its time; an LR cut since must stay.
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
        if self.scheduler is not None and snapshot.scheduler_state is not None:
            self._restore_scheduler(snapshot)
        restore_host_rng(snapshot.rng)
        if "torch" in snapshot.rng:
            torch.set_rng_state(snapshot.rng["torch"])
        if "cuda" in snapshot.rng:
            torch.cuda.set_rng_state_all(snapshot.rng["cuda"])

    def _restore_scheduler(self, snapshot: StateSnapshot) -> None:
        """The schedule's position (step count) goes back with the weights; its LR attributes
        (``base_lrs``, ...) stay as they are now, so the cuts made since survive. The groups'
        LRs become the snapshot's times those cuts (what the schedule gives at the restored
        position: a chainable scheduler such as StepLR goes on from the group's LR)."""
        sched = self.scheduler
        saved = snapshot.scheduler_state
        now = _scheduler_lr_attrs(sched)
        sched.load_state_dict(copy.deepcopy(saved["state"]))
        _set_scheduler_lr_attrs(sched, now)
        assert self.optimizer is not None
        cuts = _cuts_since(saved["lr_attrs"], now, len(self.optimizer.param_groups))
        if cuts is None or len(snapshot.lrs) != len(cuts):
            return  # no LR attribute tells the cuts apart: the LRs stay as they are
        lrs = [lr * c for lr, c in zip(snapshot.lrs, cuts, strict=True)]
        self.set_lrs(lrs)
        if isinstance(getattr(sched, "_last_lr", None), list):
            sched._last_lr = list(lrs)

    # ---- learning rate -------------------------------------------------------------------

    def get_lrs(self) -> list[float]:
        if self.optimizer is None:
            return []
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def scale_lr(self, factor: float) -> None:
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for key in _GROUP_LR_KEYS:  # what schedulers recompute the LR from
                if key in group:
                    group[key] = _scaled(group[key], factor)
        if self.scheduler is not None:
            _scale_scheduler(self.scheduler, factor)

    def set_lrs(self, lrs: list[float]) -> None:
        """Write ``param_groups[i]["lr"]`` (only: the LR watch's held factor is per step, so the
        scheduler's base LRs stay as the cut left them)."""
        if self.optimizer is None:
            return
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def watch_steps(self, watch: Any) -> None:
        """Run ``watch.before_step`` / ``watch.after_step`` around every optimizer step (torch's
        step hooks on the innermost optimizer: Lightning's and accelerate's wrappers call it)."""
        if self._step_hooks or self.optimizer is None:
            return
        inner = _innermost_optimizer(self.optimizer)
        if not hasattr(inner, "register_step_pre_hook"):
            return
        self._step_hooks = [
            inner.register_step_pre_hook(lambda *_: watch.before_step(self, self.scheduler)),
            inner.register_step_post_hook(lambda *_: watch.after_step(self, self.scheduler)),
        ]

    def close(self) -> None:
        """Remove the optimizer hooks this backend registered."""
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ---- gradients -----------------------------------------------------------------------

    def trained_params(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates (else the model's trainable ones)."""
        if self.optimizer is not None:
            return [p for g in self.optimizer.param_groups for p in g["params"]]
        return [t for t in self.targets.values() if t.requires_grad]

    def grad_norm(self) -> float | None:
        from zetaguard.adapters.torch import grad_norm

        return grad_norm(self.trained_params())

    def grad_mark(self) -> GradMark:
        """Which gradient tensors the parameters hold now, and their version counters: enough
        for :meth:`same_grads` to tell whether a norm read from them still holds."""
        grads = list(map(_GRAD, self.trained_params()))
        refs = [None if g is None else weakref.ref(g) for g in grads]
        return refs, [-1 if g is None else g._version for g in grads]

    def same_grads(self, mark: GradMark) -> bool:
        """True when every parameter still holds the gradient tensor :meth:`grad_mark` saw,
        unmodified: not replaced (``zero_grad(set_to_none=True)`` and a new backward), not
        changed in place (zeroed, accumulated into, clipped; torch bumps ``_version``)."""
        refs, versions = mark
        grads = list(map(_GRAD, self.trained_params()))
        if len(grads) != len(refs):
            return False
        held = [None if r is None else r() for r in refs]
        return all(map(operator.is_, held, grads)) and versions == [
            -1 if g is None else g._version for g in grads
        ]

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for p in self.trained_params():
            p.grad = None

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients in place to a global norm of ``max_norm``; returns the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self.trained_params(), max_norm))

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, directory: Path, stem: str, guard_state: dict[str, Any]) -> list[str]:
        from zetaguard.checkpoint import save_safetensors, save_torch

        params = {name: t.detach() for name, t in self.targets.items()}
        payload: dict[str, Any] = {"model": params, "guard": guard_state}
        if self.optimizer is not None:
            payload["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, "state_dict"):
            payload["scheduler"] = self.scheduler.state_dict()
        main = directory / f"{stem}.pt"
        save_torch(main, payload)
        weights = directory / f"{stem}.safetensors"
        save_safetensors(weights, params, guard_state)
        return [str(main), str(weights)]


# param_group entries holding learning rates: "lr" itself, "initial_lr" (LRScheduler's base on
# resume), "max_lr"/"min_lr" (OneCycleLR computes the LR from these each step).
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Scheduler attributes holding learning rates (base_lrs: LambdaLR, StepLR, CosineAnnealingLR,
# and the Hugging Face / Lightning schedules built on them; max_lrs: CyclicLR; min_lrs:
# ReduceLROnPlateau, CosineAnnealing eta_min is a single float and is scaled too).
_SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")


def _scheduler_state(sched: Any) -> Any:
    """A deep copy of ``sched.state_dict()`` (its step count, and the inner schedulers' of a
    SequentialLR), or None for a scheduler without one."""
    state_dict = getattr(sched, "state_dict", None)
    if sched is None or state_dict is None or not hasattr(sched, "load_state_dict"):
        return None
    return {"state": copy.deepcopy(state_dict()), "lr_attrs": _scheduler_lr_attrs(sched)}


def _cuts_since(
    then: list[dict[str, Any]], now: list[dict[str, Any]], groups: int
) -> list[float] | None:
    """Per group, how much the LR attributes were scaled between ``then`` and ``now`` (the cuts
    made since a snapshot), from the first list attribute both hold with nonzero values."""
    for old, new in zip(then, now, strict=False):
        for attr in _SCHEDULER_LR_ATTRS[:3]:  # base_lrs, max_lrs, min_lrs
            a, b = old.get(attr), new.get(attr)
            if (
                isinstance(a, list)
                and isinstance(b, list)
                and len(a) == len(b) == groups
                and all(float(x) != 0.0 for x in a)
            ):
                return [float(y) / float(x) for x, y in zip(a, b, strict=True)]
    return None


def _scheduler_lr_attrs(sched: Any) -> list[dict[str, Any]]:
    """The LR-valued attributes of ``sched`` and its inner schedulers, in visiting order."""
    own: dict[str, Any] = {}
    for attr in _SCHEDULER_LR_ATTRS:
        value = getattr(sched, attr, None)
        if isinstance(value, list):
            own[attr] = list(value)
    if isinstance(getattr(sched, "eta_min", None), float):
        own["eta_min"] = sched.eta_min
    out = [own]
    for inner in getattr(sched, "_schedulers", []):
        out.extend(_scheduler_lr_attrs(inner))
    return out


def _set_scheduler_lr_attrs(sched: Any, saved: list[dict[str, Any]]) -> None:
    pending = iter(saved)

    def visit(s: Any) -> None:
        for attr, value in next(pending, {}).items():
            setattr(s, attr, value)
        for inner in getattr(s, "_schedulers", []):
            visit(inner)

    visit(sched)


def _scale_scheduler(sched: Any, factor: float) -> None:
    for attr in _SCHEDULER_LR_ATTRS:
        values = getattr(sched, attr, None)
        if isinstance(values, list):
            setattr(sched, attr, [_scaled(v, factor) for v in values])
    if isinstance(getattr(sched, "eta_min", None), float):
        sched.eta_min *= factor
    for inner in getattr(sched, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _scale_scheduler(inner, factor)


def _scaled(lr: Any, factor: float) -> Any:
    if isinstance(lr, torch.Tensor):  # tensor learning rates (capturable optimizers)
        return lr.mul(factor)
    return float(lr) * factor


def _innermost_optimizer(opt: Any) -> Any:
    """The torch optimizer under wrappers that keep it in ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the one whose ``step`` runs."""
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt or not hasattr(inner, "param_groups"):
            break
        opt = inner
    return opt


def make_backend(model: Any, optimizer: Any = None, scheduler: Any = None) -> TorchBackend:
    return TorchBackend(model, optimizer, scheduler)
