"""``osteofy doctor``: can this machine screen, and with what? One line per check.

Checks: ONNX Runtime and TensorRT (with GPU and version), every model package's integrity,
the backend and precision each site would run and why (``precision: auto`` measures FP32 vs
INT8 here), the engine cache, the MQTT broker (TCP, and TLS when configured), free disk and
the clock. Exit 0 when at least one site can be screened; 4 otherwise.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from osteofy.config import Config

MIN_FREE_MB = 500
BUILD_YEAR = 2026  # a clock before this is certainly wrong (certificates, timestamps)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        return f"[{mark}] {self.name}: {self.detail}"


def _onnxruntime() -> Check:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime", False, f"not importable ({exc})")
    return Check(
        "onnxruntime", True, f"{ort.__version__}, providers {ort.get_available_providers()}"
    )


def _tensorrt() -> Check:
    from edge.engines import tensorrt_status

    ok, why = tensorrt_status()
    return Check("tensorrt", ok, why)


def _models(cfg: Config) -> tuple[list[Check], bool]:
    from edge.runtime import Screener

    checks = []
    try:
        screener = Screener(cfg, create_secret=False)  # a check never makes the site secret
    except Exception as exc:  # noqa: BLE001 - every failure is a finding here
        return [Check("models", False, str(exc), required=True)], False
    checks.append(
        Check(
            "site secret",
            bool(screener.secret),
            f"{screener.secret_file}"
            + (
                ""
                if screener.secret
                else ": not made yet (edge serve makes it at first start; "
                "copy the site's secret here so keys match across its devices)"
            ),
        )
    )
    for site, loaded in sorted(screener.models.items()):
        c = loaded.choice
        checks.append(
            Check(
                f"site {site}",
                True,
                f"{loaded.pkg.name} {loaded.pkg.card.get('version')} (sha256 verified) on "
                f"{c.backend.name}/{c.backend.precision}: {c.reason}",
                required=True,
            )
        )
    for site, why in sorted(screener.problems.items()):
        checks.append(Check(f"site {site}", False, why, required=True))
    return checks, bool(screener.models)


def _engines(cfg: Config) -> Check:
    cache = cfg.data_dir / "engines"
    engines = sorted(cache.glob("*/*.engine")) if cache.is_dir() else []
    return Check("engine cache", True, f"{cache}: {len(engines)} engine(s)")


def _broker(cfg: Config) -> Check:
    if not cfg.mqtt.url:
        return Check("mqtt", True, "offline mode (mqtt.url empty): results stay queued")
    from edge.publisher import check_broker

    ok, detail = check_broker(cfg)
    return Check("mqtt", ok, detail)


def _disk(cfg: Config) -> Check:
    path = cfg.data_dir if cfg.data_dir.exists() else Path(".")
    free = shutil.disk_usage(path).free / 1e6
    return Check("disk", free >= MIN_FREE_MB, f"{free:.0f} MB free in {path}")


def _clock() -> Check:
    year = time.gmtime().tm_year
    ok = year >= BUILD_YEAR
    return Check(
        "clock",
        ok,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        + ("" if ok else " (before this software was built: check the RTC/NTP)"),
    )


def run_doctor(cfg: Config, as_json: bool = False) -> int:
    checks = [_onnxruntime(), _tensorrt()]
    model_checks, can_screen = _models(cfg)
    checks += model_checks + [_engines(cfg), _broker(cfg), _disk(cfg), _clock()]
    if as_json:
        print(json.dumps({"can_screen": can_screen, "checks": [c.__dict__ for c in checks]}))
    else:
        for c in checks:
            print(c.line())
        print("this device can screen" if can_screen else "this device CANNOT screen")
    return 0 if can_screen else 4
