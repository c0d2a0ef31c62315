"""Custom emergency protocols: what the guard runs on CRITICAL instead of its built-in ladder.

>>> from zetaguard import ZetaGuard
>>> from zetaguard.protocols import EmergencyProtocol
>>> class PageMe(EmergencyProtocol):
...     def execute(self, model, optimizer, guard):
...         report = super().execute(model, optimizer, guard)   # the built-in rung
...         self.notify_slack(f"run rolled back: {report.actions}")
...         return report
>>> guard = ZetaGuard(recovery_protocol=PageMe(webhook_url="https://hooks.slack.com/..."))

The guard still applies the ladder's cooldown and retry cap around ``execute`` (it counts each
call as one recovery and stops training past the cap), so a protocol cannot loop forever.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zetaguard.results import RecoveryReport

if TYPE_CHECKING:
    from zetaguard.guard import ZetaGuard

log = logging.getLogger("zetaguard")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Webhooks go to the configured URL only: a 3xx answer is a failed delivery, never a new
    address to send the run's status to."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_WEBHOOK_OPENER = urllib.request.build_opener(_NoRedirect)


class EmergencyProtocol:
    """Base class of custom recovery protocols.

    Args:
        webhook_url: a Slack incoming-webhook URL (or any endpoint taking ``{"text": ...}``
            JSON); :meth:`notify_slack` posts there. Default: ``$ZETAGUARD_SLACK_WEBHOOK``.
        timeout: seconds a notification may take before it is given up on.
        notify: post a summary of every recovery to the webhook from the default
            :meth:`execute`.
    """

    def __init__(
        self, webhook_url: str | None = None, *, timeout: float = 5.0, notify: bool = True
    ) -> None:
        self.webhook_url = webhook_url or os.environ.get("ZETAGUARD_SLACK_WEBHOOK")
        if self.webhook_url is not None and not self.webhook_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"webhook_url must be an http(s) URL, got {self.webhook_url!r}")
        self.timeout = float(timeout)
        self.notify = notify

    def execute(self, model: Any, optimizer: Any, guard: ZetaGuard) -> RecoveryReport | None:
        """Respond to a CRITICAL step. The default runs the guard's built-in ladder rung and,
        with a webhook configured, posts what it did. Override to do something else; return a
        :class:`RecoveryReport` (or None: the guard then records that this protocol ran)."""
        report = guard.recovery.run_ladder(guard.last_result)
        if self.notify and self.webhook_url:
            self.notify_slack(
                f"zetaguard: step {report.step} {report.status} (zeta {report.zeta_value:.2f}, "
                f"worst {report.worst_group}): {', '.join(report.actions) or 'no action'}"
            )
        return report

    def save_checkpoint(self, model: Any, path: str | os.PathLike[str]) -> str:
        """Write ``model``'s weights to ``path`` atomically: ``.safetensors`` as safetensors,
        anything else with ``torch.save`` of the state dict (``torch.load(weights_only=True)``).
        ``model`` is an ``nn.Module``, or a dict of tensors / NumPy arrays. Returns the path."""
        from zetaguard.checkpoint import save_safetensors, save_torch

        target = Path(path)
        tensors = _state_dict(model)
        if target.suffix == ".safetensors":
            save_safetensors(target, tensors)
        else:
            save_torch(target, tensors)
        return str(target)

    def notify_slack(self, message: str) -> bool:
        """POST ``{"text": message}`` as JSON to the webhook. Returns whether it was accepted
        (a 2xx answer); failures are logged, never raised, so a notification can not kill the
        run it reports on."""
        if not self.webhook_url:
            log.warning("zetaguard: notify_slack called without a webhook_url; message dropped")
            return False
        body = json.dumps({"text": message}).encode()
        request = urllib.request.Request(
            self.webhook_url,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with _WEBHOOK_OPENER.open(request, timeout=self.timeout) as response:
                ok = 200 <= int(response.status) < 300
        except (urllib.error.URLError, OSError, ValueError) as e:
            log.error("zetaguard: webhook notification failed: %s", e)
            return False
        if not ok:
            log.error("zetaguard: webhook answered %s", response.status)
        return ok


def _state_dict(model: Any) -> dict[str, Any]:
    state = getattr(model, "state_dict", None)
    if callable(state):
        return dict(state())
    if isinstance(model, dict):
        return dict(model)
    raise TypeError(
        f"save_checkpoint needs an nn.Module or a dict of tensors/arrays, got {type(model).__name__}"
    )
