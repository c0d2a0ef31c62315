"""guard.generate_report(): one HTML file whose PNG plots and tables match the run store."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard.results import RecoveryReport
from zetaguard.store import RunReader, StoreError


def _run(guard: ZetaGuard, steps: int = 60, blowup_at: int = 45) -> None:
    rng = np.random.default_rng(3)
    w = {f"layer{i}.weight": rng.normal(size=(12, 12)).astype(np.float32) for i in range(3)}
    for i in range(steps):
        scale = 0.01 if i < blowup_at else 0.01 * 2.5 ** (i - blowup_at + 1)
        for k in w:
            w[k] = w[k] - scale * rng.normal(size=w[k].shape).astype(np.float32)
        guard.monitor(w, loss=2.0 * 0.98**i if i < blowup_at else 50.0 * i)


def _pngs(text: str) -> list[np.ndarray]:
    from matplotlib.image import imread

    out = []
    for b64 in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text):
        raw = base64.b64decode(b64)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(imread(io.BytesIO(raw), format="png"))
    return out


def test_report_from_the_guards_store(tmp_path: Path) -> None:
    guard = ZetaGuard(run_dir=tmp_path, run_name="rep", warmup_steps=15, auto_recover=False)
    _run(guard)
    guard.run_store.record_incident(50, "CRITICAL", {}, "layer1", 9, "rollback")
    guard.run_store.record_recovery(
        RecoveryReport(
            step=50,
            status="CRITICAL",
            actions=["rollback", "lr_cut"],
            lr_before=0.1,
            lr_after=0.01,
            message="restored",
        )
    )
    out = guard.generate_report()
    assert out == tmp_path / "rep" / "report.html"
    text = out.read_text()
    images = _pngs(text)
    assert len(images) == 3  # loss, zeta, per-layer heat map
    for img in images:
        assert img.shape[0] > 100
        assert img.shape[1] > 300
        assert img[..., :3].std() > 0.01  # something is drawn
    with RunReader(tmp_path / "rep") as r:
        steps = r.steps()
        incidents = r.incidents()
        alerts = r.alerts()
    n_crit = sum(s["status"] == "CRITICAL" for s in steps)
    assert n_crit > 0
    assert f"CRITICAL {n_crit}" in text
    assert f"{len(steps)} steps" in text
    # Every incident and alert row appears in its table.
    assert text.count("<td>rollback</td>") == 1
    assert text.count("rollback → lr_cut") == 1
    assert "<td>restored</td>" in text
    for a in alerts:
        assert f"<td>{a['start']}</td><td>{a['end']}</td>" in text
    assert len(incidents) >= 1


def test_report_from_a_runs_directory_and_without_a_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ZetaGuard(
        run_dir=tmp_path / "runs", run_name="only", warmup_steps=15, auto_recover=False
    )
    _run(writer, steps=30, blowup_at=100)
    writer._store.close()
    plain = ZetaGuard(warmup_steps=15)
    _run(plain, steps=30, blowup_at=100)
    out = plain.generate_report(path=tmp_path / "r.html", run_dir=tmp_path / "runs")
    text = out.read_text()
    assert "zetaguard report: only" in text
    assert "30 steps" in text
    assert len(_pngs(text)) == 3
    monkeypatch.chdir(tmp_path)
    bare = plain.generate_report()
    assert bare == Path("zetaguard_report.html")
    text = bare.read_text()
    assert "No run store" in text
    assert "data:image/png" not in text
    with pytest.raises(StoreError, match="does not exist"):
        plain.generate_report(run_dir=tmp_path / "nowhere")
    with pytest.raises(IsADirectoryError):
        plain.generate_report(path=tmp_path, run_dir=tmp_path / "runs")
