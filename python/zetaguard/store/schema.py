"""The run store's schema, its migrations and the helpers writer and reader share."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

DEFAULT_RUN_DIR = "zetaguard_runs"
DB_NAME = "run.sqlite"

NUMBER_PATTERN = re.compile(r"[-+]?\d[\d.]*(?:e[-+]?\d+)?")
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


STEP_COLUMNS = (
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


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float, or None when it is None or not finite (what strict JSON can hold)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def dumps(obj: Any) -> str:
    """Compact strict JSON of ``obj`` (see :func:`json_safe`)."""
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


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the store at ``conn`` to ``SCHEMA_VERSION``; refuse one from a newer zetaguard."""
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
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction on an autocommit connection: committed, or rolled back."""
    # The connection is in autocommit mode (isolation_level=None), so batches say BEGIN.
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
