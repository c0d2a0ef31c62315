"""``guard.generate_report()``: one self-contained HTML file with PNG plots (matplotlib) of a
run: loss, zeta against the thresholds, a per-layer zeta heat map, and the incidents and
recovery actions, read from the run store.

The PNGs are embedded as data URIs, so the report is one file that can be mailed or attached to
a ticket. Matplotlib is used through its object API with the Agg canvas: no pyplot, no global
backend switch in the user's process.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from zetaguard._atomic import atomic_write
from zetaguard.results import RecoveryReport
from zetaguard.store import DB_NAME, RunReader, RunStore, StoreError, find_runs


class ReportSource(Protocol):
    """What the report reads from a guard (``ZetaGuard`` is one)."""

    @property
    def run_store(self) -> RunStore | None: ...
    @property
    def recovery_reports(self) -> list[RecoveryReport]: ...
    def get_statistics(self) -> dict[str, Any]: ...


STATUS_COLORS = {"STABLE": "#059669", "DRIFT": "#d97706", "CRITICAL": "#dc2626"}


def _resolve_run(guard: ReportSource | None, run_dir: str | os.PathLike[str] | None) -> Path | None:
    if run_dir is not None:
        p = Path(run_dir)
        if p.is_file():
            return p
        if (p / DB_NAME).is_file():
            return p / DB_NAME
        runs = find_runs(p)  # raises StoreError naming the directory when it is missing
        if not runs:
            raise StoreError(f"no run store under {str(p)!r}")
        return runs[0]
    store = guard.run_store if guard is not None else None
    if store is not None:
        store.flush()
        return Path(store.path)
    return None


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(height: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(10, height), layout="constrained")


def _as_array(values: Sequence[float | None]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _loss_plot(steps: list[int], loss: np.ndarray[Any, np.dtype[np.float64]]) -> str | None:
    if not np.isfinite(loss).any():
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="#2563eb", lw=1.2)
    if np.nanmin(loss) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    return _png(fig)


def _zeta_plot(
    steps: list[int],
    zeta: np.ndarray[Any, np.dtype[np.float64]],
    status: list[str],
    thresholds: tuple[float, float],
    incidents: list[dict[str, Any]],
    recoveries: list[dict[str, Any]],
) -> str:
    fig = _figure(3.4)
    ax = fig.add_subplot()
    x = np.asarray(steps)
    finite = np.isfinite(zeta)
    top = max(float(np.nanmax(zeta[finite])) if finite.any() else 0.0, thresholds[1]) * 1.1
    shown = np.where(finite, zeta, top)  # a non-finite zeta is drawn at the top edge
    ax.plot(x, shown, color="#334155", lw=1.0, label="zeta")
    for name in ("DRIFT", "CRITICAL"):
        mask = np.array([s == name for s in status])
        if mask.any():
            ax.scatter(x[mask], shown[mask], s=10, color=STATUS_COLORS[name], label=name, zorder=3)
    ax.axhline(thresholds[0], color=STATUS_COLORS["DRIFT"], ls="--", lw=1, label="drift threshold")
    ax.axhline(
        thresholds[1], color=STATUS_COLORS["CRITICAL"], ls="--", lw=1, label="snap threshold"
    )
    for i, rec in enumerate(recoveries):
        ax.axvline(
            rec["step"], color="#7c3aed", lw=1, alpha=0.7, label="recovery" if i == 0 else None
        )
    if incidents:
        ax.scatter(
            [i["step"] for i in incidents],
            [top * 0.98] * len(incidents),
            marker="v",
            color="#7c3aed",
            s=18,
            label="incident",
            zorder=4,
        )
    ax.set_ylim(0, top * 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("zeta")
    ax.set_title("Calibrated stability score (non-finite values drawn at the top)")
    ax.legend(loc="upper left", fontsize=8, ncols=3)
    ax.grid(alpha=0.3)
    return _png(fig)


def _heatmap(
    steps: list[int], names: list[str], matrix: np.ndarray[Any, np.dtype[np.float64]]
) -> str | None:
    if not names or not steps:
        return None
    from matplotlib.colors import LinearSegmentedColormap

    shown = names[:40]  # the layers with the highest peak zeta when there are more
    if len(names) > 40:
        peaks = np.nan_to_num(matrix, nan=np.inf).max(axis=1)
        keep = np.argsort(-peaks)[:40]
        shown = [names[i] for i in keep]
        matrix = matrix[keep]
    cmap = LinearSegmentedColormap.from_list(
        "zeta", ["#ecfdf5", "#fde68a", "#dc2626"]
    ).with_extremes(bad="#111827")  # non-finite zeta: black
    fig = _figure(max(2.2, 0.28 * len(shown) + 1.2))
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(matrix)
    im = ax.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=0.0,
        vmax=2.0,
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(shown) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(shown)), shown, fontsize=8)
    ax.set_xlabel("step")
    ax.set_title("Per-layer zeta (colour saturates at 2.0; black: non-finite)")
    fig.colorbar(im, ax=ax, label="zeta")
    return _png(fig)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "<p class='empty'>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return " → ".join(str(x) for x in v)
    return str(v)


_CSS = """
body{font:14px system-ui,sans-serif;color:#0f172a;max-width:1100px;margin:24px auto;padding:0 16px}
h1{font-size:22px} h2{font-size:16px;margin-top:28px;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;font-size:13px;width:100%} td,th{padding:3px 8px;text-align:left;
border-bottom:1px solid #f1f5f9} img{max-width:100%} .empty{color:#94a3b8}
.s-STABLE{color:#059669}.s-DRIFT{color:#d97706}.s-CRITICAL{color:#dc2626;font-weight:600}
"""


def _render(title: str, sections: list[str]) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>"
    )


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f"<p class='empty'>{html.escape(alt)}: no data</p>"
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def generate_report(
    guard: ReportSource | None = None,
    path: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write an HTML report and return its path.

    The history comes from ``run_dir`` (a run's directory or ``run.sqlite``, or a directory of
    runs: the newest is used) or else from the guard's own run store (``ZetaGuard(run_dir=...)``).
    A guard without a store gets a report of its statistics and recoveries only, saying how to
    get the plots. ``path`` defaults to ``report.html`` beside the run store, else
    ``./zetaguard_report.html``.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "generate_report() needs matplotlib: pip install 'zetaguard[reports]'"
        ) from e
    db = _resolve_run(guard, run_dir)
    sections: list[str] = []
    title = "zetaguard report"
    if guard is not None:
        stats = guard.get_statistics()
        counts = stats["status_counts"]
        sections.append(
            "<h2>Summary (this guard)</h2>"
            + _table(
                ["steps", "STABLE", "DRIFT", "CRITICAL", "max zeta", "recoveries", "engine"],
                [
                    [
                        stats["steps"],
                        counts["STABLE"],
                        counts["DRIFT"],
                        counts["CRITICAL"],
                        float(stats["zeta_max"]),
                        stats["recoveries"],
                        f"{stats['engine']['mode']} / {stats['engine']['isa']}",
                    ]
                ],
            )
        )
    if db is None:
        sections.append(
            "<p>No run store: create the guard with <code>ZetaGuard(run_dir=...)</code> (or pass "
            "<code>run_dir=</code>) for plots of the whole run.</p>"
        )
        reports = [r.to_dict() for r in guard.recovery_reports] if guard is not None else []
        sections.append(
            "<h2>Recoveries</h2>"
            + _table(
                ["step", "status", "actions", "lr before", "lr after", "message"],
                [
                    [
                        r["step"],
                        r["status"],
                        r["actions"],
                        r["lr_before"],
                        r["lr_after"],
                        r["message"],
                    ]
                    for r in reports
                ],
            )
        )
    else:
        with RunReader(db) as reader, reader.consistent() as r:
            title = f"zetaguard report: {r.name}"
            meta = r.meta()
            config = meta.get("config") or {}
            rows = r.steps()
            group_steps, group_names, matrix = r.group_matrix()
            incidents = r.incidents()
            recoveries = r.recoveries()
            recs = r.recommendations()
            alerts = r.alerts()
        thresholds = (
            float(config.get("drift_threshold", 0.707)),
            float(config.get("snap_threshold", 1.414)),
        )
        steps = [int(s["step"]) for s in rows]
        status = [str(s["status"]) for s in rows]
        zeta = np.array([math.inf if s["zeta"] is None else s["zeta"] for s in rows], dtype=float)
        loss = _as_array([s["loss"] for s in rows])
        n = {k: status.count(k) for k in STATUS_COLORS}
        sections.append(
            f"<p>Run store <code>{html.escape(str(db))}</code>, {len(rows)} steps "
            f"(STABLE {n['STABLE']}, DRIFT {n['DRIFT']}, CRITICAL {n['CRITICAL']}), "
            f"thresholds {thresholds[0]} / {thresholds[1]}; generated "
            f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>"
        )
        if rows:
            sections.append("<h2>Loss</h2>" + _img(_loss_plot(steps, loss), "loss"))
            sections.append(
                "<h2>Stability</h2>"
                + _img(_zeta_plot(steps, zeta, status, thresholds, incidents, recoveries), "zeta")
            )
            sections.append(
                "<h2>Layers</h2>" + _img(_heatmap(group_steps, group_names, matrix), "heat map")
            )
        sections.append(
            "<h2>Alerts</h2>"
            + _table(
                ["first step", "last step", "steps", "worst status", "peak zeta"],
                [[a["start"], a["end"], a["steps"], a["status"], a["peak"]] for a in alerts],
            )
        )
        sections.append(
            "<h2>Incidents and actions</h2>"
            + _table(
                ["step", "status", "worst layer", "batch", "action"],
                [
                    [i["step"], i["status"], i["worst_group"], i["batch_index"], i["action"]]
                    for i in incidents
                ],
            )
        )
        sections.append(
            "<h2>Recoveries</h2>"
            + _table(
                ["step", "status", "actions", "lr before", "lr after", "restored step", "message"],
                [
                    [
                        x["step"],
                        x["status"],
                        x["actions"],
                        x["report"].get("lr_before"),
                        x["report"].get("lr_after"),
                        x["report"].get("restored_step"),
                        x["report"].get("message"),
                    ]
                    for x in recoveries
                ],
            )
        )
        sections.append(
            "<h2>Recommendations</h2>"
            + _table(
                ["step", "status", "advice"], [[x["step"], x["status"], x["text"]] for x in recs]
            )
        )
    if path is not None:
        out = Path(path)
    elif db is not None:
        out = db.parent / "report.html"
    else:
        out = Path("zetaguard_report.html")
    if out.is_dir():
        raise IsADirectoryError(f"report path {str(out)!r} is a directory; pass a file name")
    document = _render(title, sections).encode("utf-8")
    atomic_write(out, lambda f: f.write(document))
    return out
