"""TensorRT that cannot run — too old, out of GPU memory, failing mid-study — never crashes
the device: the gate says why in one line, and ``backend: auto`` screens on ONNX Runtime.

TensorRT and pycuda are replaced by the fakes of ``fake_tensorrt``, which never compute a
result (their execution always fails), so every result checked here comes from ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fake_tensorrt
import pytest

from edge.doctor import run_doctor
from edge.engines import key_for, probe_device, store_engine, tensorrt_status
from edge.package import load_package
from edge.runtime import Screener
from osteofy.config import Config
from osteofy.errors import Unavailable

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
HAND = MODELS / "hand-v2"  # the newest hand package: the one the device runs


def _config(tmp_path: Path, backend: str = "auto") -> Config:
    # int8: what TensorRT would run; ONNX Runtime runs it too (its gates passed), and an
    # explicit precision spares the fp32-vs-int8 measurement of ``precision: auto``.
    return Config(
        data_dir=tmp_path / "var",
        models_dir=MODELS,
        backend=backend,  # type: ignore[arg-type]
        precision="int8",
        mqtt={"url": ""},  # type: ignore[arg-type]
    )


def _cache_hand_plan(cfg: Config) -> None:
    """A cached 'engine' for the hand package as the fake device would key it (bytes, never run)."""
    pkg = load_package(HAND)
    store_engine(
        cfg.data_dir / "engines", key_for(pkg, probe_device(), "int8"), fake_tensorrt.PLAN, {}
    )


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and exc.value.exit_code == 4
    return msg


@pytest.mark.parametrize("version", ["8.6.2", "8.5.2.2", "7.1.3", ""])
def test_tensorrt_before_10_is_refused_with_what_was_found(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(version=version))
    with pytest.raises(Unavailable) as exc:
        probe_device()
    msg = _one_line(exc)
    assert "TensorRT 10 or newer" in msg
    assert (f"TensorRT {version} found" if version else "without a version") in msg
    ok, why = tensorrt_status()
    assert not ok and why == msg


def test_tensorrt_10_passes_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tensorrt.install(monkeypatch)
    dev = probe_device()
    assert (dev.tensorrt_version, dev.gpu_name, dev.compute_capability) == (
        "10.3.0.30",
        "Orin",
        "8.7",
    )


def test_building_with_tensorrt_8_is_refused_before_any_tensorrt_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Regression: JetPack 6.0's TensorRT 8.6 used to die with a raw AttributeError."""
    from quantize.engine import build_engine

    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(version="8.6.2"))
    with pytest.raises(Unavailable) as exc:
        build_engine(HAND, tmp_path / "engines", precision="fp16")
    assert "TensorRT 8.6.2 found" in _one_line(exc)
    assert not (tmp_path / "engines").exists()


def test_auto_with_tensorrt_8_screens_on_onnxruntime_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    device_scans: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(version="8.6.2"))
    with caplog.at_level(logging.INFO, logger="edge.select"):
        screener = Screener(_config(tmp_path))
    hand = screener.models["hand"].choice
    assert hand.backend.name == "onnxruntime" and not hand.may_fall_back
    assert hand.fallback.startswith("TensorRT unavailable: TensorRT 8.6.2 found")
    assert "TensorRT 8.6.2 found" in hand.reason and hand.summary["fallback"] == hand.fallback
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "8.6.2" in r.message]
    assert infos, "the fallback reason is logged at INFO"
    result = screener.screen(device_scans[0]).result
    assert result.model.backend == "onnxruntime" and result.model.precision == "int8"


def test_out_of_gpu_memory_at_load_falls_back_and_frees_what_it_took(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device_scans: list[Path]
) -> None:
    faults = fake_tensorrt.install(
        monkeypatch, fake_tensorrt.Faults(mem_alloc="cuMemAlloc failed: out of memory")
    )
    cfg = _config(tmp_path)
    _cache_hand_plan(cfg)
    screener = Screener(cfg)
    hand = screener.models["hand"].choice
    assert faults.deserialized == [fake_tensorrt.PLAN]  # the engine was really tried
    assert hand.backend.name == "onnxruntime"
    assert "TensorRT/CUDA failed loading" in hand.fallback and "out of memory" in hand.fallback
    assert faults.detached == [1]  # the primary context retained for the engine is released
    assert screener.screen(device_scans[0]).result.model.backend == "onnxruntime"


def test_explicit_tensorrt_out_of_memory_is_one_line_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(mem_alloc="out of memory"))
    cfg = _config(tmp_path, backend="tensorrt")
    _cache_hand_plan(cfg)
    with pytest.raises(Unavailable) as exc:
        Screener(cfg)  # asked for explicitly: refused, not replaced (hip has no engine either)
    msg = _one_line(exc)
    assert "hand: TensorRT/CUDA failed loading" in msg and "out of memory" in msg


def test_a_cuda_error_mid_study_falls_back_and_the_study_is_screened(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device_scans: list[Path]
) -> None:
    faults = fake_tensorrt.install(monkeypatch)
    cfg = _config(tmp_path)
    _cache_hand_plan(cfg)
    screener = Screener(cfg)
    before = screener.models["hand"]
    assert before.choice.backend.name == "tensorrt" and before.choice.may_fall_back
    assert len(faults.allocations) == 7  # one device buffer per I/O tensor, allocated once

    result = screener.screen(device_scans[0]).result  # the fake engine fails: ONNX Runtime
    after = screener.models["hand"]
    assert result.model.backend == "onnxruntime" and result.model.precision == "int8"
    assert (
        result.model.sha256 == after.sha256 == load_package(HAND).card["files"]["model.int8.onnx"]
    )
    assert after.choice.fallback.startswith("TensorRT failed at run time")
    assert "illegal memory access" in after.choice.reason
    assert len(faults.freed) == 7 and faults.detached == [1]  # the engine was released
    with pytest.raises(Unavailable, match="closed"):
        before.choice.backend.run(*_inputs())
    assert screener.screen(device_scans[1]).result.model.backend == "onnxruntime"


def test_explicit_tensorrt_failing_mid_study_is_unavailable_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device_scans: list[Path]
) -> None:
    fake_tensorrt.install(monkeypatch)
    cfg = _config(tmp_path, backend="tensorrt")
    _cache_hand_plan(cfg)
    screener = Screener(cfg)
    with pytest.raises(Unavailable) as exc:
        screener.screen(device_scans[0])
    assert "TensorRT/CUDA failed running" in _one_line(exc)
    screener.close()
    screener.close()  # twice is harmless


def test_doctor_shows_the_gate_and_the_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(version="8.6.2"))
    assert run_doctor(_config(tmp_path), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert not checks["tensorrt"]["ok"]
    assert checks["tensorrt"]["detail"].startswith("TensorRT 8.6.2 found")
    assert "onnxruntime/int8: TensorRT unavailable: TensorRT 8.6.2" in checks["site hand"]["detail"]


def _inputs() -> tuple:
    import numpy as np

    return np.zeros((1, 1, 320, 320), np.float32), np.zeros((1, 26), np.float32)
