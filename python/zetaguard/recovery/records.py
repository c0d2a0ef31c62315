"""What the recovery manager writes down: reports, incidents, the log lines, the run store.

Each CRITICAL step ends in exactly one record: a :class:`zetaguard.RecoveryReport` when a
recovery (or a stop) answered it, else an incident that says why none did (a vetoed batch,
``auto_recover=False``, the cooldown). Both go to the log and, when the guard records a run, to
its store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from zetaguard.results import RecoveryReport, StabilityResult

log = logging.getLogger("zetaguard")


class RecordsHost(Protocol):
    """What the records need from the guard (``ZetaGuard`` is one)."""

    @property
    def step(self) -> int: ...
    @property
    def run_store(self) -> Any: ...
    def add_report(self, report: RecoveryReport) -> None: ...


class RecoveryRecords:
    """Writes one guard's recovery reports and incidents."""

    def __init__(self, guard: RecordsHost) -> None:
        self.guard = guard

    def report(
        self,
        result: StabilityResult | None,
        *,
        stopped: bool = False,
        actions: list[str] | None = None,
    ) -> RecoveryReport:
        return RecoveryReport(
            step=result.step if result is not None else max(self.guard.step - 1, 0),
            status=result.status if result is not None else "CRITICAL",
            actions=list(actions or []),
            worst_group=result.worst_group if result is not None else None,
            zeta_value=result.zeta_value if result is not None else 0.0,
            stopped=stopped,
        )

    def finish(
        self, report: RecoveryReport, result: StabilityResult | None, batch_index: int | None
    ) -> None:
        self.guard.add_report(report)
        action = ", ".join(report.actions) or "none"
        channels = dict(result.channels) if result is not None else {}
        self.store_incident(
            report.step, report.status, channels, report.worst_group, batch_index, action
        )
        log.warning(
            "zetaguard: step %d %s zeta=%.3f worst=%s%s -> %s (lr %s -> %s)%s",
            report.step,
            report.status,
            report.zeta_value,
            report.worst_group,
            "" if batch_index is None else f" batch={batch_index}",
            action,
            report.lr_before,
            report.lr_after,
            f"; {report.message}" if report.message else "",
        )
        store = self.guard.run_store
        if store is not None and hasattr(store, "record_recovery"):
            store.record_recovery(report)

    def incident(self, result: StabilityResult, batch_index: int | None, action: str) -> None:
        log.warning(  # the one log line of a CRITICAL step that no recovery answered
            "zetaguard: step %d CRITICAL zeta=%.3f worst=%s%s -> %s",
            result.step,
            result.zeta_value,
            result.worst_group,
            "" if batch_index is None else f" batch={batch_index}",
            action,
        )
        self.store_incident(
            result.step,
            result.status,
            dict(result.channels),
            result.worst_group,
            batch_index,
            action,
        )

    def store_incident(
        self,
        step: int,
        status: str,
        channels: Mapping[str, float],
        worst_group: str | None,
        batch_index: int | None,
        action: str,
    ) -> None:
        store = self.guard.run_store
        if store is not None and hasattr(store, "record_incident"):
            store.record_incident(
                step=step,
                status=status,
                channels=dict(channels),
                worst_group=worst_group,
                batch_index=batch_index,
                action=action,
            )
