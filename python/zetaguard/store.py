"""The run store: one SQLite database per training run.

Layout: ``<run_dir>/<run_name>/run.sqlite``, several runs side by side under one run directory
(default ``./zetaguard_runs``). The database runs in WAL mode, so the dashboard and the CLIs
read while training writes, and a killed training process leaves every committed step
readable (WAL with ``synchronous=NORMAL`` loses nothing on a process crash; only a power cut can
drop the last commits).

Writes are batched: :meth:`RunStore.record_step` appends a row to an in-memory buffer that is
committed in one transaction when it holds ``flush_rows`` rows, when ``flush_interval`` seconds
have passed (a background thread checks, so a stalled loop still shows up on the dashboard),
on every incident or recovery (rare and important), and on :meth:`RunStore.close` / interpreter
exit.

Per-group values are stored compactly: the group names once per distinct set (``group_sets``),
and per step one blob holding the engine's per-group rows and zetas as float64 (6 values per
group), copied without building :attr:`StabilityResult.groups`; readers derive each group's
zeta, raw JAR and update ratio from it (the same formulas as ``GroupResult``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard.labels import group_labels
from zetaguard.results import RecoveryReport, StabilityResult, jar

DEFAULT_RUN_DIR = "zetaguard_runs"
DB_NAME = "run.sqlite"

_NUMBER = re.compile(r"[-+]?\d[\d.]*(?:e[-+]?\d+)?")
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Each entry upgrades the schema by one version; a database records what it has applied in
# schema_migrations, and opening it applies the rest in order.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE name_sets (id INTEGER PRIMARY KEY, names TEXT NOT NULL);
    CREATE TABLE steps (
        id INTEGER PRIMARY KEY,
        step INTEGER NOT NULL,
        ts REAL NOT NULL,
        status TEXT NOT NULL,
        zeta REAL,
        raw_jar REAL,
        smoothed_jar REAL,
        confidence REAL,
        loss REAL,
        grad_norm REAL,
        nonfinite INTEGER NOT NULL,
        in_warmup INTEGER NOT NULL,
        history INTEGER NOT NULL,
        channel_set INTEGER REFERENCES name_sets(id),
        channel_values BLOB,
        group_set INTEGER REFERENCES name_sets(id),
        group_values BLOB
    );
    CREATE INDEX steps_step ON steps(step);
    CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        step INTEGER NOT NULL,
        ts REAL NOT NULL,
        status TEXT NOT NULL,
        worst_group TEXT,
        batch_index INTEGER,
        action TEXT,
        channels TEXT NOT NULL
    );
    CREATE TABLE recommendations (
        id INTEGER PRIMARY KEY,
        step INTEGER NOT NULL,
        ts REAL NOT NULL,
        status TEXT NOT NULL,
        text TEXT NOT NULL
    );
    CREATE TABLE recoveries (
        id INTEGER PRIMARY KEY,
        step INTEGER NOT NULL,
        ts REAL NOT NULL,
        status TEXT NOT NULL,
        actions TEXT NOT NULL,
        report TEXT NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


_STEP_COLUMNS = (
    "id",
    "step",
    "ts",
    "status",
    "zeta",
    "raw_jar",
    "smoothed_jar",
    "confidence",
    "loss",
    "grad_norm",
    "nonfinite",
    "in_warmup",
)


class StoreError(RuntimeError):
    """A run store that is missing, unreadable, corrupt or from a newer zetaguard."""


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _dumps(obj: Any) -> str:
    # Non-finite numbers become null: the JSON is read by browsers, whose parser rejects NaN.
    return json.dumps(json_safe(obj), separators=(",", ":"))


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and tuples as lists: what strict JSON holds."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL)"
    )
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    current = int(row[0] or 0)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"this run store has schema version {current}, newer than this zetaguard knows "
            f"({SCHEMA_VERSION}); upgrade zetaguard to read it"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        # One transaction per migration: a crash leaves a whole version or none of it.
        conn.executescript(
            f"BEGIN; {MIGRATIONS[version - 1]}; INSERT INTO schema_migrations(version, applied) "
            f"VALUES ({version}, {time.time()!r}); COMMIT;"
        )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # The connection is in autocommit mode (isolation_level=None), so batches say BEGIN.
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _group_blob(result: StabilityResult) -> bytes | None:
    # The engine's float64 rows (x2, v2, a2, j2, nonfinite per group) then the group zetas,
    # copied as they are: two memcpys per step; the arithmetic waits for a reader.
    rows, zetas = result._group_rows, result._group_zeta
    if rows is None or zetas is None or len(zetas) == 0:
        return None
    return rows.tobytes() + zetas.tobytes()


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
            _migrate(self._conn)
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
        with _transaction(self._conn):
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
                    (_dumps(config),),
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
            int(result._history),
            self._name_set(tuple(ch)),
            struct.pack(f"<{len(ch)}d", *ch.values()),
            self._group_set(result) if blob is not None else None,
            blob,
        )
        recs = tuple(result.recommendations)
        # Advice repeats from step to step with only its numbers changed; keep it once per
        # change of wording.
        key = tuple(_NUMBER.sub("#", t) for t in recs) if recs else ()
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
                    _dumps(channels or {}),
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
                    _dumps(list(report.actions)),
                    _dumps(d),
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
        names = result._group_names
        if names not in self._name_set_ids:
            # A new set of groups: record their labels too (once per set, like the names).
            labels = group_labels(names, result._module_types)
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
        with _transaction(self._conn):
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


# ---- reading ---------------------------------------------------------------------------


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
            d = {k: json_safe(row[k]) for k in _STEP_COLUMNS}
            d["in_warmup"] = bool(d["in_warmup"])
            d["channels"] = {}
            if row["channel_set"] is not None:
                names = self._names(int(row["channel_set"]))
                values = struct.unpack(f"<{len(names)}d", row["channel_values"])
                d["channels"] = {n: _finite_or_none(v) for n, v in zip(names, values, strict=True)}
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
                            "zeta": _finite_or_none(zeta[i]),
                            "raw_jar": _finite_or_none(jar[i]),
                            "update_ratio": _finite_or_none(ratio[i]),
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
            e["peak"] = _finite_or_none(e["peak"])
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
