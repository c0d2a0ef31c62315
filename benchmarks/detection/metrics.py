"""Ground truth and scoring of alarm sequences.

Collapse step (computed on the unguarded run; the guard only observes): with ``m_t`` the
median of the up-to-50 finite losses before step ``t`` and ``L0`` the median of the first 10
losses, the collapse step is the first ``t`` at or after the event step such that

* ``loss[t]`` is non-finite, or
* ``loss[t] > 3 m_t`` and ``loss[t] > m_t + 0.1 L0`` (the floor ignores noise on a loss that
  is already near zero), and the median of ``loss[t : t+10]`` (non-finite counting as
  infinite) is above ``2 m_t`` — the loss stays up rather than spiking once (a run that ends
  within 10 steps with finite losses cannot show that, so no collapse is called there).

A run of an unstable family with no such step recovered by itself; it is reported but left
out of recall and lead time. Stable runs must have no collapse step at all.

An alarm counts for an unstable run if its first alarm (at the level in question) lies in
``[event_step, collapse_step]``; the lead time is ``collapse_step - first_alarm``. Alarms
before the event step are false alarms on healthy steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scenarios import Trace


def collapse_step(loss: np.ndarray, start: int = 1) -> int | None:
    finite = np.isfinite(loss)
    if not finite[:10].any():
        return 0
    l0 = float(np.median(loss[:10][finite[:10]]))
    for t in range(max(1, start), len(loss)):
        if not finite[t]:
            return t
        past = loss[max(0, t - 50) : t]
        past = past[np.isfinite(past)]
        if len(past) == 0:
            continue
        m = float(np.median(past))
        if loss[t] > 3 * m and loss[t] > m + 0.1 * l0:
            ahead = np.where(np.isfinite(loss[t : t + 10]), loss[t : t + 10], math.inf)
            if len(ahead) < 10 and np.isfinite(ahead).all():
                continue  # the run ends before the loss could show it stays up
            if float(np.median(ahead)) > 2 * m:
                return t
    return None


@dataclass
class FamilyScore:
    runs: int = 0
    collapsed: int = 0
    any_hits: int = 0
    critical_hits: int = 0
    any_leads: list[int] = field(default_factory=list)
    critical_leads: list[int] = field(default_factory=list)
    healthy_steps: int = 0
    drift_alarms: int = 0
    critical_alarms: int = 0
    runs_with_critical: int = 0


def score_run(trace: Trace, levels: np.ndarray, score: FamilyScore) -> None:
    score.runs += 1
    healthy_end = trace.steps if trace.stable else int(trace.event_step or 0)
    healthy = levels[:healthy_end]
    score.healthy_steps += len(healthy)
    score.drift_alarms += int((healthy == 1).sum())
    score.critical_alarms += int((healthy == 2).sum())
    score.runs_with_critical += int((healthy == 2).any())
    if trace.stable:
        return
    event = int(trace.event_step or 0)
    collapse = collapse_step(trace.loss, event)
    if collapse is None:
        return
    score.collapsed += 1
    window = levels[event : collapse + 1]
    for level, hits, leads in (
        (1, "any_hits", "any_leads"),
        (2, "critical_hits", "critical_leads"),
    ):
        idx = np.flatnonzero(window >= level)
        if len(idx):
            setattr(score, hits, getattr(score, hits) + 1)
            getattr(score, leads).append(int(collapse - (event + idx[0])))
