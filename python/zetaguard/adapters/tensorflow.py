"""TensorFlow and Keras 3: Keras models and layers, ``tf.Module``, ``tf.Variable`` and Keras
variables, single or in a list/tuple/dict or as ``(name, variable)`` pairs.

How each backend's weights reach the engine without a per-step copy:

* TensorFlow: one batched read (``_ReadVariablesOp``) gives eager tensors that share the
  variables' buffers; the engine takes it through DLPack and the capsule is released when the
  engine call returns. No view outlives the step: a live view would make the next ``assign``
  move the variable to a new buffer (copy-on-write), which is the copy we are avoiding.
  ``Variable.numpy()`` instead copies every variable on every call.
* ``KERAS_BACKEND=torch``: a Keras variable's ``.value`` is a ``torch.nn.Parameter``; the torch
  adapter reads it by address (and its ``.grad`` for the gradient-norm channel).
* ``KERAS_BACKEND=jax``: arrays go through DLPack; replicated or sharded ones (e.g. under
  ``keras.distribution.DataParallel``) first through :mod:`zetaguard.adapters.jax_local`.
  Inside ``model.fit`` the JAX trainer keeps the live weights in ``model._jax_state`` (the
  model's own variables are stale until the end of the epoch), so a model is read from there
  while that state is newer.

``tf.distribute`` variables (``MirroredVariable`` and friends) are read once, from their first
component: every replica holds the same values, so the status is the same for every replica.
Monitoring must run eagerly (between steps, never inside a ``tf.function``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any

from zetaguard.adapters import Snapshot
from zetaguard.adapters.jax_local import host_arrays, spread

# Variable dtypes the engine reads (TensorFlow and Keras spell them the same).
_FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})


def _dtype_name(v: Any) -> str:
    dtype = getattr(v, "dtype", None)
    name = getattr(dtype, "name", dtype)
    return str(name).removeprefix("torch.")  # torch.float32 has no `.name`


def _clean_name(name: str) -> str:
    """``dense/kernel:0`` -> ``dense.kernel``: dots separate layers in every adapter, so
    ``group_by="layer"`` groups a layer's kernel and bias together."""
    base = name.rsplit(":", 1)[0] if name.rsplit(":", 1)[-1].isdigit() else name
    return base.replace("/", ".")


def _is_keras_variable(v: Any) -> bool:
    # Asked of the class: inside a JAX `fit` a variable's `.value` raises until the trainer
    # writes its state back.
    cls = type(v)
    return cls.__module__.startswith("keras") and hasattr(cls, "path") and hasattr(cls, "value")


def _variable_name(v: Any, fallback: str) -> str:
    path = getattr(v, "path", None)  # Keras 3 variables: "sequential/dense/kernel"
    if isinstance(path, str) and path:
        return _clean_name(path)
    name = getattr(v, "name", None)
    if isinstance(name, str) and name:
        return _clean_name(name)
    return fallback


def _unique(names: list[str]) -> list[str]:
    """tf.Variables are often all called ``Variable:0``; suffix repeats so no two tensors share
    a name (they would merge into one group)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def _items(obj: Any) -> tuple[list[str] | None, list[Any]]:
    """The variables the user passed, and their names when the user gave them (a dict or
    ``(name, variable)`` pairs); trainable variables only for models, layers and modules."""
    if isinstance(obj, Mapping):
        return [str(k) for k in obj], list(obj.values())
    if isinstance(obj, (list, tuple)):
        items = list(obj)
        if items and all(
            isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in items
        ):
            return [n for n, _ in items], [v for _, v in items]
        return None, items
    weights = getattr(obj, "trainable_weights", None)  # Keras models and layers
    if weights is None and not _is_keras_variable(obj):
        weights = getattr(obj, "trainable_variables", None)  # any tf.Module
    if weights is not None:
        if not weights:
            raise ValueError(
                f"{type(obj).__name__} has no trainable variables yet; build the model first "
                "(call it on a batch, or model.build(input_shape)) or pass its variables"
            )
        return None, list(weights)
    return None, [obj]


def named_variables(obj: Any) -> list[tuple[str, Any]]:
    """``(name, variable)`` pairs for whatever the user passed."""
    names, variables = _items(obj)
    if names is None:
        names = _unique([_variable_name(v, f"var.{i}") for i, v in enumerate(variables)])
    return list(zip(names, variables, strict=True))


class _Layout:
    """What a variable set resolves to, reused while the same variables come back.

    TensorFlow: the names and each variable's resource handle and dtype, so a step is one
    batched read. Keras on torch: the names and the ``Parameter`` behind each Keras variable
    (checked by identity every step), handed to the torch adapter. Keras on JAX: the names (the
    arrays are new every step).
    """

    def __init__(
        self, variables: list[Any], names: list[str], backing: list[Any], framework: str
    ) -> None:
        self.refs = [weakref.ref(v) for v in variables]  # no strong refs: models can go
        self.names = names
        self.framework = framework
        if framework == "tensorflow":
            self.read_all = VariableReader(backing)
        elif framework == "torch":
            self.backing = [weakref.ref(b) for b in backing]
        # JAX: a fit's arrays keep their layout, so only a distributed one pays for the check.
        self.spread = framework == "jax" and spread(backing)

    def matches(self, variables: list[Any], names: list[str] | None) -> bool:
        return (
            len(variables) == len(self.refs)
            and all(r() is v for r, v in zip(self.refs, variables, strict=True))
            and (names is None or names == self.names)
        )

    def read(self, variables: list[Any], live: list[Any] | None) -> Snapshot | None:
        """This step's snapshot, or None when the backing tensors changed."""
        if live is not None or self.framework not in ("tensorflow", "torch"):
            arrays = live if live is not None else [v.value for v in variables]
            if len(arrays) != len(self.names):
                return None
            if self.spread:
                arrays = host_arrays(self.names, arrays)
            return Snapshot(
                names=self.names, tensors=arrays, keepalive=arrays, framework=self.framework
            )
        if self.framework == "tensorflow":
            tensors = self.read_all()
            return Snapshot(
                names=self.names, tensors=tensors, keepalive=tensors, framework="tensorflow"
            )
        backing = [v.value for v in variables]
        if any(b is not r() for b, r in zip(backing, self.backing, strict=True)):
            return None
        return _torch_snapshot(list(zip(self.names, backing, strict=True)))


class VariableReader:
    """Reads a fixed set of TensorFlow resource variables, returning eager tensors that share
    their buffers (drop them before the next ``assign``): all of them in one
    ``_ReadVariablesOp`` (TensorFlow's batched read) where it runs, one ``ReadVariableOp`` each
    where it does not. Keep one while the same variables come back (monitoring layouts and
    recovery snapshots do).

    Inside ``model.fit`` an eager op costs ~45 us whatever it reads (the first one after the
    compiled step over 100 us), so one op for all the variables is the cheapest read there is;
    it adds ~3 us a variable. The batched op is internal to TensorFlow: where a build lacks it or
    refuses the set (variables on different devices), the reader falls back for good.
    """

    def __init__(self, variables: list[Any]) -> None:
        import tensorflow as tf

        self.tf = tf
        self.handles = [v.handle for v in variables]
        self.dtypes = [v.dtype for v in variables]
        self.read_one = tf.raw_ops.ReadVariableOp
        enums = [tf.as_dtype(d).as_datatype_enum for d in self.dtypes]
        self.attrs = ("N", len(variables), "dtypes", enums)
        self.refusals = (tf.errors.OpError, TypeError, ValueError)  # e.g. a device mismatch
        try:
            from tensorflow.python.eager import context, execute

            self.execute, self.context = execute.execute, context.context
        except ImportError:  # the private module moved
            self.batched = False
        else:
            self.batched = len(variables) > 1

    def __call__(self) -> list[Any]:
        _eager(self.tf)
        if self.batched:
            try:
                return list(
                    self.execute(
                        b"_ReadVariablesOp",
                        len(self.handles),
                        inputs=self.handles,
                        attrs=self.attrs,
                        ctx=self.context(),
                    )
                )
            except self.refusals:
                self.batched = False
        reads = zip(self.handles, self.dtypes, strict=True)
        return [self.read_one(resource=h, dtype=d) for h, d in reads]


_layouts: dict[tuple[int, ...], _Layout] = {}


def _cached_layout(variables: list[Any], names: list[str] | None) -> _Layout | None:
    layout = _layouts.get(tuple(map(id, variables)))
    return layout if layout is not None and layout.matches(variables, names) else None


def _remember(
    variables: list[Any], names: list[str], backing: list[Any], framework: str
) -> _Layout | None:
    if framework == "tensorflow":
        if not all(hasattr(b, "handle") and hasattr(b, "assign") for b in backing):
            return None  # plain tensors: nothing to resolve
    elif not all(_is_keras_variable(v) for v in variables):
        return None  # only a Keras variable's `.value` is known to lead back to its data
    try:
        layout = _Layout(variables, names, backing, framework)
    except TypeError:  # an object without weak references
        return None
    if len(_layouts) >= 16:
        _layouts.clear()
    _layouts[tuple(map(id, variables))] = layout
    return layout


# Inside a JAX fit the arrays come from the trainer's state, whose variable list is fixed while
# the model keeps its compiled train function (changing what is trainable takes a compile()):
# the layout is also kept by model and train function, so the layers are not walked every step.
_live_layouts: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[Any], _Layout]] = (
    weakref.WeakKeyDictionary()
)


def _torch_snapshot(named: list[tuple[str, Any]]) -> Snapshot:
    from zetaguard.adapters.torch import snapshot as torch_snapshot

    snap = torch_snapshot(named)
    snap.framework = "keras-torch"
    return snap


def _eager(tf: Any) -> None:
    if not tf.executing_eagerly():
        raise RuntimeError(
            "monitor() was called inside a tf.function; call it eagerly between training "
            "steps (outside the decorated step function)"
        )


def _train_function(model: Any) -> Any:
    return getattr(model, "train_function", None)


def _jax_fit_state(obj: Any) -> list[Any] | None:
    """The live trainable arrays of a Keras model inside a JAX ``fit`` (None elsewhere)."""
    state = getattr(obj, "_jax_state", None)
    if not state or getattr(obj, "_jax_state_synced", True):
        return None
    arrays = state.get("trainable_variables")
    return list(arrays) if arrays else None


def _backing(name: str, v: Any) -> Any:
    """What holds the data: a Keras variable's backend value, a distributed variable's first
    component; plain tensors as they are."""
    if _is_keras_variable(v):
        v = v.value
    values = getattr(v, "values", None)  # tf.distribute.DistributedValues
    if isinstance(values, tuple) and values and type(v).__module__.startswith("tensorflow"):
        v = values[0]
    return v


def _check_dtype(name: str, v: Any) -> None:
    dtype = _dtype_name(v)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {dtype}; zetaguard monitors float32, float64, float16 and "
            "bfloat16 variables. Leave integer and bool variables out of monitor()"
        )


def _read_tf(v: Any, read: Any) -> Any:
    handle = getattr(v, "handle", None)
    if handle is not None and hasattr(v, "assign"):
        # A buffer-sharing read without the tape bookkeeping of `v.value()`.
        return read(resource=handle, dtype=v.dtype)
    return v  # an eager tensor already


def snapshot(obj: Any) -> Snapshot:
    live = _jax_fit_state(obj)
    if live is not None:
        compiled, known = _live_layouts.get(obj, (None, None))
        snap = known.read([], live) if known is not None else None
        if snap is not None and compiled is not None and compiled() is _train_function(obj):
            return snap
    given, variables = _items(obj)
    layout = _cached_layout(variables, given)
    cached = layout.read(variables, live) if layout is not None else None
    if cached is not None:  # the steady state of a training loop
        if live is not None and layout is not None:
            # The layout was learned outside fit (take_reference at train begin): keep it for
            # the live arrays too, or every batch would walk the layers again.
            _remember_live(obj, layout)
        return cached
    named = named_variables(obj if given is not None else variables)
    if live is not None and len(live) == len(named):
        named = [(n, a) for (n, _), a in zip(named, live, strict=True)]
    backing = [(n, _backing(n, v)) for n, v in named]
    for n, b in backing:
        _check_dtype(n, b)
    root = type(backing[0][1]).__module__.partition(".")[0]
    root = "jax" if root == "jaxlib" else root
    if root == "torch":
        snap = _torch_snapshot(backing)
        if live is None:
            _remember(variables, snap.names, [b for _, b in backing], "torch")
        return snap
    if root == "tensorflow":
        import tensorflow as tf

        _eager(tf)
        read = tf.raw_ops.ReadVariableOp
        tensors = [_read_tf(b, read) for _, b in backing]
        for (n, _), t in zip(backing, tensors, strict=True):
            if "CPU" not in t.device.upper():
                raise ValueError(
                    f"{n} lives on {t.device}: the host engine reads CPU memory. Place the "
                    "variables on the CPU, or monitor a CPU copy"
                )
        names = [n for n, _ in backing]
        _remember(variables, names, [b for _, b in backing], "tensorflow")
        return Snapshot(names=names, tensors=tensors, keepalive=tensors, framework="tensorflow")
    tensors = [b for _, b in backing]  # JAX arrays and anything else with DLPack/buffers
    names = [n for n, _ in backing]
    remembered = _remember(variables, names, tensors, root)
    if root == "jax":
        tensors = host_arrays(names, tensors)
    if live is not None and remembered is not None:
        _remember_live(obj, remembered)
    return Snapshot(names=names, tensors=tensors, keepalive=tensors, framework=root)


def _remember_live(obj: Any, layout: _Layout) -> None:
    with contextlib.suppress(TypeError):  # no weak references: walk the model every step
        _live_layouts[obj] = (weakref.ref(_train_function(obj)), layout)
