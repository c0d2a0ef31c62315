"""ZetaKeras on real ``model.fit`` (sklearn digits) for every Keras 3 backend installed.

Each backend runs ``tests/support/keras_runner.py`` once in a subprocess (Keras fixes its backend at
import) and the tests below check its JSON summary.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest

from tests.support.keras_runner import run_in_subprocess

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None, reason="keras is not installed"
)

BACKEND_MODULE = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}


@pytest.fixture(scope="module", params=["tensorflow", "torch", "jax"])
def fit_run(request: pytest.FixtureRequest) -> dict[str, Any]:
    backend = request.param
    if importlib.util.find_spec(BACKEND_MODULE[backend]) is None:
        pytest.skip(f"the {backend} Keras backend is not installed")
    out = run_in_subprocess("fit", backend)
    assert out["backend"] == backend
    return out


@pytest.mark.slow
def test_healthy_fit_raises_no_critical_and_logs_zeta(fit_run: dict[str, Any]) -> None:
    healthy = fit_run["healthy"]
    assert healthy["steps"] == 96  # 1024 samples / 32 per batch x 3 epochs
    assert healthy["status_counts"]["CRITICAL"] == 0
    assert sum(healthy["status_counts"].values()) == 96  # every batch was scored
    # In the batch logs (progress bar) and the epoch logs (History).
    assert healthy["batch_logs_with_zeta"] == 96
    assert {"zeta", "zeta_status"} <= set(healthy["history_keys"])
    assert len(healthy["history_zeta"]) == 3
    assert all(math.isfinite(z) for z in healthy["history_zeta"])
    assert healthy["history_status"] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_a_fit_unstable_from_its_first_update_is_critical_at_once(fit_run: dict[str, Any]) -> None:
    """The callback takes its reference before the first step: the first update's blow-up is
    measured against the weights it started from, not learned as the starting point."""
    unstable = fit_run["unstable"]
    assert unstable["steps"] == 32
    assert unstable["statuses"][0] == 2.0  # the very first step (it had no reference before)
    assert unstable["status_counts"]["CRITICAL"] >= 25


@pytest.mark.slow
def test_weights_read_during_fit_are_the_live_weights(fit_run: dict[str, Any]) -> None:
    """The raw JAR the guard computed from its zero-copy reads equals JAR as specified, applied
    in NumPy to copies of the weights taken at the same batches."""
    pairs = fit_run["healthy"]["jar_pairs"]
    assert len(pairs) >= 30
    for ours, reference in pairs:
        assert ours == pytest.approx(reference, rel=1e-9)


@pytest.mark.slow
def test_lr_blowup_is_caught_and_stops_training(fit_run: dict[str, Any]) -> None:
    blowup = fit_run["blowup"]
    # The LR jumps to 20 before step 60: nothing CRITICAL before it, caught within 3 steps.
    assert blowup["first_critical"] is not None
    assert 60 <= blowup["first_critical"] <= 62
    assert blowup["stopped"] == [True]
    assert blowup["steps"] == blowup["first_critical"] + 1  # fit stopped at that batch
    assert blowup["status_counts"]["CRITICAL"] == 1


@pytest.mark.slow
def test_recovery_restores_weights_and_optimizer_and_cuts_lr(fit_run: dict[str, Any]) -> None:
    rec = fit_run["recovery"]
    assert rec["reports"], "the blow-up triggered no recovery"
    check = rec["restore_check"]
    assert check is not None
    assert 60 <= check["step"] <= 62
    assert check["restored_step"] < 60  # a snapshot from before the LR jump
    # Right after the rollback the weights are bit-for-bit those of the restored step...
    assert check["max_abs_diff"] == 0.0
    # ...and so is the optimizer's step counter (optimizer variables came back too).
    assert check["iterations_after"] == check["iterations_at_snapshot"]
    first = rec["reports"][0]
    assert first["lr_before"] == pytest.approx(20.0)
    assert first["lr_after"] < first["lr_before"]
    # Training went on from the restored state with finite weights and a cut LR; if trouble
    # came back until the ladder gave up, fit stopped because the guard said so.
    assert rec["final_finite"]
    assert rec["final_lr"] < 20.0
    assert rec["steps"] > check["step"] + 1
    if rec["stop_training"]:
        assert rec["reports"][-1]["stopped"]
    else:
        assert rec["steps"] == 128


@pytest.mark.slow
def test_beside_early_stopping_checkpoint_and_tensorboard(fit_run: dict[str, Any]) -> None:
    cbs = fit_run["callbacks"]
    assert cbs["epochs"] == 2
    assert {"loss", "zeta", "zeta_status"} <= set(cbs["history_keys"])
    assert cbs["checkpoint"]
    assert cbs["tb_batch_zeta"]  # TensorBoard took our entries as scalars
    # Wherever this Keras/TensorBoard pair writes epoch scalars, zeta is among them.
    assert cbs["tb_epoch_zeta"] == cbs["tb_epoch_loss"]


@pytest.mark.slow
def test_refit_with_another_layer_frozen_watches_what_is_trainable(
    fit_run: dict[str, Any],
) -> None:
    """On JAX the model's layout is kept between the steps of a fit; after freezing another
    layer of the same shape and compiling again, the next fit must not read under the old
    names."""
    refit = fit_run["refit"]
    first, second = refit["watched"]
    layers = refit["layers"]
    assert len(first) == len(second) == 3
    frozen_first = [g for g in first if layers[1] in g or layers[2] in g]
    frozen_second = [g for g in second if layers[1] in g or layers[2] in g]
    assert frozen_first == [g for g in first if layers[2] in g]
    assert len(frozen_first) == 1
    assert frozen_second == [g for g in second if layers[1] in g]
    assert len(frozen_second) == 1
