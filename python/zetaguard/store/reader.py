"""The run store's readers: :class:`RunReader` (read-only), :func:`list_runs`,
:func:`find_runs`, :func:`iter_new_steps`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard.results import jar
from zetaguard.store.schema import (
    DB_NAME,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    StoreError,
    finite_or_none,
    json_safe,
)


def _decode_blob(
    blob: bytes, groups: int, history: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(zeta, raw_jar, update_ratio) per group from a stored blob; NaN where undefined."""
    flat = np.frombuffer(blob, dtype=np.float64)
    rows = flat[: groups * 5].reshape(groups, 5)
    zeta = flat[groups * 5 : groups * 6].copy()
    nan = np.full(groups, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.sqrt(rows[:, 0])
        v = np.sqrt(rows[:, 1])
        jars = jar(np.sqrt(rows[:, 3]), np.sqrt(rows[:, 2])) if history >= 3 else nan
        ratio = np.where(x > 0, v / x, np.nan) if history >= 1 else nan
    return zeta, jars, ratio


@dataclass(frozen=True)
class RunInfo:
    """A run found under a run directory."""

    name: str
    path: Path
    steps: int
    last_step: int | None
    last_status: str | None
    last_ts: float | None
    created: float | None
    incidents: int


def find_runs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run databases directly under ``run_dir`` (one directory per run), newest first."""
    root = Path(run_dir)
    if not root.is_dir():
        raise StoreError(
            f"run directory {str(root)!r} does not exist; pass the directory given to "
            "ZetaGuard(run_dir=...) (default ./zetaguard_runs)"
        )
    dbs = [p / DB_NAME for p in root.iterdir() if (p / DB_NAME).is_file()]
    return sorted(dbs, key=lambda p: p.stat().st_mtime, reverse=True)


def list_runs(run_dir: str | os.PathLike[str]) -> list[RunInfo]:
    """Summaries of every readable run under ``run_dir``, newest first (corrupt ones skipped)."""
    out = []
    for db in find_runs(run_dir):
        try:
            with RunReader(db) as r:
                out.append(r.info())
        except StoreError:
            continue
    return out


class RunReader:
    """Read-only access to one run store (a ``run.sqlite`` file or the directory holding it).

    Never writes: it opens the database with ``mode=ro``, so a reader can sit beside the
    training process for as long as it likes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / DB_NAME
        if not p.is_file():
            raise StoreError(
                f"no run store at {str(p)!r}: expected a {DB_NAME} written by "
                "ZetaGuard(run_dir=...)"
            )
        self.path = p
        self.name = p.parent.name
        try:
            # check_same_thread=False: the dashboard reads from a worker thread per poll.
            self._conn = sqlite3.connect(
                f"{p.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            row = self._conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"{str(p)!r} is not a readable run store ({e}); it may be corrupt or another "
                "kind of file"
            ) from e
        version = int(row[0] or 0)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"run store {str(p)!r} has schema version {version}; this zetaguard reads up to "
                f"{SCHEMA_VERSION}: upgrade zetaguard"
            )
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"run store {str(p)!r} has schema version {version}; open it once for writing "
                "(RunStore) to migrate it"
            )
        self._name_sets: dict[int, list[str]] = {}
        self._labels: dict[str, str] | None = None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot read run store {str(self.path)!r}: {e}") from e

    @contextlib.contextmanager
    def consistent(self) -> Iterator[RunReader]:
        """Every read inside sees the same committed state (one read transaction), however
        much the writer commits meanwhile."""
        self._conn.execute("BEGIN")
        try:
            yield self
        finally:
            self._conn.execute("COMMIT")

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for row in self._query("SELECT key, value FROM meta"):
            json_keys = ("config", "group_labels")
            out[row["key"]] = json.loads(row["value"]) if row["key"] in json_keys else row["value"]
        return out

    def group_labels(self) -> dict[str, str]:
        """Group name -> the label a user recognises (``"4 (Linear 128->10)"``), for the groups
        whose module the adapter knew; other groups are absent."""
        if self._labels is None:
            labels = self.meta().get("group_labels")
            self._labels = {str(k): str(v) for k, v in labels.items()} if labels else {}
        return self._labels

    def info(self) -> RunInfo:
        meta = self.meta()
        agg = self._query("SELECT COUNT(*) AS n FROM steps")[0]
        last = self._query("SELECT step, status, ts FROM steps ORDER BY id DESC LIMIT 1")
        incidents = self._query("SELECT COUNT(*) AS n FROM incidents")[0]["n"]
        return RunInfo(
            name=self.name,
            path=self.path,
            steps=int(agg["n"]),
            last_step=int(last[0]["step"]) if last else None,
            last_status=str(last[0]["status"]) if last else None,
            last_ts=float(last[0]["ts"]) if last else None,
            created=float(meta["created"]) if "created" in meta else None,
            incidents=int(incidents),
        )

    def steps(
        self, since_id: int = 0, limit: int | None = None, *, groups: bool = False
    ) -> list[dict[str, Any]]:
        """Steps with ``id > since_id`` in commit order, as JSON-ready dicts (non-finite
        numbers are None). ``worst_group`` is the group with the highest zeta; with
        ``groups=True`` also ``groups``: name -> {zeta, raw_jar, update_ratio}."""
        sql = "SELECT * FROM steps WHERE id > ? ORDER BY id"
        args: list[Any] = [int(since_id)]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        out = []
        for row in self._query(sql, args):
            d = {k: json_safe(row[k]) for k in STEP_COLUMNS}
            d["in_warmup"] = bool(d["in_warmup"])
            d["channels"] = {}
            if row["channel_set"] is not None:
                names = self._names(int(row["channel_set"]))
                values = struct.unpack(f"<{len(names)}d", row["channel_values"])
                d["channels"] = {n: finite_or_none(v) for n, v in zip(names, values, strict=True)}
            d["worst_group"] = None
            decoded = self._decode(row)
            if decoded is not None:
                names, (zeta, jar, ratio) = decoded
                finite = np.where(np.isnan(zeta), np.inf, zeta)
                d["worst_group"] = names[int(np.argmax(finite))]
                if groups:
                    labels = self.group_labels()
                    d["groups"] = {
                        n: {
                            "zeta": finite_or_none(zeta[i]),
                            "raw_jar": finite_or_none(jar[i]),
                            "update_ratio": finite_or_none(ratio[i]),
                            "label": labels.get(n, n),
                        }
                        for i, n in enumerate(names)
                    }
            elif groups:
                d["groups"] = {}
            out.append(d)
        return out

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` steps, oldest first."""
        rows = self._query("SELECT id FROM steps ORDER BY id DESC LIMIT 1 OFFSET ?", (max(n, 1),))
        return self.steps(since_id=int(rows[0]["id"]) if rows else 0)

    def group_matrix(self) -> tuple[list[int], list[str], npt.NDArray[np.float64]]:
        """(steps, group names, zeta matrix of shape groups x steps) over the whole run, for
        heat maps. Groups absent from a step are NaN."""
        rows = self._query("SELECT step, history, group_set, group_values FROM steps ORDER BY id")
        names: dict[str, int] = {}
        cols: list[list[tuple[int, float]]] = []
        steps = []
        for row in rows:
            steps.append(int(row["step"]))
            decoded = self._decode(row)
            col: list[tuple[int, float]] = []
            if decoded is not None:
                set_names, (zeta, _, _) = decoded
                col = [
                    (names.setdefault(n, len(names)), float(zeta[i]))
                    for i, n in enumerate(set_names)
                ]
            cols.append(col)
        m = np.full((len(names), len(steps)), np.nan)
        for j, col in enumerate(cols):
            for i, v in col:
                m[i, j] = v
        return steps, list(names), m

    def _decode(
        self, row: sqlite3.Row
    ) -> tuple[list[str], tuple[npt.NDArray[np.float64], ...]] | None:
        if row["group_set"] is None or row["group_values"] is None:
            return None
        names = self._names(int(row["group_set"]))
        blob = row["group_values"]
        if len(blob) != len(names) * 6 * 8:
            raise StoreError(
                f"run store {str(self.path)!r}: group values of step {row['step']} do not match "
                f"its {len(names)} group names; the file is corrupt"
            )
        return names, _decode_blob(blob, len(names), int(row["history"]))

    def _names(self, set_id: int) -> list[str]:
        names = self._name_sets.get(set_id)
        if names is None:
            found = self._query("SELECT names FROM name_sets WHERE id = ?", (set_id,))
            if not found:
                raise StoreError(f"run store {str(self.path)!r} lacks name set {set_id}: corrupt")
            names = [str(n) for n in json.loads(found[0]["names"])]
            self._name_sets[set_id] = names
        return names

    def incidents(self, since_id: int = 0) -> list[dict[str, Any]]:
        out = []
        for row in self._query("SELECT * FROM incidents WHERE id > ? ORDER BY id", (since_id,)):
            d = dict(zip(row.keys(), tuple(row), strict=False))
            d["channels"] = json_safe(json.loads(d["channels"]))
            out.append(d)
        return out

    def recommendations(self, since_id: int = 0) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM recommendations WHERE id > ? ORDER BY id", (since_id,))
        return [dict(zip(r.keys(), tuple(r), strict=False)) for r in rows]

    def recoveries(self, since_id: int = 0) -> list[dict[str, Any]]:
        out = []
        for row in self._query("SELECT * FROM recoveries WHERE id > ? ORDER BY id", (since_id,)):
            d = dict(zip(row.keys(), tuple(row), strict=False))
            d["actions"] = json.loads(d["actions"])
            d["report"] = json.loads(d["report"])
            out.append(d)
        return out

    def alerts(self) -> list[dict[str, Any]]:
        """Alert episodes: runs of consecutive non-STABLE steps, each with its first and last
        step, the worst status and the peak zeta (None when it was not finite)."""
        episodes: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        rank = {"STABLE": 0, "DRIFT": 1, "CRITICAL": 2}
        rows = self._query("SELECT id, step, status, zeta FROM steps ORDER BY id")
        for row in rows:
            if row["status"] == "STABLE":
                current = None
                continue
            zeta = row["zeta"] if row["zeta"] is not None else math.inf
            if current is None:
                current = {"start": row["step"], "status": row["status"], "peak": zeta, "steps": 0}
                episodes.append(current)
            current["end"] = row["step"]
            current["steps"] += 1
            if rank[row["status"]] > rank[current["status"]]:
                current["status"] = row["status"]
            current["peak"] = max(current["peak"], zeta)
        for e in episodes:
            e["peak"] = finite_or_none(e["peak"])
        return episodes

    def integrity_ok(self) -> bool:
        rows = self._query("PRAGMA integrity_check")
        return bool(rows) and rows[0][0] == "ok"


def iter_new_steps(
    reader: RunReader, since_id: int = 0, *, poll: float = 0.5, stop: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """Yield steps as training commits them (polls the store every ``poll`` seconds)."""
    last = since_id
    while stop is None or not stop.is_set():
        rows = reader.steps(since_id=last)
        for r in rows:
            last = int(r["id"])
            yield r
        if not rows:
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
