"""Shared fixtures. Every cohort used here is synthetic and small."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import pytest

# Deterministic single-threaded OpenCV in tests (the machine has 2 cores; CI too).
cv2.setNumThreads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Test modules of the device side (edge, firmware_bridge, the wire contract, the device
# commands and their installer): marked ``device``, and the only ones run on Python 3.10, the
# Python of JetPack 6's TensorRT bindings (``pytest -m device``; scripts/test runs that leg).
# They may render test images with the cohort simulator but need no PyTorch.
DEVICE_TEST_MODULES = frozenset(
    {
        "test_answer.py",
        "test_bridge.py",
        "test_bridge_serial.py",
        "test_clinical.py",
        "test_edge_runtime.py",
        "test_engine_cache_key.py",
        "test_fsutil.py",
        "test_fuzz_ingest.py",
        "test_ingest.py",
        "test_mqtt_outbox.py",
        "test_mqtt_tls.py",
        "test_overlay.py",
        "test_preprocess.py",
        "test_py310_compat.py",
        "test_screen_web.py",
        "test_security_audit.py",
        "test_security_deid.py",
        "test_security_faults.py",
        "test_security_hostile.py",
        "test_security_sbom.py",
        "test_shipped_models.py",
        "test_systemd_mosquitto.py",
        "test_systemd_notify.py",
        "test_systemd_units.py",
        "test_tensorrt.py",
        "test_tensorrt_fallback.py",
    }
)
# Modules with some tests marked ``device`` one by one: on an older Python the others skip.
MIXED_TEST_MODULES = frozenset({"test_install.py"})
# The training side (model, quantize, cohort checks, dashboard, bench) may need Python 3.11+.
TRAINING_SIDE_PYTHON = (3, 11)


class _TrainingSideModule(pytest.Module):
    """A test module of the training side, on an older Python: skipped as a whole."""

    def collect(self):  # pytest's collector protocol
        need = ".".join(map(str, TRAINING_SIDE_PYTHON))
        here = ".".join(map(str, sys.version_info[:2]))
        pytest.skip(
            f"training side: needs Python {need} or newer (only the device tests run on {here})",
            allow_module_level=True,
        )


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    runs_here = DEVICE_TEST_MODULES | MIXED_TEST_MODULES
    if sys.version_info < TRAINING_SIDE_PYTHON and module_path.name not in runs_here:
        return _TrainingSideModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    old_python = sys.version_info < TRAINING_SIDE_PYTHON
    for item in items:
        if item.path.name in DEVICE_TEST_MODULES:
            item.add_marker(pytest.mark.device)
        elif old_python and item.get_closest_marker("device") is None:
            item.add_marker(pytest.mark.skip(reason="training side: needs Python 3.11 or newer"))


@pytest.fixture(scope="session")
def small_hand_cohort(tmp_path_factory: pytest.TempPathFactory):
    """Six rendered hand radiographs at reduced size (max side 384 px), with masks."""
    from cohort.generate import SimulateOptions, simulate

    out = tmp_path_factory.mktemp("hand_cohort")
    simulate(out, "hand", 6, 11, options=SimulateOptions(max_side=384, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def device_scans(tmp_path_factory: pytest.TempPathFactory):
    """Three hand and two hip radiographs at the reference models' resolution (1024 px)."""
    from cohort.generate import SimulateOptions, simulate

    out = tmp_path_factory.mktemp("device_scans")
    opts = SimulateOptions(max_side=1024, workers=1, counterfactual=False, compression="none")
    simulate(out / "hand", "hand", 3, 21, options=opts, progress=False)
    simulate(out / "hip", "hip", 2, 22, options=opts, progress=False)
    return sorted((out / "hand").glob("*.dcm")) + sorted((out / "hip").glob("*.dcm"))


@pytest.fixture()
def device_config(tmp_path):
    """A configuration for a device whose data lives in ``tmp_path`` (reference models)."""
    from pathlib import Path

    from osteofy.config import Config

    models = Path(__file__).parent.parent / "models"
    return Config(data_dir=tmp_path / "var", models_dir=models, precision="fp32", mqtt={"url": ""})
