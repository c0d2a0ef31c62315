"""One of two JAX processes (``jax.distributed`` on the CPU, gloo): a replicated array and one
sharded over both processes' devices handed to ``monitor()``; prints a JSON line.

    python -m tests.support.jax_processes PROCESS_ID PORT
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import numpy as np

MARK = "ZETA_JSON "


def main(process_id: int, port: int) -> dict[str, Any]:
    jax: Any = importlib.import_module("jax")  # partly untyped in its stubs
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from zetaguard import ZetaGuard

    mesh = Mesh(np.array(jax.devices()), ("d",))
    spec: Any = PartitionSpec  # untyped in jax's stubs
    local = np.full((2, 3), float(process_id + 1), np.float32)  # this process's rows
    sharded = jax.make_array_from_process_local_data(NamedSharding(mesh, spec("d")), local)
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    replicated = jax.make_array_from_process_local_data(NamedSharding(mesh, spec()), full)
    out: dict[str, Any] = {
        "sharded_local": bool(sharded.is_fully_addressable),
        "replicated_local": bool(replicated.is_fully_addressable),
        "replicated_norm": ZetaGuard(mode="exact")
        .monitor({"w": replicated})
        .channels["param_norm"],
        "expected_norm": float(np.linalg.norm(full.astype(np.float64))),
    }
    try:
        ZetaGuard(mode="exact").monitor({"w": sharded})
    except ValueError as e:
        out["refused"] = str(e)
    return out


if __name__ == "__main__":
    print(MARK + json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
