"""The engine cache key changes whenever TensorRT would refuse a plan, and a cached plan is
trusted only once TensorRT has deserialized it (fakes of ``fake_tensorrt``: no GPU needed)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import fake_tensorrt
import pytest

from edge import engines
from edge.engines import DeviceInfo, entry_paths, key_for, l4t_release, probe_device
from edge.package import load_package
from quantize import engine as qengine
from quantize.engine import build_engine, timing_cache_path

ROOT = Path(__file__).resolve().parent.parent
HAND = ROOT / "models" / "hand-v1"
JP61 = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: x\n"


def _device(
    monkeypatch: pytest.MonkeyPatch, folder: Path, l4t: str = JP61, **faults: object
) -> DeviceInfo:
    """What ``probe_device`` reports on a fake device with ``faults`` and this L4T line."""
    folder.mkdir(parents=True, exist_ok=True)
    release = folder / "nv_tegra_release"
    release.write_text(l4t)
    monkeypatch.setattr(engines, "TEGRA_RELEASE", str(release))
    fake_tensorrt.install(monkeypatch, fake_tensorrt.Faults(**faults))  # type: ignore[arg-type]
    return probe_device()


def test_probe_reports_every_fact_of_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dev = _device(monkeypatch, tmp_path)
    assert dev == DeviceInfo("Orin", "8.7", "10.3.0.30", "12.6", "R36.4.0")


@pytest.mark.parametrize(
    "change",
    [
        {"version": "10.3.0.31"},  # TensorRT build number alone
        {"version": "10.7.0.23"},
        {"driver_version": 12020},  # CUDA 12.2
        {"gpu_name": "Orin (nvgpu) 16GB"},
        {"cc": (7, 2)},
        {"l4t": "# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic\n"},  # JetPack 6.0
        {"l4t": ""},  # not a Jetson
    ],
)
def test_each_device_fact_changes_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict
) -> None:
    pkg = load_package(HAND)
    base = key_for(pkg, _device(monkeypatch, tmp_path / "a"), "int8")
    other = key_for(pkg, _device(monkeypatch, tmp_path / "b", **change), "int8")
    assert other != base and other.digest != base.digest


def test_model_file_and_precision_change_the_key() -> None:
    pkg = load_package(HAND)
    dev = DeviceInfo("Orin", "8.7", "10.3.0.30", "12.6", "R36.4.0")
    int8, fp16 = key_for(pkg, dev, "int8"), key_for(pkg, dev, "fp16")
    assert int8.digest != fp16.digest and int8.model_sha256 != fp16.model_sha256
    assert replace(int8, model_sha256="0" * 64).digest != int8.digest


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (JP61, "R36.4.0"),
        ("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64\n", "R35.5.0"),
        ("something else entirely\n", "something else entirely"),
        ("", ""),
    ],
)
def test_l4t_release_is_read_from_nv_tegra_release(tmp_path: Path, text: str, want: str) -> None:
    path = tmp_path / "nv_tegra_release"
    path.write_text(text)
    assert l4t_release(path) == want
    assert l4t_release(tmp_path / "absent") == ""


def _package(tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(HAND, dst, ignore=shutil.ignore_patterns("eval*", "model.int8.onnx", "quant*"))
    card = json.loads((dst / "card.json").read_text())
    card["files"] = {"model.onnx": card["files"]["model.onnx"]}
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def test_a_cached_plan_that_does_not_deserialize_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cache entry is intact (key and sha256 match) but TensorRT refuses the bytes."""
    faults_dev = _device(monkeypatch, tmp_path / "dev")
    model_dir, cache = _package(tmp_path), tmp_path / "engines"
    plans = [b"corrupt-plan", fake_tensorrt.PLAN]
    built: list[bytes] = []
    timing: list[Path | None] = []

    def serialize(onnx_path: Path, precision: str, *args: object) -> bytes:
        timing.append(args[-1])  # type: ignore[arg-type]
        built.append(plans[len(built)])
        return built[-1]

    monkeypatch.setattr(qengine, "_serialize", serialize)
    path = build_engine(model_dir, cache, precision="fp16")
    assert path.read_bytes() == b"corrupt-plan" and len(built) == 1
    again = build_engine(model_dir, cache, precision="fp16")  # cached, but does not load
    assert again == path and len(built) == 2 and path.read_bytes() == fake_tensorrt.PLAN
    assert build_engine(model_dir, cache, precision="fp16") == path  # loads: reused
    assert len(built) == 2
    key = key_for(load_package(model_dir), faults_dev, "fp16")
    assert entry_paths(cache, key)[0] == path
    assert timing == [timing_cache_path(cache, faults_dev)] * 2


def test_timing_cache_is_per_device(tmp_path: Path) -> None:
    dev = DeviceInfo("Orin", "8.7", "10.3.0.30", "12.6", "R36.4.0")
    path = timing_cache_path(tmp_path, dev)
    assert path.parent == tmp_path / "timing" and path.suffix == ".cache"
    assert timing_cache_path(tmp_path, replace(dev, cuda_version="12.2")) != path
