"""guard.full_diagnostics(model): the per-layer table against values computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from zetaguard import ZetaGuard

from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def _norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in ts))


def test_table_matches_hand_computed_ratios() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = ZetaGuard(warmup_steps=3, auto_recover=False).attach(model=model)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    history = []
    for _ in range(5):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        guard.monitor(model)
        history.append([p.detach().clone() for p in model.parameters()])
    with torch.no_grad():
        model[2].bias.grad[0] = float("nan")
    diag = guard.full_diagnostics()
    assert [r.name for r in diag.layers] == ["0", "2"]
    for row, idx in ((diag["0"], (0, 1)), (diag["2"], (2, 3))):
        now = [history[-1][i] for i in idx]
        before = [history[-2][i] for i in idx]
        weight = _norm(now)
        assert row.param_norm == pytest.approx(weight)
        update = _norm([a - b for a, b in zip(now, before, strict=True)])
        assert row.update_ratio == pytest.approx(update / weight, rel=1e-5)
        grads = [list(model.parameters())[i].grad for i in idx]
        finite = [torch.where(torch.isfinite(g), g, torch.zeros_like(g)) for g in grads]
        assert row.grad_ratio == pytest.approx(_norm(finite) / weight, rel=1e-9)
        assert row.jar is not None
    assert diag["0"].nonfinite_grads == 0
    assert diag["2"].nonfinite_grads == 1
    assert diag["2"].nonfinite_params == 0
    text = str(diag)
    assert text.splitlines()[1].split() == [
        "layer",
        "status",
        "zeta",
        "JAR",
        "update/weight",
        "grad/weight",
        "nonfinite",
        "p/g",
    ]
    assert "0/1" in text.splitlines()[-1]
    assert json.loads(json.dumps(diag.to_dict()))["layers"][1]["name"] == "2"
    assert diag.worst(1)[0].name in ("0", "2")


def test_diagnostics_need_a_monitored_step() -> None:
    with pytest.raises(ValueError, match="monitor"):
        ZetaGuard().full_diagnostics(torch.nn.Linear(2, 2))
