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

The package: :mod:`.schema` (tables, migrations, shared helpers), :mod:`.writer`
(:class:`RunStore`) and :mod:`.reader` (:class:`RunReader` and friends); everything public is
importable from ``zetaguard.store`` as before.
"""

from zetaguard.store.reader import RunInfo, RunReader, find_runs, iter_new_steps, list_runs
from zetaguard.store.schema import (
    DB_NAME,
    DEFAULT_RUN_DIR,
    MIGRATIONS,
    RUN_NAME_PATTERN,
    SCHEMA_VERSION,
    StoreError,
    json_safe,
)
from zetaguard.store.writer import RunStore

__all__ = [
    "DB_NAME",
    "DEFAULT_RUN_DIR",
    "MIGRATIONS",
    "RUN_NAME_PATTERN",
    "SCHEMA_VERSION",
    "RunInfo",
    "RunReader",
    "RunStore",
    "StoreError",
    "find_runs",
    "iter_new_steps",
    "json_safe",
    "list_runs",
]
