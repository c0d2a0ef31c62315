"""zeta-test: loading paths, the sharpness estimate against an exact Hessian, and a model trained
to instability scoring lower than a healthy one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zetaguard.cli.stress import main  # noqa: E402
from zetaguard.stress import sharpness  # noqa: E402

from tests.support.stress_models import regressor  # noqa: E402

FACTORY = "tests.support.stress_models:regressor"


def _data(seed: int = 1) -> tuple[object, object]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g)


def _healthy(path: Path) -> None:
    m = regressor()
    opt = torch.optim.SGD(m.parameters(), lr=0.02)
    x, t = _data()
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(m(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(m.state_dict(), path)


def _trained_to_instability(path: Path) -> None:
    """SGD with momentum at a learning rate past the edge: stopped once the loss has blown up
    to 100x its start, before anything is non-finite."""
    m = regressor()
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    x, t = _data()
    first = None
    for _ in range(500):
        loss = torch.nn.functional.mse_loss(m(x), t)
        value = float(loss.detach())
        first = first or value
        if value > 100 * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert value > 100 * first
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    torch.save(m.state_dict(), path)


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main([*args, "--json", "--samples", "400", "--steps", "40"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_unstable_model_scores_lower(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _healthy(tmp_path / "healthy.pt")
    _trained_to_instability(tmp_path / "unstable.pt")
    good = _json(capsys, "--model", str(tmp_path / "healthy.pt"), "--factory", FACTORY)
    bad = _json(capsys, "--model", str(tmp_path / "unstable.pt"), "--factory", FACTORY)
    assert good["format"] == "state_dict"
    assert good["score"] >= 8.0
    assert bad["score"] < good["score"] - 2.0
    assert bad["parts"]["output"] < good["parts"]["output"]
    assert good["max_stable_lr"] == pytest.approx(2.0 / good["lambda_max"])
    assert len(good["weak_layers"]) == 3
    # The human-readable form.
    assert (
        main(
            [
                "--model",
                str(tmp_path / "unstable.pt"),
                "--factory",
                FACTORY,
                "--samples",
                "200",
                "--steps",
                "20",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Stability Score: " in text
    assert "/10" in text
    assert "Critical points" in text
    assert "Weak layers:" in text


def test_sharpness_matches_the_exact_hessian() -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    params = list(m.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(flat: object) -> object:
        chunks = torch.split(flat, sizes)
        tensors = [c.reshape(s) for c, s in zip(chunks, shapes, strict=True)]
        out = torch.func.functional_call(
            m, dict(zip([n for n, _ in m.named_parameters()], tensors, strict=True)), (x,)
        )
        return torch.nn.functional.mse_loss(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    exact = float(np.abs(np.linalg.eigvalsh(hessian.numpy().astype(np.float64))).max())
    est = sharpness(m, x, y, torch.nn.functional.mse_loss, iters=100)
    assert est == pytest.approx(exact, rel=1e-3)


def test_torchscript_and_export_archives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = regressor()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    report = _json(capsys, "--model", str(tmp_path / "scripted.pt"))
    assert report["format"] == "torchscript"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(tmp_path / "exported.pt2"))
    with pytest.raises(SystemExit) as exc:  # its loader runs code from the file
        main(["--model", str(tmp_path / "exported.pt2"), "--json"])
    assert exc.value.code == 2
    assert "--trust-pickle" in capsys.readouterr().err
    report = _json(capsys, "--model", str(tmp_path / "exported.pt2"), "--trust-pickle")
    assert report["format"] == "torch.export"
    assert 0.0 <= report["score"] <= 10.0


def test_pickles_need_explicit_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(regressor(), tmp_path / "whole.pt")
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "whole.pt"), "--json"])
    assert exc.value.code == 2
    assert "--trust-pickle" in capsys.readouterr().err
    report = _json(capsys, "--model", str(tmp_path / "whole.pt"), "--trust-pickle")
    assert report["format"] == "pickle"


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(regressor().state_dict(), tmp_path / "sd.pt")
    (tmp_path / "text.pt").write_text("not a model")
    cases = [
        (["--model", str(tmp_path / "missing.pt")], "does not exist"),
        (["--model", str(tmp_path / "sd.pt")], "--factory"),
        (
            [
                "--model",
                str(tmp_path / "sd.pt"),
                "--factory",
                "tests.support.stress_models:not_a_module",
            ],
            "not an nn.Module",
        ),
        (["--model", str(tmp_path / "sd.pt"), "--factory", "nowhere.at_all:f"], "cannot import"),
        (["--model", str(tmp_path / "text.pt")], "--trust-pickle"),
        (
            ["--model", str(tmp_path / "sd.pt"), "--factory", FACTORY, "--input-shape", "5"],
            "could not run",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([*args, "--samples", "50", "--steps", "2"])
        assert exc.value.code == 2, args
        assert message in capsys.readouterr().err, args
    assert (tmp_path / "text.pt").read_text() == "not a model"
