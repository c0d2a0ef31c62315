"""End to end: a real torch training process writes a run store, the dashboard serves it, and
headless Chromium (Debian's ``chromium``, driven by Playwright) sees the chart grow and an alert
appear. Install the browser with ``scripts/system-deps.sh``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.dashboard import dashboard, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

TRAINER = textwrap.dedent(
    """
    import pathlib, sys, time, torch
    from zetaguard import ZetaGuard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = ZetaGuard(run_dir=sys.argv[1], run_name="live", warmup_steps=20, auto_recover=False)
    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    go = pathlib.Path(sys.argv[2])
    for step in range(400):
        if step == 40:  # wait until the page shows the run, so it sees the rest arrive live
            deadline = time.monotonic() + 180
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if step == 160:  # a learning-rate blow-up, as from a bad schedule
            for g in opt.param_groups:
                g["lr"] = 5.0
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.monitor(model, loss=loss)
        time.sleep(0.04)
    guard.close()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: run scripts/system-deps.sh")
def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    runs = tmp_path / "runs"
    runs.mkdir()
    go = tmp_path / "go"
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(runs), str(go)], env=os.environ.copy()
    )
    try:
        wait_for(lambda: (runs / "live" / "run.sqlite").is_file(), 60, "the run store")
        with dashboard(runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # The page must work under the server's Content-Security-Policy: any violation
            # (an inline script or style, an eval, a foreign fetch) is an error here.
            page.on(
                "console",
                lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
            )
            page.add_init_script(
                "document.addEventListener('securitypolicyviolation', e => "
                "console.error('Content Security Policy violation: ' + e.violatedDirective))"
            )
            response = page.goto(url + "/")
            assert response is not None
            assert "script-src 'self'" in response.headers["content-security-policy"]
            points = "() => Number(document.getElementById('chart-zeta').dataset.points || 0)"
            # Predicates as functions, not expressions: Playwright evaluates an expression with
            # eval() inside the page, which the page's CSP (rightly) forbids.
            page.wait_for_function(f"() => ({points})() > 0", timeout=60_000)
            first = page.evaluate(points)
            go.touch()  # the trainer resumes: the chart must now grow live
            page.wait_for_function(f"() => ({points})() > {first} + 20", timeout=60_000)
            assert page.locator("#live").inner_text() == "live"
            page.wait_for_selector(
                "#alerts tbody tr.CRITICAL, #alerts tbody tr.DRIFT", timeout=90_000
            )
            page.wait_for_selector("#status-badge.CRITICAL, #status-badge.DRIFT", timeout=30_000)
            page.wait_for_selector("#recommendations li", timeout=30_000)
            assert page.locator("#groups .group").count() >= 2  # both Linear layers
            page.wait_for_timeout(1500)  # let the chart take a few more steps before the picture
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        assert not errors, errors
        print(f"screenshot: {shot}")
    finally:
        trainer.kill()
        trainer.wait()


# A digits MLP whose learning rate jumps x300 at step 120: the guard rolls it back to a stable
# snapshot. This loop counts steps of the weights it holds, so after the rollback it numbers
# its steps from the restored one again: the store then holds those step numbers twice.
REWINDING_TRAINER = textwrap.dedent(
    """
    import pathlib, sys, time, torch
    from sklearn.datasets import load_digits
    from zetaguard import ZetaGuard
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = ZetaGuard(
        warmup_steps=50, model=model, optimizer=opt, run_dir=sys.argv[1], run_name="rewind"
    )
    go = pathlib.Path(sys.argv[2])
    batches = torch.Generator().manual_seed(0)
    step, i = 0, 0
    while step < 200:
        if i == 40:  # wait until the page shows the run: the rollback then arrives live
            deadline = time.monotonic() + 180
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if i == 120:
            for g in opt.param_groups:
                g["lr"] *= 300
        idx = torch.randint(0, len(x), (64,), generator=batches)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        seen = len(guard.recovery_reports)
        guard.monitor(model, loss=loss, step=step)
        step, i = step + 1, i + 1
        for report in guard.recovery_reports[seen:]:
            if report.restored_step is not None:
                step = report.restored_step + 1
        time.sleep(0.02)
    guard.close()
    """
)


def _texts(page: object, selector: str) -> list[str]:
    return list(page.locator(selector).all_inner_texts())  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: run scripts/system-deps.sh")
def test_rollback_drawn_once_in_step_order(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright
    from zetaguard.store import RunReader

    runs = tmp_path / "runs"
    runs.mkdir()
    go = tmp_path / "go"
    trainer = subprocess.Popen(
        [sys.executable, "-c", REWINDING_TRAINER, str(runs), str(go)], env=os.environ.copy()
    )
    try:
        wait_for(lambda: (runs / "rewind" / "run.sqlite").is_file(), 90, "the run store")
        with dashboard(runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/?run=rewind")
            page.wait_for_function(
                "() => Number(document.getElementById('chart-zeta').dataset.points || 0) > 0",
                timeout=60_000,
            )
            go.touch()  # the rest of the run, the rollback included, arrives over the stream
            assert trainer.wait(timeout=240) == 0
            page.wait_for_function(
                "() => document.getElementById('chart-zeta').dataset.steps.endsWith(',199')",
                timeout=30_000,
            )
            page.wait_for_timeout(1500)  # one more poll: nothing may arrive twice
            shot = tmp_path / "rollback.png"
            page.screenshot(path=str(shot), full_page=True)
            charts = {
                name: page.evaluate(
                    f"() => ({{...document.getElementById('chart-{name}').dataset}})"
                )
                for name in ("zeta", "loss", "norms")
            }
            alerts = _texts(page, "#alerts tbody tr")
            recs = _texts(page, "#recommendations li")
            incidents = _texts(page, "#incidents li")
            layers = _texts(page, "#groups .name")
            browser.close()
        with RunReader(runs / "rewind") as r:
            stored = [s["step"] for s in r.steps()]
            recoveries = r.recoveries()
            stored_recs = r.recommendations()
            stored_alerts = r.alerts()
        # The store holds the replayed steps twice (the case the page must untangle).
        (rec,) = recoveries
        restored = rec["report"]["restored_step"]
        assert restored is not None
        assert rec["step"] > restored
        assert len(stored) > len(set(stored)) == 200
        for name, data in charts.items():
            steps = [int(s) for s in data["steps"].split(",")]
            assert steps == list(range(200)), name  # one point per step, in step order
            assert data["rollbacks"] == f"{rec['step']}>{restored}", name
            assert int(data["abandoned"]) == len(stored) - 200, name
        # One row per event, none twice.
        assert len(incidents) == 1, incidents
        assert "recovery rollback to step" in incidents[0]
        assert "CRITICAL" in incidents[0]
        assert len(recs) == len(set(recs)) == len(stored_recs) > 0
        assert len(alerts) == len(set(alerts)) == len(stored_alerts) > 0
        # Layers named by module path and what the module is.
        assert sorted(layers) == ["0 (Linear 64->128)", "2 (Linear 128->64)", "4 (Linear 64->10)"]
        assert not errors, errors
        print(f"screenshot: {shot}")
    finally:
        trainer.kill()
        trainer.wait()
