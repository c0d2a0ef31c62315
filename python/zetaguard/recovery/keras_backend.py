"""The Keras 3 recovery backend (any Keras backend: TensorFlow, torch, JAX).

Imported only for Keras models. Snapshots hold host copies of every model weight (trainable and
not, so BatchNorm statistics and dropout seed states come back too) and every optimizer
variable except the learning rate, keyed by variable path. Restore assigns in place
(``Variable.assign``), so the model, the optimizer and compiled train functions keep their
variables.

Inside a JAX ``fit`` the live values sit in ``model._jax_state``. A snapshot copies them from
there (where each variable sits in that state is learned once per compiled train function):
writing them back to the variables (``model.jax_state_sync()``) would also make the trainer
re-read and purge every variable on its next step. Every method that changes state first asks
the model to write them back, and the trainer re-reads the variables on its next step, so a
rollback or an LR cut made from a callback takes effect immediately.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import keras
import numpy as np

from zetaguard.recovery.backend import StateSnapshot, capture_host_rng, restore_host_rng


@keras.saving.register_keras_serializable(package="zetaguard")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """``schedule(step) * factor``: how an LR cut persists when the learning rate is a schedule."""

    def __init__(self, schedule: Any, factor: float) -> None:
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step: Any) -> Any:
        return keras.ops.multiply(self.schedule(step), self.factor)

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "factor": self.factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaledSchedule:
        schedule = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(schedule, config["factor"])


def _backend_value(v: Any) -> Any:
    """What holds a variable's data: a Keras variable's backend value; tf.Variables as they are."""
    return v.value if isinstance(v, keras.Variable) else v


def _is_tf_resource(value: Any) -> bool:
    return getattr(value, "handle", None) is not None and type(value).__module__.startswith(
        "tensorflow"
    )


# Torch dtypes NumPy has (bfloat16 goes through keras.ops.convert_to_numpy, which casts).
_TORCH_NUMPY_DTYPES = frozenset(
    f"torch.{name}"
    for name in (
        "float64",
        "float32",
        "float16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
)


def _host_copy(v: Any) -> np.ndarray[Any, Any]:
    value = _backend_value(v)
    if _is_tf_resource(value):
        # One buffer-sharing read and one copy; keras.ops.convert_to_numpy costs ~20x more
        # per variable on a small model. The shared view is gone when this returns.
        import tensorflow as tf

        read = tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype)
        return np.array(np.asarray(read), copy=True)
    if type(value).__module__.startswith("torch") and str(value.dtype) in _TORCH_NUMPY_DTYPES:
        # The torch backend: a copy made by torch, several times cheaper than
        # keras.ops.convert_to_numpy on a small model.
        copied: np.ndarray[Any, Any] = value.detach().to("cpu", copy=True).numpy()
        return copied
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


class _HostCopier:
    """Host copies of a set of variables, keyed as given. TensorFlow variables are read in one
    batched op (an eager op costs ~45 us inside ``fit`` whatever it reads; a small model's
    snapshot reads a dozen variables), others one by one. What the variables resolve to is kept
    while the same variables come back: a Keras variable's ``.value`` costs ~9 us."""

    def __init__(self) -> None:
        self.variables: list[Any] = []
        self.reader: Any = None  # a VariableReader, when all of them are tf.Variables

    def __call__(self, variables: dict[Any, Any]) -> dict[Any, np.ndarray[Any, Any]]:
        given = list(variables.values())
        if len(given) != len(self.variables) or any(
            a is not b for a, b in zip(given, self.variables, strict=True)
        ):
            values = [_backend_value(v) for v in given]
            self.variables, self.reader = given, None
            if values and all(map(_is_tf_resource, values)):
                from zetaguard.adapters.tensorflow import VariableReader

                self.reader = VariableReader(values)
        if self.reader is None:
            return {name: _host_copy(v) for name, v in variables.items()}
        reads = self.reader()
        return {
            name: np.array(np.asarray(t), copy=True)
            for name, t in zip(variables, reads, strict=True)
        }


def _targets(model: Any) -> dict[str, Any]:
    """Every variable a rollback writes, by name: all of a Keras model's weights (BatchNorm
    statistics and seed states too), all of a ``tf.Module``'s variables, or the variables
    given (a list, dict or ``(name, variable)`` pairs)."""
    weights = getattr(model, "weights", None)
    if weights is not None and hasattr(model, "trainable_weights"):
        return {v.path: v for v in weights}
    variables = getattr(model, "variables", None)
    if variables is not None and not isinstance(model, (list, tuple, dict)):
        model = list(variables)
    from zetaguard.adapters.tensorflow import named_variables

    named = named_variables(model)
    for name, v in named:
        if not hasattr(v, "assign"):
            raise TypeError(
                f"{name} is a {type(v).__name__}, which cannot be written in place; roll back "
                "Keras or TensorFlow variables (or pass the model)"
            )
    return dict(named)


class KerasBackend:
    """Rollback, LR control and checkpoints for a Keras model (or a ``tf.Module``, or a list
    of Keras / TensorFlow variables) and its Keras optimizer."""

    framework = "keras"

    def __init__(self, model: Any, optimizer: Any = None, scheduler: Any = None) -> None:
        self.model = model
        self.targets = _targets(model)
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        self.scheduler = scheduler  # Keras keeps schedules inside the optimizer; kept for symmetry
        self._copy = _HostCopier()
        self._live_plan: tuple[Any, list[Any], list[Any]] | None = None  # _live_reads

    def set_params(self, params: Any) -> None:
        """Point at a new variable set (used when only variables were handed to monitor())."""
        self.model = params
        self.targets = _targets(params)

    def _sync(self) -> None:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _live_reads(self, reads: dict[Any, Any]) -> dict[Any, Any] | None:
        """Inside a JAX fit: the live arrays of ``reads``' variables, from the trainer's state
        (None elsewhere, or when a variable is not found there: then sync and read)."""
        model = self.model
        state = getattr(model, "_jax_state", None)
        if not state or getattr(model, "_jax_state_synced", True):
            return None
        compiled = getattr(model, "train_function", None)
        plan = self._live_plan
        if plan is None or plan[0]() is not compiled or plan[1] != list(reads):
            where: dict[int, tuple[str, int]] = {}
            groups = [
                ("trainable_variables", model.trainable_variables),
                ("non_trainable_variables", model.non_trainable_variables),
            ]
            if self.optimizer is not None:
                groups.append(("optimizer_variables", self.optimizer.variables))
            for kind, variables in groups:
                for i, v in enumerate(variables):
                    where.setdefault(id(v), (kind, i))
            maybe = [where.get(id(v)) for v in reads.values()]
            spots = [s for s in maybe if s is not None]
            if len(spots) != len(maybe):
                return None
            try:
                self._live_plan = plan = (weakref.ref(compiled), list(reads), spots)
            except TypeError:  # no weak reference to the train function: sync instead
                return None
        found: list[tuple[str, int]] = plan[2]
        try:
            arrays = [state[kind][i] for kind, i in found]
        except (KeyError, IndexError, TypeError):
            return None
        return dict(zip(reads, arrays, strict=True))

    def _lr_variable(self) -> Any:
        lr = getattr(self.optimizer, "_learning_rate", None)
        return lr if isinstance(lr, keras.Variable) else None

    def _optimizer_variables(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        lr = self._lr_variable()
        return {v.path: v for v in self.optimizer.variables if v is not lr}

    # ---- snapshots -----------------------------------------------------------------------

    def capture(self, step: int, data_position: Any = None) -> StateSnapshot:
        opt_vars = self._optimizer_variables()
        lr = self._lr_variable()
        # One batched read for the weights, the optimizer's variables and a plain learning rate
        # (the keeper would otherwise read the rate on its own: one more eager op).
        reads: dict[Any, Any] = {("p", k): v for k, v in self.targets.items()}
        reads.update({("o", k): v for k, v in opt_vars.items()})
        if lr is not None:
            reads["lr", ""] = lr
        live = self._live_reads(reads)
        if live is not None:
            copies = {k: np.array(a, copy=True) for k, a in live.items()}
        else:
            self._sync()
            copies = self._copy(reads)
        params = {k: a for (kind, k), a in copies.items() if kind == "p"}
        opt = {k: a for (kind, k), a in copies.items() if kind == "o"}
        return StateSnapshot(
            step=step,
            params=params,
            optimizer_state=opt if self.optimizer is not None else None,
            rng=capture_host_rng(),
            data_position=data_position,
            nbytes=sum(a.nbytes for a in params.values()) + sum(a.nbytes for a in opt.values()),
            has_optimizer_state=self.optimizer is not None,
            lrs=[float(copies["lr", ""])] if lr is not None else [],
        )

    def restore(self, snapshot: StateSnapshot) -> None:
        self._sync()
        saved: dict[str, np.ndarray[Any, Any]] = snapshot.params
        live = self.targets
        differ = set(live) ^ set(saved)
        if differ:
            raise ValueError(
                f"the snapshot does not match the model ({len(differ)} variables differ, e.g. "
                f"{sorted(differ)[:3]}); roll back only with the model it was taken from"
            )
        for path, v in live.items():
            v.assign(saved[path])
        if snapshot.optimizer_state:
            # Slot variables the optimizer built after the snapshot have no saved value; zeroing
            # them is what a freshly built optimizer holds.
            for path, v in self._optimizer_variables().items():
                old = snapshot.optimizer_state.get(path)
                v.assign(old if old is not None else np.zeros(v.shape, dtype=v.dtype))
        restore_host_rng(snapshot.rng)

    # ---- learning rate -------------------------------------------------------------------

    def get_lrs(self) -> list[float]:
        if self.optimizer is None:
            return []
        self._sync()
        lr = self._lr_variable()
        if lr is not None:  # a plain rate: one variable read (a schedule is evaluated below)
            return [float(_host_copy(lr))]
        return [float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))]

    def scale_lr(self, factor: float) -> None:
        if self.optimizer is None:
            return
        self._sync()
        lr = self._lr_variable()
        if lr is not None:
            lr.assign(keras.ops.convert_to_numpy(lr.value) * factor)
            return
        schedule = self.optimizer._learning_rate
        if isinstance(schedule, ScaledSchedule):
            schedule.factor *= factor
        else:
            self.optimizer._learning_rate = ScaledSchedule(schedule, factor)
        # The schedule is traced into the compiled step; rebuild it so the cut applies.
        make = getattr(self.model, "make_train_function", None)
        if make is not None and getattr(self.model, "train_function", None) is not None:
            make(force=True)

    def set_lrs(self, lrs: list[float]) -> None:
        """Write a plain learning-rate variable (a schedule is not settable in Keras, so a loop
        cannot override it either)."""
        lr = self._lr_variable() if self.optimizer is not None else None
        if lr is not None and lrs:
            self._sync()
            lr.assign(lrs[0])

    # ---- gradients (model.fit keeps them inside the compiled step) -----------------------

    def grad_norm(self) -> float | None:
        return None

    def zero_grad(self) -> None:
        return None

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, directory: Path, stem: str, guard_state: dict[str, Any]) -> list[str]:
        from zetaguard.checkpoint import save_safetensors

        self._sync()
        weights = directory / f"{stem}.safetensors"
        params = {name: _host_copy(v) for name, v in self.targets.items()}
        save_safetensors(weights, params, guard_state)
        paths = [str(weights)]
        if self.optimizer is not None:
            opt_path = directory / f"{stem}.optimizer.safetensors"
            opt = {v.path: _host_copy(v) for v in self.optimizer.variables}
            save_safetensors(opt_path, opt, guard_state)
            paths.append(str(opt_path))
        return paths


def make_backend(model: Any, optimizer: Any = None, scheduler: Any = None) -> KerasBackend:
    return KerasBackend(model, optimizer, scheduler)
