"""The stability stress test behind ``zeta-test`` (:mod:`zetaguard.cli.stress` is its shell):
load a saved PyTorch model safely, measure its sharpness, probe-train it under a guard, score it.

Method (docs/cli.md has the long form):

1. **Load** without executing untrusted code: TorchScript archives (``torch.jit.load``), a
   state dict plus ``--factory module:function`` that builds the module; a whole pickled module
   or a ``torch.export`` archive (whose loader unpickles and evaluates parts of the file) only
   with ``--trust-pickle`` (``zetaguard._trust``).
2. **Data**: ``--data file.npz`` (arrays ``x`` and optionally ``y``) or ``--samples`` synthetic
   inputs of the model's input shape with targets from a fixed random teacher (class labels when
   the model has several outputs, a regression target when it has one).
3. **Sharpness** by power iteration on Hessian-vector products of the loss at the loaded
   weights: ``lambda_max``, and the largest stable plain-SGD learning rate ``2 / lambda_max``.
4. **Probe training**: ``--steps`` plain-SGD steps at ``--lr`` (the LR you mean to train with;
   default 0.01) on a copy of the model with a :class:`ZetaGuard` watching every step:
   per-layer zeta, update/weight ratios, DRIFT and CRITICAL steps.
5. **Score** (0-10) = 10 x the weighted mean of six parts, each in [0, 1]:
   probe stability ``1 - min(1, (DRIFT + 2 CRITICAL) / steps)`` over the steps after the
   guard's warm-up (weight 3);
   output scale ``clip(1 - log10(max(1, r)) / 2, 0, 1)`` with ``r`` the RMS of the model's
   outputs over the RMS of the targets (regression) or over 10 (classification logits): outputs
   100x off scale score 0 (weight 2);
   sharpness margin ``clip(1 + log10(m), 0, 1)`` with ``m = (2/lambda_max) / lr``, i.e. full
   marks when the probe LR is inside the stable region, none when it is 10x beyond it
   (weight 2); gradient flow, the share of layers whose median update/weight ratio over the
   probe exceeds 1e-7 (dead or saturated layers fail it; weight 2); loss trend
   ``clip(1 - log10(final/initial loss), 0, 1)`` (weight 1); weight growth
   ``clip(1 - log10(||w_end|| / ||w_start||), 0, 1)`` (weight 1). Any non-finite weight,
   output or loss scores 0.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zetaguard._trust import export_refusal, is_export_archive

REFERENCE_LR = 0.01  # the default probe LR: a common plain-SGD fine-tuning rate
WEIGHTS = {
    "stability": 3.0,
    "sharpness": 2.0,
    "output": 2.0,
    "flow": 2.0,
    "loss": 1.0,
    "weights": 1.0,
}
LOGIT_SCALE = 10.0  # logits with an RMS beyond this are saturating the softmax
DEAD_RATIO = 1e-7  # a layer whose updates are below this fraction of its weights is not learning


class ModelLoadError(ValueError):
    """A model file that cannot be loaded the way the user asked."""


@dataclass
class Report:
    """What ``zeta-test`` found (``--json`` prints it as is)."""

    model: str
    format: str
    parameters: int
    score: float
    parts: dict[str, float]
    lambda_max: float | None
    max_stable_lr: float | None
    probe_lr: float
    steps: int
    samples: int
    status_counts: dict[str, int]
    initial_loss: float | None
    final_loss: float | None
    weak_layers: list[dict[str, Any]] = field(default_factory=list)
    critical_points: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)


# ---- loading ---------------------------------------------------------------------------


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        return []


def load_model(
    path: Path, factory: str | None = None, trust_pickle: bool = False
) -> tuple[Any, str, tuple[Any, ...] | None]:
    """(module, format, example inputs or None)."""
    import torch

    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    names = _zip_names(path)
    if is_export_archive(names):
        if not trust_pickle:
            raise ModelLoadError(export_refusal(path))
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot load {path} as a torch.export archive: {e}") from e
        args = ep.example_inputs[0] if ep.example_inputs else None
        return ep.module(), "torch.export", tuple(args) if args else None
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        try:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return module, "torchscript", None
        except Exception as e:
            raise ModelLoadError(
                f"cannot load {path} as TorchScript: {str(e) or type(e).__name__}"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} is not TorchScript, a torch.export archive or a plain state dict "
                f"({str(e).splitlines()[0][:200]}). If it is a pickled module you trust, pass "
                "--trust-pickle (unpickling runs code from the file)"
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelLoadError(f"cannot load {path}: {e2}") from e2
        if isinstance(obj, torch.nn.Module):
            return obj, "pickle", None
    if isinstance(obj, torch.nn.Module):
        return obj, "pickle", None
    if isinstance(obj, Mapping):
        state = obj.get("state_dict", obj.get("model_state_dict", obj))
        if factory is None:
            raise ModelLoadError(
                f"{path} holds a state dict; say how to build the module with --factory "
                "module:function (a function returning the nn.Module)"
            )
        module = _build(factory)
        try:
            module.load_state_dict(state)
        except Exception as e:
            raise ModelLoadError(f"the state dict does not fit {factory}(): {e}") from e
        return module, "state_dict", None
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _build(factory: str) -> Any:
    import torch

    mod_name, _, fn_name = factory.partition(":")
    if not mod_name or not fn_name:
        raise ModelLoadError(f"--factory must look like module:function, got {factory!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {factory}: {e}") from e
    module = fn()
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{factory}() returned a {type(module).__name__}, not an nn.Module")
    return module


def infer_input_shape(module: Any) -> tuple[int, ...]:
    """The per-sample input shape from the first weight: Linear (in,), Conv1d (C, 64),
    Conv2d (C, 32, 32). Pass --input-shape for anything else."""
    for _, p in module.named_parameters():
        if p.dim() == 2:
            return (int(p.shape[1]),)
        if p.dim() == 3:
            return (int(p.shape[1]), 64)
        if p.dim() == 4:
            return (int(p.shape[1]), 32, 32)
    raise ModelLoadError("cannot infer the input shape: pass --input-shape, e.g. 3,32,32")


# ---- the probe -------------------------------------------------------------------------


def _make_data(
    module: Any, shape: tuple[int, ...], samples: int, data: Path | None, seed: int
) -> tuple[Any, Any, str]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    if data is not None:
        try:
            with np.load(data, allow_pickle=False) as f:
                x = torch.as_tensor(np.asarray(f["x"], dtype=np.float32))
                y_np = np.asarray(f["y"]) if "y" in f else None
        except (OSError, KeyError, ValueError) as e:
            raise ModelLoadError(f"--data {data}: needs an .npz with an 'x' array ({e})") from e
        x = x[:samples]
    else:
        x = torch.randn((samples, *shape), generator=gen)
        y_np = None
    with torch.no_grad():
        out = module(x[:2])
    out_dim = int(out.reshape(out.shape[0], -1).shape[1])
    if y_np is not None:
        y = torch.as_tensor(y_np[: len(x)])
        task = "classification" if y.dtype in (torch.int64, torch.int32) else "regression"
        return x, (y.long() if task == "classification" else y.float()), task
    # A fixed random teacher gives targets with structure the model can learn.
    teacher = torch.randn((int(np.prod(shape)), out_dim), generator=gen) / math.sqrt(np.prod(shape))
    t = x.reshape(len(x), -1) @ teacher
    if out_dim > 1:
        return x, t.argmax(dim=1), "classification"
    return x, t, "regression"


def _loss_fn(task: str) -> Callable[[Any, Any], Any]:
    import torch

    if task == "classification":
        return lambda out, y: torch.nn.functional.cross_entropy(out.reshape(len(y), -1), y)
    return lambda out, y: torch.nn.functional.mse_loss(out.reshape(y.shape), y)


def sharpness(
    module: Any, x: Any, y: Any, loss_fn: Callable[[Any, Any], Any], iters: int = 20, seed: int = 0
) -> float:
    """The Hessian's largest eigenvalue (by magnitude) of the loss at the current weights, by
    power iteration on Hessian-vector products (double backward)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    loss = loss_fn(module(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    norm = math.sqrt(sum(float((t * t).sum()) for t in v))
    v = [t / norm for t in v]
    eig = 0.0
    for _ in range(iters):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = sum(float((a * b).sum()) for a, b in zip(hv, v, strict=True))
        norm = math.sqrt(sum(float((t * t).sum()) for t in hv))
        if not math.isfinite(norm) or norm == 0.0:
            return norm if not math.isfinite(norm) else 0.0
        v = [t.detach() / norm for t in hv]
    return abs(eig)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    try:
        from rich.progress import Progress
    except ImportError:
        yield lambda: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task("probe training", total=total)
        yield lambda: bar.advance(task)


def _clip01(v: float) -> float:
    return 0.0 if math.isnan(v) else min(1.0, max(0.0, v))


def run_stress(
    module: Any,
    *,
    model_name: str,
    fmt: str,
    samples: int,
    steps: int,
    batch_size: int,
    lr: float | None,
    data: Path | None,
    input_shape: tuple[int, ...] | None,
    example: tuple[Any, ...] | None,
    seed: int = 0,
    progress: bool = False,
) -> Report:
    import torch

    from zetaguard import ZetaGuard

    torch.manual_seed(seed)
    if input_shape is None and example is not None:
        input_shape = tuple(int(s) for s in example[0].shape[1:])
    shape = input_shape or infer_input_shape(module)
    module = module.float()
    x, y, task = _make_data(module, shape, samples, data, seed)
    loss_fn = _loss_fn(task)
    n_params = sum(int(p.numel()) for p in module.parameters())
    for p in module.parameters():
        p.requires_grad_(True)
    finite_weights = all(bool(torch.isfinite(p).all()) for p in module.parameters())

    sample = x[: min(len(x), 256)], y[: min(len(x), 256)]
    with torch.no_grad():
        out_rms = float(module(x).float().pow(2).mean().sqrt())
    target_rms = LOGIT_SCALE if task == "classification" else float(y.float().pow(2).mean().sqrt())
    lam: float | None = None
    try:
        lam = sharpness(module, *sample, loss_fn, seed=seed)
    except RuntimeError:
        lam = None  # a module without double backward: the score then skips this part
    max_lr = (2.0 / lam) if lam and math.isfinite(lam) and lam > 0 else None
    probe_lr = lr if lr is not None else REFERENCE_LR

    probe = module  # trained in place: the caller's copy of the file is untouched
    with contextlib.suppress(NotImplementedError):  # exported programs keep their own mode
        probe.train()
    opt = torch.optim.SGD(probe.parameters(), lr=probe_lr)
    guard = ZetaGuard(warmup_steps=max(5, steps // 5), auto_recover=False)
    w0 = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in probe.parameters()))
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    results = []
    with _progress(progress, steps) as advance:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            lv = float(loss.detach())
            losses.append(lv)
            # named_parameters(): works for ScriptModules too, which hide their submodule dict.
            results.append(guard.monitor(probe.named_parameters(), loss=lv))
            advance()
            if not math.isfinite(lv):
                break
    w1 = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in probe.parameters()))

    counts = {s: sum(r.status == s for r in results) for s in ("STABLE", "DRIFT", "CRITICAL")}
    scored = [r for r in results if not r.in_warmup] or results
    bad = sum(r.status == "DRIFT" for r in scored) + 2 * sum(r.status == "CRITICAL" for r in scored)
    parts = {"stability": _clip01(1.0 - bad / max(1, len(scored)))}
    if max_lr is not None:
        parts["sharpness"] = _clip01(1.0 + math.log10(max_lr / probe_lr))
    elif lam is not None:  # a non-finite curvature
        parts["sharpness"] = 0.0
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    last = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    parts["loss"] = (
        _clip01(1.0 - math.log10(last / first)) if first > 0 and math.isfinite(last) else 0.0
    )
    parts["weights"] = _clip01(1.0 - math.log10(w1 / w0)) if w0 > 0 and math.isfinite(w1) else 0.0
    # Output scale: blown-up weights give outputs orders of magnitude off the targets' scale.
    ratio = out_rms / target_rms if target_rms > 0 else math.inf
    parts["output"] = (
        _clip01(1.0 - math.log10(max(ratio, 1.0)) / 2.0) if math.isfinite(ratio) else 0.0
    )
    # Gradient flow: the share of layers that still learn (median update/weight ratio over
    # the probe above DEAD_RATIO); dead ReLUs or saturated units after a blow-up fail it.
    ratios: dict[str, list[float]] = {}
    for r in scored:
        for name, g in r.groups.items():
            if g.update_ratio is not None:
                ratios.setdefault(name, []).append(g.update_ratio)
    if ratios:
        alive = sum(float(np.median(v)) > DEAD_RATIO for v in ratios.values())
        parts["flow"] = alive / len(ratios)
    total = sum(WEIGHTS[k] for k in parts)
    score = 10.0 * sum(WEIGHTS[k] * v for k, v in parts.items()) / total
    if not finite_weights or not all(math.isfinite(v) for v in losses):
        score = 0.0

    # Weak layers: the highest peak group zeta after warm-up.
    peaks: dict[str, tuple[float, float | None]] = {}
    for r in scored:
        for name, g in r.groups.items():
            z = g.zeta_value if math.isfinite(g.zeta_value) else math.inf
            if name not in peaks or z > peaks[name][0]:
                peaks[name] = (z, g.update_ratio)
    weak = sorted(peaks.items(), key=lambda kv: -kv[1][0])[:5]
    critical = [
        {
            "step": r.step,
            "zeta": r.zeta_value if math.isfinite(r.zeta_value) else None,
            "worst_layer": r.worst_group,
        }
        for r in results
        if r.status == "CRITICAL"
    ][:20]
    recs: list[str] = []
    if max_lr is not None:
        recs.append(
            f"Keep the plain-SGD learning rate below 2/lambda_max = {max_lr:.3g} (lambda_max = "
            f"{lam:.3g}); with Adam-style optimizers keep the effective step well under it."
        )
    if not finite_weights:
        recs.append("The saved weights contain NaN or Inf: restore an earlier checkpoint.")
    for r in results:
        for text in r.recommendations:
            if text not in recs:
                recs.append(text)
    return Report(
        model=model_name,
        format=fmt,
        parameters=n_params,
        score=round(score, 1),
        parts={k: round(v, 3) for k, v in parts.items()},
        lambda_max=lam,
        max_stable_lr=max_lr,
        probe_lr=probe_lr,
        steps=len(results),
        samples=len(x),
        status_counts=counts,
        initial_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        weak_layers=[
            {"layer": n, "zeta": z if math.isfinite(z) else None, "update_ratio": u}
            for n, (z, u) in weak
        ],
        critical_points=critical,
        recommendations=recs[:8],
    )
