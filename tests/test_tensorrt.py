"""TensorRT path: engine cache, binding plan, precision rules, lazy imports — and, where a GPU
with TensorRT is present, a real engine compared with ONNX Runtime FP32.

Everything except the last test runs without TensorRT, and stays true on a machine that has it
(absence is simulated through ``sys.modules``, not assumed).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from edge.backends.tensorrt import (
    BindingPlan,
    ExpectedIO,
    TensorDesc,
    backend_for_package,
    batch_slices,
    check_inputs,
    plan_bindings,
)
from edge.engines import (
    DeviceInfo,
    EngineKey,
    entry_paths,
    find_engine,
    key_for,
    model_dir_name,
    probe_device,
    source_onnx,
    store_engine,
    tensorrt_status,
)
from edge.package import load_package, sha256_file
from osteofy.errors import Unavailable, UsageError
from quantize import engine as qengine
from quantize.engine import (
    build_engine,
    build_settings,
    check_fp16_platform,
    check_int8_platform,
    check_qdq_model,
    describe_settings,
    profile_shapes,
)

ROOT = Path(__file__).resolve().parent.parent
HAND = ROOT / "models" / "hand-v1"
KEY = EngineKey(
    model_name="hand-v1",
    gpu_name="Orin",
    compute_capability="8.7",
    tensorrt_version="10.3.0.30",
    cuda_version="12.6",
    l4t_release="R36.4.0",
    model_sha256="ab" * 32,
    precision="int8",
)
DEVICE = DeviceInfo(
    gpu_name="Orin",
    compute_capability="8.7",
    tensorrt_version="10.3.0.30",
    cuda_version="12.6",
    l4t_release="R36.4.0",
)
EXPECTED = ExpectedIO(image_size=320, clinical_width=26)


def _one_line_unavailable(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert exc.value.exit_code == 4
    assert "\n" not in msg and msg
    return msg


# --- cache key -------------------------------------------------------------------------------


def test_digest_is_stable_across_processes() -> None:
    code = f"from edge.engines import EngineKey;print(EngineKey(**{KEY.as_dict()!r}).digest)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == KEY.digest
    assert len(KEY.digest) == 24 and int(KEY.digest, 16) >= 0
    # A regression guard: changing the digest recipe silently orphans every device's cache.
    # (Changed once on purpose: schema v2 added the CUDA and L4T versions to the key.)
    assert KEY.digest == "867e9ec01c7818d0e7e2ca4e"


@pytest.mark.parametrize("field", [f.name for f in fields(EngineKey)])
def test_every_key_field_changes_the_digest(field: str) -> None:
    changed = replace(KEY, **{field: getattr(KEY, field) + "x"})
    assert changed.digest != KEY.digest


def test_key_round_trips_through_its_dict() -> None:
    assert EngineKey.from_dict(KEY.as_dict()) == KEY
    with pytest.raises(ValueError):
        EngineKey.from_dict({**KEY.as_dict(), "extra": "1"})


def test_key_for_a_package_uses_the_card_digest_of_the_source_file() -> None:
    pkg = load_package(HAND)
    key = key_for(pkg, DEVICE, "fp16")
    assert key.model_sha256 == pkg.card["files"]["model.onnx"] == sha256_file(HAND / "model.onnx")
    assert (key.model_name, key.gpu_name, key.compute_capability) == ("hand-v1", "Orin", "8.7")
    assert key.tensorrt_version == "10.3.0.30" and key.precision == "fp16"
    assert (key.cuda_version, key.l4t_release) == ("12.6", "R36.4.0")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200, "a\\b"])
def test_model_names_that_could_escape_the_cache_are_refused(name: str) -> None:
    with pytest.raises(Unavailable):
        model_dir_name(name)


# --- cache entries -----------------------------------------------------------------------------


def test_stored_engine_is_found_with_its_sidecar(tmp_path: Path) -> None:
    path = store_engine(tmp_path, KEY, b"serialized-engine", {"workspace_mb": 1024})
    assert path == tmp_path / "hand-v1" / f"{KEY.digest}.engine"
    assert find_engine(tmp_path, KEY) == path
    assert path.read_bytes() == b"serialized-engine"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["key"] == KEY.as_dict() and meta["settings"] == {"workspace_mb": 1024}
    assert meta["engine_bytes"] == len(b"serialized-engine")


def test_another_key_does_not_find_the_engine(tmp_path: Path) -> None:
    store_engine(tmp_path, KEY, b"engine", {})
    for other in (replace(KEY, tensorrt_version="10.3.0.31"), replace(KEY, gpu_name="Xavier")):
        assert find_engine(tmp_path, other) is None


def test_a_sidecar_recorded_for_another_key_is_not_trusted(tmp_path: Path) -> None:
    path = store_engine(tmp_path, KEY, b"engine", {})
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["tensorrt_version"] = "8.6.1"
    sidecar.write_text(json.dumps(meta))
    assert find_engine(tmp_path, KEY) is None


@pytest.mark.parametrize("damage", ["truncate", "replace", "no_sidecar", "garbage_sidecar"])
def test_damaged_entries_are_not_used(tmp_path: Path, damage: str) -> None:
    path = store_engine(tmp_path, KEY, b"engine-bytes", {})
    sidecar = path.with_suffix(".json")
    if damage == "truncate":
        path.write_bytes(b"engine")
    elif damage == "replace":
        path.write_bytes(b"ENGINE-BYTES")  # same size, other content
    elif damage == "no_sidecar":
        sidecar.unlink()
    else:
        sidecar.write_text("{not json")
    assert find_engine(tmp_path, KEY) is None


def test_a_crash_between_engine_and_sidecar_never_yields_a_mismatched_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.engines as engines

    store_engine(tmp_path, KEY, b"engine-v1", {})
    real = engines.atomic_write_bytes

    def crash_on_sidecar(path: Path, data: bytes) -> None:
        if path.suffix == ".json":
            raise OSError("power cut")
        real(path, data)

    monkeypatch.setattr(engines, "atomic_write_bytes", crash_on_sidecar)
    with pytest.raises(OSError):
        store_engine(tmp_path, KEY, b"engine-v2", {})
    engine, _ = entry_paths(tmp_path, KEY)
    assert engine.read_bytes() == b"engine-v2"  # new engine, old sidecar
    assert find_engine(tmp_path, KEY) is None
    leftovers = [p.name for p in engine.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    monkeypatch.setattr(engines, "atomic_write_bytes", real)
    assert find_engine(tmp_path, KEY) is None
    assert store_engine(tmp_path, KEY, b"engine-v2", {}) == engine
    assert find_engine(tmp_path, KEY) == engine


# --- binding plan ------------------------------------------------------------------------------


def _engine_io(**change: TensorDesc | None) -> list[TensorDesc]:
    """What TensorRT reports for a hand-v1 engine with a 1..4 batch profile."""
    io = {
        "image": TensorDesc("image", True, "float32", (-1, 1, 320, 320), (4, 1, 320, 320)),
        "clinical": TensorDesc("clinical", True, "float32", (-1, 26), (4, 26)),
        "probs": TensorDesc("probs", False, "float32", (-1, 3)),
        "tscore": TensorDesc("tscore", False, "float32", (-1, 1)),
        "cam": TensorDesc("cam", False, "float32", (-1, 3, 20, 20)),
        "clinical_attr": TensorDesc("clinical_attr", False, "float32", (-1, 3, 26)),
        "ood": TensorDesc("ood", False, "float32", (-1, 1)),
    }
    for name, desc in change.items():
        if desc is None:
            io.pop(name)
        else:
            io[name] = desc
    return list(io.values())


def test_plan_for_a_matching_engine() -> None:
    plan = plan_bindings(_engine_io(), EXPECTED)
    assert plan.max_batch == 4
    assert plan.inputs == ("image", "clinical")
    assert plan.outputs == ("probs", "tscore", "cam", "clinical_attr", "ood")
    assert plan.shape("image", 2) == (2, 1, 320, 320)
    assert plan.nbytes("image", 2) == 2 * 320 * 320 * 4
    assert plan.shape("cam", 3) == (3, 3, 20, 20)
    assert plan.nbytes("clinical_attr", 4) == 4 * 3 * 26 * 4
    with pytest.raises(ValueError):
        plan.shape("probs", 5)  # beyond the profile


def test_plan_binds_by_name_not_by_index() -> None:
    io = _engine_io()
    shuffled = [io[i] for i in (4, 6, 0, 3, 1, 5, 2)]  # TensorRT may order I/O tensors freely
    assert plan_bindings(shuffled, EXPECTED) == plan_bindings(io, EXPECTED)


def test_extra_engine_outputs_get_buffers_but_are_not_expected() -> None:
    io = [*_engine_io(), TensorDesc("debug", False, "float32", (-1, 7))]
    plan = plan_bindings(io, EXPECTED)
    assert plan.outputs[-1] == "debug" and plan.shape("debug", 1) == (1, 7)


def test_extra_outputs_without_a_numpy_type_are_refused() -> None:
    io = [*_engine_io(), TensorDesc("aux", False, "DataType.BF16", (-1, 2))]
    with pytest.raises(Unavailable, match="'aux' has type DataType.BF16"):
        plan_bindings(io, EXPECTED)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ood": None}, ["no output 'ood'"]),
        ({"probs": None}, ["no output 'probs'"]),
        (
            {"image": TensorDesc("image", True, "float32", (-1, 1, 384, 384), (4, 1, 384, 384))},
            ["'image'", "384", "320", "another model"],
        ),
        (
            {"clinical": TensorDesc("clinical", True, "float32", (-1, 20), (4, 20))},
            ["'clinical'", "[N, 20]", "[N, 26]"],
        ),
        ({"probs": TensorDesc("probs", False, "float16", (-1, 3))}, ["float16", "float32"]),
        ({"cam": TensorDesc("cam", False, "float32", (-1, 2, 20, 20))}, ["'cam'"]),
        ({"ood": TensorDesc("ood", True, "float32", (-1, 1), (4, 1))}, ["'ood' is not an output"]),
        ({"clinical": None}, ["no input 'clinical'"]),
    ],
)
def test_plan_mismatches_are_one_line_unavailable(change: dict, words: list[str]) -> None:
    with pytest.raises(Unavailable) as exc:
        plan_bindings(_engine_io(**change), EXPECTED)
    msg = _one_line_unavailable(exc)
    for word in words:
        assert word in msg
    assert "osteofy build-engine" in msg


def test_an_unknown_engine_input_is_refused() -> None:
    io = [*_engine_io(), TensorDesc("mask", True, "float32", (-1, 5), (4, 5))]
    with pytest.raises(Unavailable, match="mask"):
        plan_bindings(io, EXPECTED)


def test_dynamic_output_dims_are_resolved_from_the_context() -> None:
    io = _engine_io(cam=TensorDesc("cam", False, "float32", (-1, 3, -1, -1)))
    plan = plan_bindings(io, EXPECTED)
    with pytest.raises(ValueError, match="not resolved"):
        plan.shape("cam", 1)
    at_max = {n: (4, *plan.sample_shapes[n]) for n in plan.outputs if n != "cam"}
    resolved = plan.with_output_shapes({**at_max, "cam": (4, 3, 10, 10)})
    assert isinstance(resolved, BindingPlan)
    assert resolved.shape("cam", 2) == (2, 3, 10, 10)
    with pytest.raises(Unavailable, match="batch"):
        plan.with_output_shapes({**at_max, "cam": (3, 3, 10, 10)})
    with pytest.raises(Unavailable, match="unresolved"):
        plan.with_output_shapes({**at_max, "cam": (4, 3, -1, 10)})


def test_static_batch_engines_have_that_max_batch() -> None:
    io = _engine_io(
        image=TensorDesc("image", True, "float32", (1, 1, 320, 320)),
        clinical=TensorDesc("clinical", True, "float32", (1, 26)),
    )
    assert plan_bindings(io, EXPECTED).max_batch == 1


def test_batches_larger_than_the_profile_are_split() -> None:
    assert batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batch_slices(1, 4) == [slice(0, 1)]
    with pytest.raises(ValueError):
        batch_slices(0, 4)


def test_inputs_are_checked_against_the_card() -> None:
    img, clin = np.zeros((2, 1, 320, 320), np.float32), np.zeros((2, 26), np.float32)
    assert check_inputs(img, clin, EXPECTED) == 2
    with pytest.raises(ValueError, match="image"):
        check_inputs(np.zeros((2, 1, 300, 300), np.float32), clin, EXPECTED)
    with pytest.raises(ValueError, match="clinical"):
        check_inputs(img, np.zeros((2, 25), np.float32), EXPECTED)
    with pytest.raises(ValueError, match="batch"):
        check_inputs(img, np.zeros((3, 26), np.float32), EXPECTED)


def test_expected_io_comes_from_the_card() -> None:
    exp = ExpectedIO.from_card(load_package(HAND).card)
    assert (exp.image_size, exp.clinical_width, exp.n_classes) == (320, 26, 3)
    with pytest.raises(Unavailable):
        ExpectedIO.from_card({"input": {"image": [3, 320, 320], "clinical": 26}})


# --- precision rules ---------------------------------------------------------------------------


def _copy_package(dst: Path) -> Path:
    """hand-v1 as it is today (FP32 only) — independent of a later model.int8.onnx in models/."""
    dst.mkdir()
    card = json.loads((HAND / "card.json").read_text())
    card["files"] = {"model.onnx": card["files"]["model.onnx"]}
    (dst / "card.json").write_text(json.dumps(card))
    shutil.copyfile(HAND / "model.onnx", dst / "model.onnx")
    return dst


def test_precision_selects_the_source_file(tmp_path: Path) -> None:
    pkg = load_package(_copy_package(tmp_path / "pkg"))
    assert source_onnx(pkg, "fp16").name == "model.onnx"
    with pytest.raises(Unavailable) as exc:
        source_onnx(pkg, "int8")
    msg = _one_line_unavailable(exc)
    assert "model.int8.onnx" in msg and "--precision fp16" in msg
    with pytest.raises(UsageError) as usage:
        source_onnx(pkg, "fp32")
    assert usage.value.exit_code == 2


def test_int8_without_the_int8_file_is_refused_not_downgraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _copy_package(tmp_path / "pkg")
    cache = tmp_path / "engines"

    def must_not_build(*args: object, **kw: object) -> bytes:
        raise AssertionError("an engine build was attempted")

    def must_not_probe() -> DeviceInfo:
        raise AssertionError("refusal must come from the package, before any device probe")

    monkeypatch.setattr(qengine, "_serialize", must_not_build)
    monkeypatch.setattr(qengine, "probe_device", must_not_probe)
    with pytest.raises(Unavailable, match="model.int8.onnx"):
        build_engine(model_dir, cache, precision="int8")
    assert not cache.exists()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"precision": "fp32"}, UsageError),
        ({"precision": "auto"}, UsageError),
        ({"max_batch": 0}, UsageError),
        ({"workspace_mb": 1}, UsageError),
    ],
)
def test_bad_build_arguments_are_usage_errors(tmp_path: Path, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        build_engine(HAND, tmp_path, **kwargs)


def test_a_tampered_package_is_refused_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _copy_package(tmp_path / "pkg")
    with (model_dir / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    monkeypatch.setattr(qengine, "probe_device", lambda: DEVICE)
    with pytest.raises(Unavailable, match="integrity"):
        build_engine(model_dir, tmp_path / "engines", precision="fp16")


@pytest.mark.parametrize(
    ("cc", "flag", "ok"),
    [("8.7", None, True), ("7.2", True, True), ("6.1", None, True), ("5.3", None, False),
     ("6.2", None, False), ("6.0", None, False), ("8.7", False, False)],
)  # fmt: skip
def test_int8_needs_a_gpu_with_int8(cc: str, flag: bool | None, ok: bool) -> None:
    if ok:
        check_int8_platform(cc, flag)
    else:
        with pytest.raises(Unavailable, match="no fast INT8"):
            check_int8_platform(cc, flag)


@pytest.mark.parametrize(
    ("cc", "flag", "ok"),
    [("8.7", None, True), ("5.3", None, True), ("6.1", None, False), ("8.7", False, False)],
)
def test_fp16_needs_a_gpu_with_fp16(cc: str, flag: bool | None, ok: bool) -> None:
    if ok:
        check_fp16_platform(cc, flag)
    else:
        with pytest.raises(Unavailable, match="no fast FP16"):
            check_fp16_platform(cc, flag)


def test_profile_covers_batch_one_to_max() -> None:
    prof = profile_shapes(EXPECTED, 4)
    assert prof["image"] == ((1, 1, 320, 320), (1, 1, 320, 320), (4, 1, 320, 320))
    assert prof["clinical"] == ((1, 26), (1, 26), (4, 26))


def test_build_settings_say_how_each_precision_is_built() -> None:
    int8 = build_settings("int8", 1024, 4, EXPECTED)
    assert int8["source"] == "model.int8.onnx" and int8["network"] == "strongly_typed"
    assert int8["builder_flags"] == [] and int8["quantization"] == "explicit (QDQ)"
    fp16 = build_settings("fp16", 1024, 4, EXPECTED)
    assert fp16["source"] == "model.onnx" and fp16["builder_flags"] == ["FP16"]
    assert fp16["profile"]["image"]["max"] == [4, 1, 320, 320]
    json.dumps(int8)  # goes into the sidecar as is
    assert describe_settings(int8) == (
        "int8 from model.int8.onnx (strongly_typed), batch 1..4, workspace 1024 MB"
    )


def test_build_reuses_the_cache_and_rebuilds_on_force_or_new_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cache orchestration only: the bytes stand in for an engine and are never executed."""
    model_dir = _copy_package(tmp_path / "pkg")
    cache = tmp_path / "engines"
    builds: list[int] = []

    def serialize(onnx_path: Path, precision: str, *args: object) -> bytes:
        assert onnx_path.name == "model.onnx" and precision == "fp16"
        builds.append(1)
        return f"engine-{len(builds)}".encode()

    monkeypatch.setattr(qengine, "probe_device", lambda: DEVICE)
    monkeypatch.setattr(qengine, "_serialize", serialize)
    monkeypatch.setattr(qengine, "plan_refusal", lambda path: "")  # as if TensorRT loads it
    first = build_engine(model_dir, cache, precision="fp16", max_batch=2)
    assert build_engine(model_dir, cache, precision="fp16", max_batch=2) == first
    assert len(builds) == 1
    build_engine(model_dir, cache, precision="fp16", max_batch=2, force=True)
    assert len(builds) == 2 and first.read_bytes() == b"engine-2"
    build_engine(model_dir, cache, precision="fp16", max_batch=4)  # other profile: rebuild
    assert len(builds) == 3
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["settings"]["profile"]["image"]["max"][0] == 4
    pkg = load_package(model_dir)
    assert find_engine(cache, key_for(pkg, DEVICE, "fp16")) == first


# --- QDQ pre-check -----------------------------------------------------------------------------


def _qdq_model(path: Path, zp_type: int | None, zp_value: int = 0) -> Path:
    onnx = pytest.importorskip("onnx", reason="onnx comes with the train extra")
    from onnx import TensorProto, helper

    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05])]
    nodes = []
    if zp_type is None:
        nodes.append(helper.make_node("Relu", ["x"], ["y"], name="relu"))
    else:
        inits.append(helper.make_tensor("zp", zp_type, [], [zp_value]))
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q0"),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq0"),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_qdq_check_accepts_symmetric_int8(tmp_path: Path) -> None:
    TensorProto = pytest.importorskip("onnx", reason="onnx comes with the train extra").TensorProto

    assert check_qdq_model(_qdq_model(tmp_path / "m.onnx", TensorProto.INT8)) == 2


@pytest.mark.parametrize(
    ("zp", "value", "words"),
    [("UINT8", 128, "UINT8 zero point"), ("INT8", 3, "non-zero zero point"), (None, 0, "no Q/DQ")],
)
def test_qdq_check_refuses_what_tensorrt_cannot_run_as_int8(
    tmp_path: Path, zp: str | None, value: int, words: str
) -> None:
    TensorProto = pytest.importorskip("onnx", reason="onnx comes with the train extra").TensorProto

    zp_type = None if zp is None else getattr(TensorProto, zp)
    with pytest.raises(Unavailable, match=words):
        check_qdq_model(_qdq_model(tmp_path / "m.onnx", zp_type, value))


# --- absence of TensorRT / pycuda / GPU ---------------------------------------------------------


def test_missing_tensorrt_is_unavailable_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, even where it is installed
    with pytest.raises(Unavailable) as exc:
        probe_device()
    assert "TensorRT is not installed" in _one_line_unavailable(exc)
    ok, why = tensorrt_status()
    assert not ok and why.startswith("TensorRT is not installed")


def test_constructing_the_backend_without_tensorrt_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edge.backends.tensorrt import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(Unavailable) as exc:
        TensorRTBackend(tmp_path / "x.engine", EXPECTED, "int8")
    assert "TensorRT is not installed" in _one_line_unavailable(exc)


def _fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)


def _fake_pycuda(monkeypatch: pytest.MonkeyPatch, driver: types.ModuleType) -> None:
    pkg = types.ModuleType("pycuda")
    pkg.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def test_missing_pycuda_is_unavailable_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(Unavailable) as exc:
        probe_device()
    assert "pycuda is not installed" in _one_line_unavailable(exc)


@pytest.mark.parametrize("failure", ["init", "zero"])
def test_no_cuda_device_is_unavailable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    _fake_tensorrt(monkeypatch)
    driver = types.ModuleType("pycuda.driver")

    def init() -> None:
        if failure == "init":
            raise RuntimeError("cuInit failed: no CUDA-capable device is detected\n(details)")

    driver.init = init  # type: ignore[attr-defined]
    driver.Device = types.SimpleNamespace(count=lambda: 0)  # type: ignore[attr-defined]
    _fake_pycuda(monkeypatch, driver)
    with pytest.raises(Unavailable) as exc:
        probe_device()
    assert _one_line_unavailable(exc).startswith("no CUDA device")


def test_without_a_cached_engine_the_backend_says_how_to_build_one(tmp_path: Path) -> None:
    pkg = load_package(HAND)
    with pytest.raises(Unavailable) as exc:
        backend_for_package(pkg, tmp_path, "fp16", device=DEVICE)
    msg = _one_line_unavailable(exc)
    assert "no TensorRT engine built for hand-v1" in msg
    assert "osteofy build-engine" in msg and "--precision fp16" in msg


_NO_HEAVY = """
import sys
heavy = ("tensorrt", "pycuda", "torch", "quantize", "model")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print("loaded:" + ",".join(loaded))
"""


def _loaded_after(code: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code + _NO_HEAVY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), out.stdout
    return [m for m in last.removeprefix("loaded:").split(",") if m]


def test_onnxruntime_path_never_imports_tensorrt_or_pycuda() -> None:
    code = """
from pathlib import Path
import numpy as np
import edge.backends.tensorrt, edge.engines  # importing the module must stay cheap
from edge.backends import backend_class
b = backend_class("onnxruntime")(Path("models/hand-v1/model.onnx"), threads=1)
out = b.run(np.zeros((1, 1, 320, 320), np.float32), np.zeros((1, 26), np.float32))
assert out["probs"].shape == (1, 3)
assert backend_class("tensorrt").__name__ == "TensorRTBackend"
"""
    assert _loaded_after(code) == []


def test_importing_the_engine_builder_does_not_import_tensorrt() -> None:
    loaded = _loaded_after("import quantize.engine\n")
    assert [m for m in loaded if m.split(".")[0] in ("tensorrt", "pycuda", "torch")] == []


# --- the real thing (needs TensorRT, pycuda and an NVIDIA GPU) ----------------------------------


@pytest.fixture(scope="session")
def trt_device() -> str:
    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(f"TensorRT/pycuda not installed or no CUDA GPU ({why})")
    return why


def _real_inputs(pkg, folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from edge.clinical import clinical_vector
    from edge.preprocess import normalise, preprocess_to_uint8
    from model.data import facts_from_row, read_raw

    with (folder / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    squares = [preprocess_to_uint8(read_raw(folder / r["file"]), pkg.preprocess)[0] for r in rows]
    images = [normalise(sq, pkg.preprocess) for sq in squares]
    clinical = [clinical_vector(facts_from_row(r), pkg.clinical) for r in rows]
    return np.stack(images).astype(np.float32), np.stack(clinical).astype(np.float32)


@pytest.mark.tensorrt
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_agrees_with_onnxruntime_fp32(
    trt_device: str, small_hand_cohort: Path, tmp_path: Path, precision: str
) -> None:
    from edge.backends.onnxruntime import OnnxRuntimeBackend

    pkg = load_package(HAND)
    if precision == "int8" and "model.int8.onnx" not in pkg.card.get("files", {}):
        pytest.skip("models/hand-v1 has no model.int8.onnx yet (run `osteofy quantize`)")
    cache = tmp_path / "engines"
    path = build_engine(HAND, cache, precision=precision, max_batch=2)
    assert build_engine(HAND, cache, precision=precision, max_batch=2) == path  # cached
    backend = backend_for_package(pkg, cache, precision)
    assert backend.precision == precision and backend.plan.max_batch == 2

    image, clinical = _real_inputs(pkg, small_hand_cohort, n=3)  # 3 > max batch: two chunks
    got = backend.run(image, clinical)
    ref = OnnxRuntimeBackend(pkg.model_file("fp32"), threads=1).run(image, clinical)

    probs_tol, cam_r = {"fp16": (0.02, 0.98), "int8": (0.08, 0.90)}[precision]
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert np.isfinite(got[name]).all(), name
    assert np.abs(got["probs"] - ref["probs"]).max() <= probs_tol
    np.testing.assert_allclose(got["probs"].sum(axis=1), 1.0, atol=1e-3)
    for i in range(image.shape[0]):
        r = np.corrcoef(got["cam"][i].ravel(), ref["cam"][i].ravel())[0, 1]
        assert r >= cam_r, f"sample {i}: cam Pearson {r:.3f} < {cam_r}"
