"""Detection scenario suite: record real trainings once, replay every detector, print the table.

    .venv/bin/python benchmarks/detection/run_suite.py            # whole suite (5 seeds)
    .venv/bin/python benchmarks/detection/run_suite.py --quick    # 1 seed per family
    ... --plots docs/img    # PNGs of representative runs
    ... --cache /tmp/traces.pkl   # reuse recorded runs (tuning the detector needs no retraining)

The held-out family (default ``gan-2d``) was not looked at while tuning the detector's
constants; its line shows what generalises.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import FamilyScore, collapse_step, score_run
from peers import DETECTORS
from scenarios import STABLE_FAMILIES, UNSTABLE_FAMILIES, Trace

HELD_OUT = "gan-2d"
# A family is gradual when its median event-to-collapse gap is at least this many steps.
GRADUAL_GAP = 10
PEERS_ONLY = (
    "zclip",
    "lightning-spike",
    "olmo-skip",
    "kill-loss-spike",
    "megatron-10x",
    "grad-norm>10",
    "terminate-nan",
)


def record_all(seeds: int) -> list[Trace]:
    traces = []
    for name, fn in {**STABLE_FAMILIES, **UNSTABLE_FAMILIES}.items():
        t0 = time.perf_counter()
        for seed in range(seeds):
            traces.append(fn(seed))
        print(
            f"  recorded {name:<18} {seeds} run(s) in {time.perf_counter() - t0:5.1f} s", flush=True
        )
    return traces


def evaluate(traces: list[Trace]) -> dict[str, dict[str, FamilyScore]]:
    scores: dict[str, dict[str, FamilyScore]] = {}
    for det, (fn, _) in DETECTORS.items():
        per = scores.setdefault(det, {})
        for tr in traces:
            score_run(tr, fn(tr), per.setdefault(tr.family, FamilyScore()))
    return scores


def live_matches_replay(traces: list[Trace]) -> int:
    """Steps where the live guard's status differs from the replayed detector's."""
    from peers import LEVEL, zetaguard_levels

    return sum(
        int((zetaguard_levels(t) != np.array([LEVEL[s] for s in t.live_status])).sum())
        for t in traces
    )


def gaps(traces: list[Trace], family: str) -> list[int]:
    out = []
    for t in traces:
        if t.family == family:
            c = collapse_step(t.loss, int(t.event_step or 0))
            if c is not None:
                out.append(c - int(t.event_step or 0))
    return out


def _merge(parts: list[FamilyScore]) -> FamilyScore:
    out = FamilyScore()
    for p in parts:
        for k, v in vars(p).items():
            setattr(out, k, getattr(out, k) + v)
    return out


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:5.1f}%" if d else "   - "


def _med(xs: list[int]) -> str:
    return f"{float(np.median(xs)):5.1f}" if xs else "   - "


def _per_k(n: int, d: int) -> str:
    return f"{1000.0 * n / d:6.2f}" if d else "    - "


def summary(
    scores: dict[str, dict[str, FamilyScore]], families: list[str]
) -> dict[str, FamilyScore]:
    return {det: _merge([per[f] for f in families if f in per]) for det, per in scores.items()}


def print_tables(traces: list[Trace], scores: dict[str, dict[str, FamilyScore]]) -> None:
    stable = [f for f in STABLE_FAMILIES if any(t.family == f for t in traces)]
    unstable = [f for f in UNSTABLE_FAMILIES if any(t.family == f for t in traces)]
    tuned = [f for f in unstable if f != HELD_OUT]
    gradual = [f for f in unstable if gaps(traces, f) and np.median(gaps(traces, f)) >= GRADUAL_GAP]
    steps_stable = sum(t.steps for t in traces if t.stable)
    print(
        f"\nstable runs: {sum(t.stable for t in traces)} ({steps_stable} steps); unstable runs: "
        f"{sum(not t.stable for t in traces)}"
    )
    print(
        "ground truth per unstable family: runs that collapsed / runs, median steps from the "
        "event to the collapse"
    )
    for f in unstable:
        g = gaps(traces, f)
        runs = sum(t.family == f for t in traces)
        print(f"  {f:<18} {len(g)}/{runs}  {_med(g)}{'  (gradual)' if f in gradual else ''}")
    bad = [t for t in traces if t.stable and collapse_step(t.loss) is not None]
    if bad:
        print(f"  WARNING: {len(bad)} stable run(s) meet the collapse definition")

    header = (
        f"{'detector':<16} {'recall':>7} {'CRIT':>7} {'lead grad':>9} {'lead sud':>8} "
        f"{'DRIFT/1k':>8} {'CRIT/1k':>8} {'runs w/ CRIT':>12}"
    )
    for title, fams, healthy in (
        ("unstable families used for tuning; false alarms on the stable families", tuned, stable),
        (
            f"held-out family {HELD_OUT}; false alarms on its own pre-event steps",
            [f for f in unstable if f == HELD_OUT],
            [HELD_OUT],
        ),
    ):
        if not fams:
            continue
        print(f"\n== {title} ==")
        print(header)
        unst = summary(scores, fams)
        st = summary(scores, healthy)
        gr = summary(scores, [f for f in fams if f in gradual])
        su = summary(scores, [f for f in fams if f not in gradual])
        for det in scores:
            u, s = unst[det], st[det]
            print(
                f"{det:<16} {_pct(u.any_hits, u.collapsed):>7} {_pct(u.critical_hits, u.collapsed):>7} "
                f"{_med(gr[det].any_leads):>9} {_med(su[det].any_leads):>8} "
                f"{_per_k(s.drift_alarms, s.healthy_steps):>8} {_per_k(s.critical_alarms, s.healthy_steps):>8} "
                f"{s.runs_with_critical:>5}/{s.runs:<6}"
            )
    print(
        "\nrecall = any alarm (DRIFT or CRITICAL) in [event, collapse]; CRIT = a CRITICAL there; "
        "lead = collapse - first alarm, median over runs (grad = gradual families "
        f"{', '.join(gradual) or 'none'}; sud = the others); x/1k = alarms per 1,000 healthy steps; "
        "runs w/ CRIT = healthy runs with any CRITICAL"
    )

    print("\n== per family: any-alarm hits / collapsed runs, median lead (steps) ==")
    print(f"{'detector':<16} " + " ".join(f"{f[:14]:>14}" for f in unstable))
    for det, per in scores.items():
        cells = []
        for f in unstable:
            s = per[f]
            cells.append(f"{s.any_hits}/{s.collapsed} {_med(s.any_leads).strip():>5}")
        print(f"{det:<16} " + " ".join(f"{c:>14}" for c in cells))
    print("\n== per stable family: DRIFT / CRITICAL alarms per 1,000 steps ==")
    print(f"{'detector':<16} " + " ".join(f"{f[:17]:>17}" for f in stable))
    for det, per in scores.items():
        cells = [
            f"{_per_k(per[f].drift_alarms, per[f].healthy_steps).strip()}/"
            f"{_per_k(per[f].critical_alarms, per[f].healthy_steps).strip()}"
            for f in stable
        ]
        print(f"{det:<16} " + " ".join(f"{c:>17}" for c in cells))
    print_targets(scores, stable, tuned, gradual)
    print("\npeers: " + "; ".join(f"{k}: {v}" for k, (_, v) in DETECTORS.items()))


def print_targets(
    scores: dict[str, dict[str, FamilyScore]],
    stable: list[str],
    tuned: list[str],
    gradual: list[str],
) -> None:
    zg = scores["zetaguard"]
    st = _merge([zg[f] for f in stable])
    un = _merge([zg[f] for f in tuned])
    print("\n== targets (zetaguard default, tuning families) ==")
    rows = [
        ("CRITICAL on stable runs = 0", st.critical_alarms, st.critical_alarms == 0),
        (
            "DRIFT <= 0.5% of stable steps",
            f"{_pct(st.drift_alarms, st.healthy_steps).strip()}",
            st.drift_alarms <= 0.005 * st.healthy_steps,
        ),
        (
            "recall (any alarm) >= 98%",
            _pct(un.any_hits, un.collapsed).strip(),
            un.any_hits >= 0.98 * un.collapsed,
        ),
        (
            "CRITICAL before collapse >= 90%",
            _pct(un.critical_hits, un.collapsed).strip(),
            un.critical_hits >= 0.90 * un.collapsed,
        ),
    ]
    for f in tuned:
        best = max(
            (np.median(scores[p][f].any_leads) for p in PEERS_ONLY if scores[p][f].any_leads),
            default=-1.0,
        )
        ours = float(np.median(zg[f].any_leads)) if zg[f].any_leads else -math.inf
        if f in gradual:
            ok = ours >= 5 and ours >= 2 * best
            rows.append((f"{f}: lead >= 5 and >= 2x best peer ({best:.1f})", f"{ours:.1f}", ok))
        else:
            rows.append((f"{f}: lead >= best peer ({best:.1f})", f"{ours:.1f}", ours >= best))
    for name, value, ok in rows:
        print(f"  {'met   ' if ok else 'MISSED'}  {name:<48} {value}")


def plots(traces: list[Trace], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from peers import zetaguard_levels
    from zetaguard.detector import Detector

    out.mkdir(parents=True, exist_ok=True)
    wanted = ["transformer-adamw", "lr-ramp", "exploding-tanh", "corrupt-once", "gan-2d", "mlp-sgd"]
    written = []
    for fam in wanted:
        tr = next((t for t in traces if t.family == fam), None)
        if tr is None:
            continue
        det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=50)
        zeta = np.array(
            [
                det.observe(
                    tr.rows[t],
                    int(tr.history[t]),
                    loss=float(tr.loss[t]),
                    grad_norm=float(tr.grad_norm[t]),
                ).zeta_value
                for t in range(tr.steps)
            ]
        )
        levels = zetaguard_levels(tr)
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        a1.semilogy(np.where(np.isfinite(tr.loss), tr.loss, np.nan), lw=0.8, color="k")
        a1.set_ylabel("loss")
        a1.set_title(f"{fam} (seed {tr.seed})")
        a2.plot(np.minimum(np.where(np.isfinite(zeta), zeta, 5.0), 5.0), lw=0.8, label="zeta")
        a2.axhline(0.707, color="orange", ls="--", lw=0.8)
        a2.axhline(1.414, color="red", ls="--", lw=0.8)
        a2.set_ylabel("zeta (clipped at 5)")
        for ax in (a1, a2):
            if tr.event_step is not None:
                ax.axvline(tr.event_step, color="grey", ls=":", lw=1)
            c = collapse_step(tr.loss, int(tr.event_step or 0)) if not tr.stable else None
            if c is not None:
                ax.axvline(c, color="purple", ls="-", lw=1)
        for lvl, col in ((1, "orange"), (2, "red")):
            idx = np.flatnonzero(levels == lvl)
            a2.scatter(idx, np.full(len(idx), -0.1), s=4, color=col, marker="|")
        a2.set_xlabel("step (grey: event, purple: collapse; ticks: DRIFT/CRITICAL)")
        fig.tight_layout()
        path = out / f"detection_{fam}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, dict[str, FamilyScore]]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one seed per family (smoke run)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache", type=Path, help="pickle of recorded traces to reuse or create")
    ap.add_argument("--plots", type=Path, help="write PNGs of representative runs here")
    ap.add_argument(
        "--mode",
        choices=("auto", "exact", "sketch"),
        default="auto",
        help="the live guard's engine mode (default auto: tiered monitoring)",
    )
    args = ap.parse_args(argv)
    import scenarios

    scenarios.GUARD_MODE = args.mode
    print(f"live guard: ZetaGuard(mode={args.mode!r})")
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    t0, c0 = time.perf_counter(), time.process_time()
    if args.cache is not None and args.cache.exists():
        with open(args.cache, "rb") as f:
            traces: list[Trace] = pickle.load(f)
        print(f"loaded {len(traces)} recorded runs from {args.cache}")
    else:
        print(
            f"recording {len(STABLE_FAMILIES) + len(UNSTABLE_FAMILIES)} families x {seeds} seed(s)"
        )
        traces = record_all(seeds)
        if args.cache is not None:
            from zetaguard._atomic import atomic_write

            atomic_write(args.cache, lambda f: pickle.dump(traces, f))
    scores = evaluate(traces)
    print_tables(traces, scores)
    zg = scores["zetaguard"]
    print(
        "\nzetaguard per unstable family: collapsed, any-alarm hits, CRITICAL hits, "
        "any-alarm leads, CRITICAL leads"
    )
    for f in UNSTABLE_FAMILIES:
        if f in zg:
            s = zg[f]
            print(
                f"  {f:<18} {s.collapsed} {s.any_hits} {s.critical_hits} "
                f"{list(s.any_leads)} {list(s.critical_leads)}"
            )
    mismatch = live_matches_replay(traces)
    print(
        f"\nlive guard vs replayed detector: {mismatch} step(s) differ"
        + ("" if mismatch == 0 else " (recorded with another detector version?)")
    )
    if args.plots is not None:
        for p in plots(traces, args.plots):
            print(f"wrote {p}")
    # CPU time is what an idle machine would take; wall time also counts other load on the box
    print(
        f"\nsuite time: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU"
    )
    return scores


if __name__ == "__main__":
    main()
