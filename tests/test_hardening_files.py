"""Hostile files (issue "Hardening II", items 1 and 3): crafted model files whose payload must
not run without --trust-pickle, and state files that must be refused with a StateFileError
naming the problem, never a hang, an OverflowError or a RecursionError."""

from __future__ import annotations

import io
import json
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard, state
from zetaguard.state import StateFileError


class Payload:
    """Unpickling this creates `marker`: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _export_with_payload(tmp_path: Path, marker: Path, name: str) -> Path:
    """A real torch.export.save archive whose sample-inputs member is a torch.save of Payload
    (torch.export.load falls back to weights_only=False for that member)."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(8, 1)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    good = tmp_path / "good.pt2"
    torch.export.save(ep, str(good))
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    out = tmp_path / name
    replaced = False
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data, replaced = evil.getvalue(), True
            zout.writestr(info, data)
    assert replaced
    return out


def _crafted(tmp_path: Path, marker: Path) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    files = {}
    for suffix in (".pt2", ".pt"):  # each kind also renamed
        files[f"export{suffix}"] = _export_with_payload(tmp_path, marker, f"export{suffix}")
        p = tmp_path / f"plain{suffix}"
        p.write_bytes(pickle.dumps(Payload(marker)))
        files[f"plain{suffix}"] = p
        t = tmp_path / f"tsave{suffix}"
        torch.save(Payload(marker), t)
        files[f"tsave{suffix}"] = t
    return files


def test_export_payload_runs_through_torch_export_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crafted archive is a real threat: torch.export.load runs its payload."""
    torch = pytest.importorskip("torch")
    # torch's fallback warning has a malformed format string; under pytest's log capture it
    # raises TypeError from inside the loader, which would hide the loader's own outcome.
    import logging

    monkeypatch.setattr(logging.getLogger("torch._export.serde.serialize"), "disabled", True)
    marker = tmp_path / "ran"
    path = _export_with_payload(tmp_path, marker, "evil.pt2")
    with pytest.raises(AssertionError, match="expected tuple or dict"):  # it got a file
        torch.export.load(str(path))
    assert marker.exists()


def test_zeta_test_runs_no_code_from_crafted_files(tmp_path: Path) -> None:
    from zetaguard.cli.stress import ModelLoadError, load_model

    marker = tmp_path / "ran"
    for name, path in _crafted(tmp_path, marker).items():
        with pytest.raises(ModelLoadError, match="--trust-pickle"):
            load_model(path)
        assert not marker.exists(), name


def test_zeta_monitor_runs_no_code_from_crafted_files(tmp_path: Path) -> None:
    from zetaguard.cli.monitor import CheckpointError, load_checkpoint

    marker = tmp_path / "ran"
    for name, path in _crafted(tmp_path, marker).items():
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        assert not marker.exists(), name


def test_load_state_runs_no_code_from_crafted_files(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for name, path in _crafted(tmp_path, marker).items():
        with pytest.raises(StateFileError):
            ZetaGuard().load_state(path)
        assert not marker.exists(), name


def test_a_trusted_export_archive_still_loads(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from zetaguard.cli.stress import load_model

    model = torch.nn.Linear(8, 1)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / "mine.pt2"
    torch.export.save(ep, str(path))
    module, fmt, _ = load_model(path, trust_pickle=True)
    assert fmt == "torch.export"
    x = torch.randn(3, 8)
    assert torch.allclose(module(x), model(x))


# ---- hostile state files ------------------------------------------------------------------


def _good(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    # mode="exact": a file whose engine ring holds arrays for the tests to damage
    g = ZetaGuard(warmup_steps=3, auto_recover=False, mode="exact")
    rng = np.random.default_rng(0)
    for t in range(6):
        g.monitor({"w": rng.normal(size=5).astype(np.float32)}, loss=1.0 / (t + 1))
    g.save_state(tmp_path / "good.zg")
    meta, arrays = state.load(tmp_path / "good.zg")
    return {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}, arrays


def _refused(tmp_path: Path, meta: dict[str, Any], arrays: dict[str, Any], match: str) -> None:
    state.save(tmp_path / "bad.zg", meta, arrays)  # a valid checksum over the bad values
    g = ZetaGuard()
    with pytest.raises(StateFileError, match=match):
        g.load_state(tmp_path / "bad.zg")
    assert g.step == 0  # unchanged


def test_catastrophic_pattern_is_refused_fast(tmp_path: Path) -> None:
    meta, arrays = _good(tmp_path)
    for pattern in (r"^(([a-z0-9]+)+)+!", r"(a|a)*!", r"(x)\1", r".*a.*b.*c.*d.*e"):
        start = time.perf_counter()
        _refused(tmp_path, {**meta, "pattern": pattern}, arrays, "pattern")
        assert time.perf_counter() - start < 5.0
    state.save(tmp_path / "ok.zg", {**meta, "pattern": r"^encoder\.layer\.\d+\..*weight$"}, arrays)
    ZetaGuard().load_state(tmp_path / "ok.zg")


def test_metadata_is_covered_by_the_checksum(tmp_path: Path) -> None:
    _good(tmp_path)
    path = tmp_path / "good.zg"
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    meta = json.loads(np.load(io.BytesIO(members["meta.npy"])).tobytes().decode())
    meta["config"]["snap_threshold"] = 1e308
    meta["config"]["drift_threshold"] = 1e307
    blob = json.dumps(meta).encode()
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(blob, dtype=np.uint8))
    members["meta.npy"] = buf.getvalue()
    with zipfile.ZipFile(tmp_path / "edited.zg", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(StateFileError, match="checksum"):
        ZetaGuard().load_state(tmp_path / "edited.zg")


def test_fields_are_checked_for_type_and_range(tmp_path: Path) -> None:
    meta, arrays = _good(tmp_path)
    cfg = meta["config"]
    cases = [
        ({"config": {**cfg, "warmup_steps": 1e400}}, "warmup_steps must be an integer"),
        ({"config": {**cfg, "warmup_steps": 2.5}}, "warmup_steps must be an integer"),
        ({"config": {**cfg, "snap_threshold": float("inf")}}, "snap_threshold must be finite"),
        ({"config": {**cfg, "alpha": 7}}, "alpha"),
        ({"config": {**cfg, "seed": -1}}, "seed"),
        ({"step": "3"}, "step must be an integer"),
        ({"status_counts": {"STABLE": -1}}, "status_counts"),
        ({"grad_norms": [float("nan")]}, "grad_norms"),
        ({"names": [["nested"]]}, "names"),
        ({"detector": {**meta["detector"], "steps": 2**80}}, "detector.steps"),
    ]
    for change, match in cases:
        _refused(tmp_path, {**meta, **change}, arrays, match)


def test_deep_json_is_a_state_file_error(tmp_path: Path) -> None:
    _, arrays = _good(tmp_path)
    blob = ("[" * 200_000 + "]" * 200_000).encode()
    deep = {**arrays, "meta": np.frombuffer(blob, dtype=np.uint8)}
    with open(tmp_path / "deep.zg", "wb") as f:
        np.savez(f, **deep)
    with pytest.raises(StateFileError, match=r"nests too deeply|corrupt header"):
        ZetaGuard().load_state(tmp_path / "deep.zg")


def test_sizes_are_bounded_before_decompressing(tmp_path: Path) -> None:
    meta, arrays = _good(tmp_path)
    state.save(tmp_path / "g.zg", meta, arrays)
    with zipfile.ZipFile(tmp_path / "g.zg") as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    # A member of 1 GB of zeros compresses to ~1 MB: refused from the zip directory alone.
    members["t0_s0.npy"] = members["t0_s0.npy"][:128] + bytes(256 << 20)
    with zipfile.ZipFile(tmp_path / "bomb.zg", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(StateFileError, match="compressed"):
        ZetaGuard().load_state(tmp_path / "bomb.zg")
    # An .npy header that declares more elements than its member holds.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)}
    )
    members["t0_s0.npy"] = header.getvalue() + bytes(20)
    with zipfile.ZipFile(tmp_path / "huge.zg", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(StateFileError, match="declares"):
        ZetaGuard().load_state(tmp_path / "huge.zg")


def test_bad_tiered_settings_in_a_state_file_are_refused(tmp_path: Path) -> None:
    meta, arrays = _good(tmp_path)
    for fraction in (0.0, 1.5, -0.25, float("inf"), "0.5", True):
        bad = {**meta, "config": {**meta["config"], "sample_fraction": fraction}}
        _refused(tmp_path, bad, arrays, "sample_fraction")
    for interval in (0, -3, 2.5, "7", 2**40):
        bad = {**meta, "config": {**meta["config"], "full_pass_interval": interval}}
        _refused(tmp_path, bad, arrays, "full_pass_interval")
    ok = {**meta, "config": {**meta["config"], "sample_fraction": 0.25, "full_pass_interval": 7}}
    state.save(tmp_path / "ok.zg", ok, arrays)
    g = ZetaGuard()
    g.load_state(tmp_path / "ok.zg")
    assert (g.sample_fraction, g.full_pass_interval) == (0.25, 7)
