"""The MQTT contract's other payloads (DESIGN.md, "MQTT contract"), typed and strict.

``result`` is :class:`edge.result.Result`. Device and dashboard validate with the same models
and reject unknown fields; ``docs/schema/`` holds their JSON Schemas (``python -m
edge.messages docs/schema``), so other consumers can validate too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edge.result import Result

TOPIC_ROOT = "osteofy/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelStatus(_Strict):
    site: str
    name: str
    version: str
    backend: str
    precision: str


class Status(_Strict):
    """Retained on ``status``; the Last Will publishes ``state: offline``."""

    schema_: Literal["osteofy.status.v1"] = Field("osteofy.status.v1", alias="schema")
    state: Literal["online", "offline"]
    device_id: str
    site_id: str
    at: str
    software: str | None = None
    models: list[ModelStatus] = []
    problems: list[str] = []  # plain words: e.g. a model that failed its integrity check

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Heartbeat(_Strict):
    schema_: Literal["osteofy.heartbeat.v1"] = Field("osteofy.heartbeat.v1", alias="schema")
    device_id: str
    site_id: str
    at: str
    uptime_s: float = Field(ge=0)
    outbox_depth: int = Field(ge=0)
    outbox_limit: int = Field(ge=1)
    outbox_alarm: bool
    oldest_queued_age_s: float | None = Field(None, ge=0)
    disk_free_mb: float = Field(ge=0)
    last_result_at: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Feedback(_Strict):
    schema_: Literal["osteofy.feedback.v1"] = Field("osteofy.feedback.v1", alias="schema")
    feedback_id: str = Field(pattern=r"^[0-9a-f-]{36}$")
    result_id: str = Field(pattern=r"^[0-9a-f-]{36}$")
    device_id: str
    site_id: str
    at: str
    agree: bool | None = None  # clinician agrees with the screening result
    dxa_tscore: float | None = Field(None, ge=-8, le=6)  # later, when a DXA was done

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


MESSAGES: dict[str, type[BaseModel]] = {
    "result": Result,
    "status": Status,
    "heartbeat": Heartbeat,
    "feedback": Feedback,
}


def topic(site_id: str, device_id: str, kind: str, suffix: str | None = None) -> str:
    t = f"{TOPIC_ROOT}/{site_id}/{device_id}/{kind}"
    return f"{t}/{suffix}" if suffix else t


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, model in MESSAGES.items():
        path = folder / f"{name}.schema.json"
        schema = model.model_json_schema(by_alias=True)
        schema["$id"] = f"https://osteofy.invalid/schema/{name}.v1.json"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schema")):
        print(p)
