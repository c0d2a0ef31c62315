"""The run store's writer: :class:`RunStore` (batched, crash-safe writes; see the package
docstring)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sqlite3
import struct
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zetaguard.labels import group_labels
from zetaguard.results import RecoveryReport, StabilityResult
from zetaguard.store.schema import (
    DB_NAME,
    DEFAULT_RUN_DIR,
    NUMBER_PATTERN,
    RUN_NAME_PATTERN,
    StoreError,
    dumps,
    migrate,
    transaction,
)


def _group_blob(result: StabilityResult) -> bytes | None:
    # The engine's float64 rows (x2, v2, a2, j2, nonfinite per group) then the group zetas,
    # copied as they are: two memcpys per step; the arithmetic waits for a reader.
    rows, zetas = result.group_rows, result.group_zeta
    if rows is None or zetas is None or len(zetas) == 0:
        return None
    return rows.tobytes() + zetas.tobytes()


class RunStore:
    """Writes one run to ``<run_dir>/<run_name>/run.sqlite``.

    ``run_name`` defaults to a UTC timestamp (with a numeric suffix if that exists). Opening an
    existing run appends to it (a resumed job keeps one history); nothing is overwritten. With
    ``first_step``, a store already holding that step or a later one is refused
    (:class:`StoreError`): steps never repeat in one history.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        flush_rows: int = 256,
        flush_interval: float = 1.0,
        first_step: int | None = None,
    ) -> None:
        if run_name is not None and not RUN_NAME_PATTERN.match(run_name):
            raise ValueError(
                f"run_name {run_name!r} must be 1-128 characters of letters, digits, '.', '_' "
                "or '-', starting with a letter or digit (it names a directory)"
            )
        if flush_rows < 1 or flush_interval <= 0:
            raise ValueError("flush_rows must be >= 1 and flush_interval > 0")
        root = Path(run_dir if run_dir is not None else DEFAULT_RUN_DIR)
        if root.exists() and not root.is_dir():
            raise StoreError(f"run_dir {str(root)!r} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        if run_name is None:
            run_name = _fresh_name(root)
        self.run_name = run_name
        self.path = root / run_name / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_rows = int(flush_rows)
        self.flush_interval = float(flush_interval)
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            migrate(self._conn)
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot open run store {str(self.path)!r}: {e}; move the file away or choose "
                "another run_name"
            ) from e
        if first_step is not None:
            _refuse_repeated_steps(self._conn, self.path, int(first_step))
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._pending_recs: list[tuple[int, float, str, tuple[str, ...]]] = []
        self._last_flush = time.monotonic()
        self._name_set_ids: dict[tuple[str, ...], int] = {
            tuple(json.loads(names)): int(i)
            for i, names in self._conn.execute("SELECT id, names FROM name_sets")
        }
        self._last_recommendation: tuple[str, ...] = ()
        self._closed = False
        with transaction(self._conn):
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('created', ?)", (str(time.time()),)
            )
            self._conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('run_name', ?)", (run_name,)
            )
            self._conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('pid', ?)", (str(os.getpid()),)
            )
            if config is not None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('config', ?)",
                    (dumps(config),),
                )
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=_flush_loop, args=(weakref.ref(self), self._stop), daemon=True
        )
        self._flusher.start()
        atexit.register(self.close)

    # ---- writing -----------------------------------------------------------------------

    def record_step(self, result: StabilityResult) -> None:
        """Buffer one step; committed with the next batch."""
        # Raw floats go in as they are (SQLite keeps inf, stores NaN as NULL); readers turn
        # non-finite values into None. Names are stored once per distinct set.
        ch = result.channels
        blob = _group_blob(result)
        row = (
            int(result.step),
            float(result.timestamp),
            result.status,
            float(result.zeta_value),
            result.raw_jar,
            result.smoothed_jar,
            float(result.confidence),
            ch.get("loss"),
            ch.get("grad_norm"),
            int(result.nonfinite),
            int(result.in_warmup),
            int(result.history),
            self._name_set(tuple(ch)),
            struct.pack(f"<{len(ch)}d", *ch.values()),
            self._group_set(result) if blob is not None else None,
            blob,
        )
        recs = tuple(result.recommendations)
        # Advice repeats from step to step with only its numbers changed; keep it once per
        # change of wording.
        key = tuple(NUMBER_PATTERN.sub("#", t) for t in recs) if recs else ()
        with self._lock:
            self._check_open()
            self._pending.append(row)
            if recs and key != self._last_recommendation:
                self._pending_recs.append((result.step, result.timestamp, result.status, recs))
            self._last_recommendation = key
            if len(self._pending) >= self.flush_rows or (
                time.monotonic() - self._last_flush >= self.flush_interval
            ):
                self._flush_locked()

    def record_incident(
        self,
        step: int,
        status: str,
        channels: dict[str, float] | None = None,
        worst_group: str | None = None,
        batch_index: int | None = None,
        action: str | None = None,
    ) -> None:
        """Record an incident (a step that left STABLE, what caused it, what was done) and
        commit at once together with every buffered step."""
        with self._lock:
            self._check_open()
            self._flush_locked(
                incident=(
                    int(step),
                    time.time(),
                    str(status),
                    worst_group,
                    None if batch_index is None else int(batch_index),
                    action,
                    dumps(channels or {}),
                )
            )

    def record_recovery(self, report: RecoveryReport) -> None:
        """Record what a recovery did; committed at once."""
        d = report.to_dict()
        with self._lock:
            self._check_open()
            self._flush_locked(
                recovery=(
                    int(report.step),
                    float(report.timestamp),
                    report.status,
                    dumps(list(report.actions)),
                    dumps(d),
                )
            )

    def flush(self) -> None:
        """Commit everything buffered so far."""
        with self._lock:
            if not self._closed:
                self._flush_locked()

    def close(self) -> None:
        """Commit what is buffered and close the database. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._closed = True
            self._stop.set()
            self._conn.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"run store {str(self.path)!r} is closed")

    def _name_set(self, names: tuple[str, ...]) -> int:
        set_id = self._name_set_ids.get(names)
        if set_id is None:
            with self._lock:
                cur = self._conn.execute(
                    "INSERT INTO name_sets(names) VALUES (?)", (json.dumps(list(names)),)
                )
                set_id = int(cur.lastrowid or 0)
            self._name_set_ids[names] = set_id
        return set_id

    def _group_set(self, result: StabilityResult) -> int:
        names = result.group_names
        if names not in self._name_set_ids:
            # A new set of groups: record their labels too (once per set, like the names).
            labels = group_labels(names, result.module_types)
            if labels != list(names):
                with self._lock:
                    row = self._conn.execute(
                        "SELECT value FROM meta WHERE key = 'group_labels'"
                    ).fetchone()
                    known = json.loads(row[0]) if row else {}
                    known.update(zip(names, labels, strict=True))
                    self._conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('group_labels', ?)",
                        (json.dumps(known),),
                    )
        return self._name_set(names)

    def _flush_locked(
        self,
        incident: tuple[Any, ...] | None = None,
        recovery: tuple[Any, ...] | None = None,
    ) -> None:
        self._last_flush = time.monotonic()
        if not self._pending and not self._pending_recs and incident is None and recovery is None:
            return
        steps, recs = self._pending, self._pending_recs
        with transaction(self._conn):
            self._conn.executemany(
                "INSERT INTO steps(step, ts, status, zeta, raw_jar, smoothed_jar, confidence, "
                "loss, grad_norm, nonfinite, in_warmup, history, channel_set, channel_values, "
                "group_set, group_values) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                steps,
            )
            self._conn.executemany(
                "INSERT INTO recommendations(step, ts, status, text) VALUES (?,?,?,?)",
                [(s, t, st, text) for s, t, st, texts in recs for text in texts],
            )
            if incident is not None:
                self._conn.execute(
                    "INSERT INTO incidents(step, ts, status, worst_group, batch_index, action, "
                    "channels) VALUES (?,?,?,?,?,?,?)",
                    incident,
                )
            if recovery is not None:
                self._conn.execute(
                    "INSERT INTO recoveries(step, ts, status, actions, report) VALUES (?,?,?,?,?)",
                    recovery,
                )
        self._pending = []
        self._pending_recs = []

    def _maybe_flush(self) -> None:
        with self._lock:
            if (
                not self._closed
                and self._pending
                and time.monotonic() - self._last_flush >= self.flush_interval
            ):
                self._flush_locked()


def _flush_loop(ref: weakref.ref[RunStore], stop: threading.Event) -> None:
    # Holds only a weak reference, so an abandoned store can still be collected.
    while True:
        store = ref()
        if store is None:
            return
        interval = store.flush_interval
        del store
        if stop.wait(interval):
            return
        store = ref()
        if store is None:
            return
        with contextlib.suppress(Exception):
            store._maybe_flush()
        del store


def _refuse_repeated_steps(conn: sqlite3.Connection, path: Path, first_step: int) -> None:
    """A run store holds one history: a writer whose steps would repeat steps already there (a
    fresh guard reusing a run_name, or a resume from a state older than the store) is refused
    rather than mixing two step sequences."""
    (last,) = conn.execute("SELECT MAX(step) FROM steps").fetchone()
    if last is not None and first_step <= int(last):
        conn.close()
        raise StoreError(
            f"run store {str(path)!r} already holds steps up to {last} and this guard's next "
            f"step is {first_step}: the history would repeat steps. Pass a new run_name, or "
            "resume with guard.load_state() from a state saved after that step"
        )


def _fresh_name(root: Path) -> str:
    base = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name
