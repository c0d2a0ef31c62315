"""Custom emergency protocols and the webhook notification, against a loopback HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from zetaguard import RecoveryReport, ZetaGuard
from zetaguard.protocols import EmergencyProtocol


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        type(self).received.append(
            {"content_type": self.headers["Content-Type"], "json": json.loads(body)}
        )
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"received": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


def test_notify_slack_posts_json_to_the_webhook(webhook: tuple[str, type[_Hook]]) -> None:
    url, hook = webhook
    assert EmergencyProtocol(url).notify_slack("run 7 rolled back at step 120")
    assert hook.received == [
        {"content_type": "application/json", "json": {"text": "run 7 rolled back at step 120"}}
    ]


def test_notify_slack_failure_is_reported_not_raised(webhook: tuple[str, type[_Hook]]) -> None:
    url, hook = webhook
    hook.status = 500
    assert EmergencyProtocol(url).notify_slack("x") is False
    # Nothing listens on this port once the server is closed: a connection error.
    closed = HTTPServer(("127.0.0.1", 0), _Hook)
    port = closed.server_address[1]
    closed.server_close()
    assert EmergencyProtocol(f"http://127.0.0.1:{port}/", timeout=2).notify_slack("x") is False
    assert EmergencyProtocol(None).notify_slack("x") is False


def test_bad_webhook_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="http"):
        EmergencyProtocol("ftp://example.org/hook")


def test_custom_protocol_runs_on_critical_with_model_optimizer_and_guard() -> None:
    calls: list[tuple[Any, Any, ZetaGuard]] = []

    class Record(EmergencyProtocol):
        def execute(self, model: Any, optimizer: Any, guard: ZetaGuard) -> RecoveryReport | None:
            calls.append((model, optimizer, guard))
            return None

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = ZetaGuard(model=model, optimizer=opt, recovery_protocol=Record())
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    guard.monitor()
    assert calls == [(model, opt, guard)]
    assert guard.recovery_triggered
    assert guard.recovery_reports[0].actions == ["protocol Record"]
    assert opt.param_groups[0]["lr"] == 0.1  # the protocol replaced the built-in ladder


def test_default_protocol_runs_the_ladder_and_notifies(webhook: tuple[str, type[_Hook]]) -> None:
    url, hook = webhook
    w = np.ones(8)
    guard = ZetaGuard(recovery_protocol=EmergencyProtocol(url))
    guard.monitor([w])
    w[:] = np.nan
    guard.monitor([w])
    report = guard.recovery_reports[0]
    assert report.restored_step == 0
    np.testing.assert_array_equal(w, np.ones(8))  # rolled back in place
    assert len(hook.received) == 1
    assert "rollback to step 0" in hook.received[0]["json"]["text"]


def test_a_protocol_calling_emergency_protocol_does_not_recurse() -> None:
    class Nested(EmergencyProtocol):
        def execute(self, model: Any, optimizer: Any, guard: ZetaGuard) -> RecoveryReport | None:
            return guard.emergency_protocol()

    w = np.ones(4)
    guard = ZetaGuard(recovery_protocol=Nested())
    guard.monitor([w])
    w[:] = np.inf
    guard.monitor([w])
    assert np.all(w == 1.0)
    assert len(guard.recovery_reports) >= 1


def test_protocol_save_checkpoint_formats(tmp_path: Any) -> None:
    from safetensors.numpy import load_file

    model = torch.nn.Linear(3, 2)
    proto = EmergencyProtocol()
    pt = proto.save_checkpoint(model, tmp_path / "m.pt")
    loaded = torch.load(pt, weights_only=True)
    assert torch.equal(loaded["weight"], model.weight.detach())
    st = proto.save_checkpoint(model, tmp_path / "m.safetensors")
    np.testing.assert_array_equal(load_file(st)["bias"], model.bias.detach().numpy())
    st2 = proto.save_checkpoint({"w": np.arange(4.0)}, tmp_path / "a.safetensors")
    np.testing.assert_array_equal(load_file(st2)["w"], np.arange(4.0))
    with pytest.raises(TypeError, match=r"nn\.Module or a dict"):
        proto.save_checkpoint(42, tmp_path / "x.pt")
