"""``osteofy.result.v1``: the one result object, typed, with no direct identifier in it.

Built on the device, stored locally, published over MQTT and validated by the dashboard
against the same models (unknown fields rejected). Patient and study appear only as
HMAC-SHA256 keys with a per-site secret (DESIGN.md, PS3.15 Annex E): the dashboard can group
a patient's results without ever learning who the patient is. Age is capped at 90.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from osteofy.compat import UTC
from osteofy.errors import UsageError
from osteofy.fsutil import atomic_write

SCHEMA = "osteofy.result.v1"
CLASSES = ("normal", "osteopenia", "osteoporosis")
AGE_CAP = 90


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelInfo(_Strict):
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backend: Literal["onnxruntime", "tensorrt"]
    precision: Literal["fp32", "int8", "fp16"]


class Probs(_Strict):
    normal: float = Field(ge=0, le=1)
    osteopenia: float = Field(ge=0, le=1)
    osteoporosis: float = Field(ge=0, le=1)


class Prediction(_Strict):
    class_: Literal["normal", "osteopenia", "osteoporosis"] = Field(
        alias="class",
        description="by the model card's answer rule: for ordinal packages the WHO band of "
        "tscore (so the two never disagree), for older ones the most probable class",
    )
    probs: Probs
    tscore: float = Field(
        description="estimated T-score (screening aid, not a DXA value), rounded to two "
        "decimals without leaving its WHO band"
    )
    refer: bool = Field(description="P(osteoporosis) >= the model's referral threshold")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Contribution(_Strict):
    factor: str
    known: bool
    log_odds: float = Field(
        description="this fact's contribution to log P(osteoporosis)/P(normal); > 0 pushes up"
    )


class Peak(_Strict):
    x: float = Field(ge=0, le=1, description="fraction of the image width")
    y: float = Field(ge=0, le=1, description="fraction of the image height")
    weight: float = Field(ge=0, le=1)


class Explanation(_Strict):
    heatmap_class: Literal["normal", "osteopenia", "osteoporosis"]
    peaks: list[Peak]
    clinical: list[Contribution]


class Quality(_Strict):
    ood_score: float
    ood_threshold: float
    flags: list[Literal["ood_borderline", "low_confidence", "missing_clinical_facts"]]
    missing_facts: list[str]


class Result(_Strict):
    schema_: Literal["osteofy.result.v1"] = Field("osteofy.result.v1", alias="schema")
    result_id: str = Field(pattern=r"^[0-9a-f-]{36}$")
    device_id: str
    site_id: str
    created_at: str = Field(description="UTC, ISO 8601")
    patient_key: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    study_key: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    age_years: float | None = Field(ge=0, le=AGE_CAP)
    sex: Literal["F", "M"] | None
    body_part: Literal["hand", "hip"]
    model: ModelInfo
    prediction: Prediction
    explanation: Explanation
    quality: Quality
    timings_ms: dict[str, float]

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    def payload(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pseudonym(secret: bytes, value: str | None) -> str | None:
    """HMAC-SHA256 of an identifier; None when the identifier is absent or empty."""
    if value is None or not str(value).strip():
        return None
    return hmac.new(secret, str(value).strip().encode(), hashlib.sha256).hexdigest()


def load_site_secret(path: Path, create: bool = True) -> bytes:
    """The per-site HMAC key; made (32 random bytes, mode 0600) on first use when allowed.

    Every device of a site must share it for keys to match across devices; a deployment
    copies it with the configuration (systemd credential).
    """
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            raise UsageError(f"site secret not found: {path}") from None
        data = secrets.token_hex(32).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            atomic_write(path, lambda fh: fh.write(data + b"\n"), mode=0o600)
        finally:
            os.umask(old)
        return data
    if len(data) < 16:
        raise UsageError(f"site secret {path} is too short (needs >= 16 bytes)")
    return data
