"""The one typed configuration tree (DESIGN.md, "Configuration").

Loaded by :func:`load_config` from a YAML file plus ``OSTEOFY_…`` environment variables
(``OSTEOFY_MQTT__URL=…``: double underscore separates levels). Unknown keys are rejected, every
default works on a laptop, and the models do no I/O: secrets are *paths* here, read by the part
that needs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from osteofy.errors import UsageError

ENV_PREFIX = "OSTEOFY_"
DEVICE_CONFIG = Path("/etc/osteofy/config.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class MqttConfig(_Strict):
    url: str = "mqtt://127.0.0.1:1883"  # empty: offline, results stay queued
    tls: TlsConfig = TlsConfig()
    username: str | None = None
    password_file: Path | None = None
    outbox_limit: int = Field(10000, ge=10)  # queued messages before the outbox refuses more
    outbox_alarm_fraction: float = Field(0.8, gt=0.0, lt=1.0)
    keepalive_s: int = Field(30, ge=5)
    heartbeat_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts:// (or be empty for offline)")
        return v


class DicomBridgeConfig(_Strict):
    enabled: bool = True
    ae_title: str = Field("OSTEOFY", min_length=1, max_length=16)
    host: str = "0.0.0.0"  # the digitizer is on the clinic LAN
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = []  # empty: any
    allowed_addresses: list[str] = []  # IPs or CIDR networks; empty: any
    max_associations: int = Field(4, ge=1)
    max_pending: int = Field(8, ge=1)
    acse_timeout_s: float = Field(10.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    preempt_idle_s: float = Field(10.0, gt=0)
    max_pdu_bytes: int = Field(262_144, ge=4096)


class BridgeConfig(_Strict):
    dicom: DicomBridgeConfig = DicomBridgeConfig()
    hot_folder: Path | None = None
    hot_folder_poll_s: float = Field(1.0, gt=0)
    hot_folder_quiet_s: float = Field(2.0, gt=0)
    serial: str | None = None
    serial_baudrate: int = Field(921_600, gt=0)
    reserve_mb: int = Field(64, ge=0)  # disk kept free: a study that would eat it is refused


class ScreenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class DashboardConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    db_url: str = "sqlite:///./var/dashboard.sqlite"
    api_token_file: Path | None = None
    users_file: Path | None = None  # name:pbkdf2_sha256$… lines (python -m dashboard.auth NAME)
    client_id: str | None = None  # MQTT client id (the persistent session is found by it)
    # MQTT 5 shared-subscription group, for several instances splitting the messages. Unset:
    # a plain subscription (each instance gets everything; storage by key keeps it once).
    # Mosquitto 2.0 loses a shared group's messages published after a broker restart while
    # no member is connected (docs/dashboard.md), so sharing is a choice, not the default.
    shared_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    open_pages: bool = False  # without a users file: pages open to localhost (a banner says so)


class IngestConfig(_Strict):
    """Acceptance rules for incoming radiographs (edge/ingest.py)."""

    modalities: list[str] = ["CR", "DX"]
    # Body Part Examined (and synonyms a digitizer may send) -> the model site.
    body_parts: dict[str, str] = {
        "HAND": "hand",
        "WRIST": "hand",
        "FINGER": "hand",
        "HIP": "hip",
        "PELVIS": "hip",
        "FEMUR": "hip",
    }
    max_file_mb: float = Field(200.0, gt=0)
    max_pixels: int = Field(60_000_000, gt=0)  # rows * columns
    min_side: int = Field(256, ge=16)
    max_side: int = Field(10_000, ge=16)
    bits_stored: list[int] = [8, 10, 11, 12, 13, 14, 15, 16]


class Config(_Strict):
    site_id: str = "clinic-001"
    device_id: str = "edge-01"
    data_dir: Path = Path("./var")
    models_dir: Path = Path("./models")
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    precision: Literal["auto", "int8", "fp16", "fp32"] = "auto"
    site_models: dict[str, str] = {}  # site -> package folder name (default: best found)
    site_secret_file: Path | None = None  # HMAC key for patient/study keys; made on first use
    low_confidence: float = Field(0.5, gt=0, lt=1)  # top probability below this is flagged
    mqtt: MqttConfig = MqttConfig()
    bridge: BridgeConfig = BridgeConfig()
    screen: ScreenConfig = ScreenConfig()
    dashboard: DashboardConfig = DashboardConfig()
    ingest: IngestConfig = IngestConfig()

    @field_validator("site_id", "device_id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        # These become MQTT topic levels and folder names: no wildcards or separators.
        if not v or any(c in v for c in "/+#\0 ") or len(v) > 64:
            raise ValueError("1-64 characters without spaces, '/', '+' or '#'")
        return v


def _set_path(tree: dict, path: list[str], value: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = yaml.safe_load(value) if value != "" else ""


def env_overrides(environ: Mapping[str, str]) -> dict:
    """``OSTEOFY_MQTT__URL=x`` -> ``{"mqtt": {"url": "x"}}`` (values parsed as YAML scalars)."""
    tree: dict = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ("OSTEOFY_PYTHON", "OSTEOFY_SKIP_APT"):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in path):
            continue
        _set_path(tree, path, value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration: ``path`` (or /etc/osteofy/config.yaml when it exists), then env."""
    environ = os.environ if environ is None else environ
    data: Any = {}
    if path is None and DEVICE_CONFIG.is_file():
        path = DEVICE_CONFIG
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"configuration file not found: {path}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"{path}: unreadable configuration ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: the configuration must be a mapping")
    data = _merge(data, env_overrides(environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        source = path or "environment"
        raise UsageError(f"configuration {source}: {where}: {err['msg']}") from None
