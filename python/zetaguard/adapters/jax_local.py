"""JAX arrays: one host view of each array, whatever its sharding.

DLPack exports only single-device arrays, so an array laid out over several devices (Keras
``DataParallel``, ``jax.sharding``) is turned into one first:

* replicated (every device holds all of it, as ``DataParallel`` keeps weights): the first
  addressable shard, read in place (zero-copy on the CPU). Reading it once is what makes one
  decision per step: the replicas are the same values, so reading each would count them twice.
  The same across processes: each holds all of it, so each reads its own copy.
* sharded over this process's devices: the shards copied into one host array (there is no
  single buffer to share). Copying the shard views took 170 us for a 1 MB array here against
  520 us for JAX's gather to one device, which bfloat16 still takes (NumPy's bfloat16 has no
  buffer the engine can read). ``benchmarks/bench_jax_sharded.py`` times the reads.
* sharded over devices of other processes: refused. This process holds only part of it, and
  assembling it needs a collective on every process at the same point of the step.

Imported only when the user hands us JAX arrays (the dispatcher routes ``jax``/``jaxlib``
types here, the Keras adapter calls :func:`host_arrays` on a JAX backend's arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zetaguard.adapters import Snapshot, generic_snapshot


def host_array(name: str, a: Any) -> Any:
    """``a`` as an array on one device (itself when it already is one)."""
    sharding = getattr(a, "sharding", None)
    if sharding is None or len(sharding.device_set) == 1:
        return a  # single-device arrays and anything that is not a jax.Array
    if a.is_fully_replicated:
        # Also right for an array replicated across processes: the local replica is all of it.
        return a.addressable_data(0)
    if not a.is_fully_addressable:
        raise ValueError(
            f"{name} is sharded over devices of several processes (sharding {sharding}): this "
            "process holds only part of it, and the guard has no JAX collective to sum the "
            "parts. Monitor a replicated copy (jax.device_put(x, NamedSharding(mesh, "
            "PartitionSpec())), or multihost_utils.process_allgather(x)), or this process's "
            "shards ([s.data for s in x.addressable_shards]), knowing each process then "
            "decides alone"
        )
    return _assemble(a)


def _assemble(a: Any) -> Any:
    """A process-local sharded array as one host array (one copy of each shard)."""
    if a.dtype.name == "bfloat16":
        import jax

        return jax.device_put(a, a.addressable_shards[0].device)
    out = np.empty(a.shape, dtype=a.dtype)
    for shard in a.addressable_shards:
        if shard.replica_id == 0:  # each part once, however many devices hold it
            out[shard.index] = np.asarray(shard.data)
    return out


def spread(arrays: list[Any]) -> bool:
    """Whether any of ``arrays`` lies on more than one device (needs :func:`host_arrays`)."""
    for a in arrays:
        sharding = getattr(a, "sharding", None)
        if sharding is not None and len(sharding.device_set) > 1:
            return True
    return False


def host_arrays(names: list[str], arrays: list[Any]) -> list[Any]:
    """:func:`host_array` over a step's arrays, the list itself when none needs changing (the
    steady state of a single-device run costs one check per array)."""
    out = [host_array(n, a) for n, a in zip(names, arrays, strict=True)]
    return arrays if all(o is a for o, a in zip(out, arrays, strict=True)) else out


def snapshot(obj: Any) -> Snapshot:
    """JAX arrays, single or in a list/dict or as ``(name, array)`` pairs."""
    snap = generic_snapshot(obj)
    tensors = host_arrays(snap.names, snap.tensors)
    if tensors is not snap.tensors:
        snap.tensors = tensors
        snap.keepalive = tensors
    snap.framework = "jax"
    return snap
