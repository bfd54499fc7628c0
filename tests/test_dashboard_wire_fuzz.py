"""Fuzz the wire (issue #20): payloads from the JSON Schemas in docs/schema/, then mutated.

Each example is a batch of messages as the subscriber hands them to :class:`Ingest`:
schema-valid objects (built from ``docs/schema/*.schema.json`` by a small generator below),
the same with fields deleted, types swapped, odd strings (lone surrogates, NUL, control and
bidi characters) and odd numbers spliced in, duplicate keys, truncations and random bytes.
The oracle: every message is acknowledged and ends stored, a recognised duplicate, or a dead
letter with a reason — never an exception (``rejected_internal`` stays 0) and never a
redelivery; afterwards a good message is still stored. The tallies are printed (``-s``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dashboard import DEVICE, SITE, js, make_result, png_bytes

from dashboard.ingest import Ingest
from dashboard.intake import Counters
from dashboard.store import Store, open_store
from edge.messages import topic

SCHEMAS = Path(__file__).parent.parent / "docs" / "schema"
KINDS = ("result", "status", "heartbeat", "feedback")
EXAMPLES = 450  # x BATCH messages: >= 2,000 payloads, well under a minute on one core
BATCH = 5

ODD_TEXT = st.sampled_from(
    [
        "\ud800",
        "a\udfffb",
        "\x00",
        "x\x00",
        "\u2028",
        "\u202e",
        "\x07",
        "",
        " ",
        "é",
        "😀",
        "<script>",
    ]
)
ODD_NUMBERS = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9007199254740993", "-0", "1e-400",
     "123456789012345678901234567890", "0.1e1", "1E308"]
)  # fmt: skip
TIMES = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    st.sampled_from(
        ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "2026-02-30T00:00:00Z",
         "2026-01-01T00:00:00Z", "2026-01-01", "yesterday"]
    ),
)  # fmt: skip


def _schema(kind: str) -> dict:
    return json.loads((SCHEMAS / f"{kind}.schema.json").read_text())


def from_schema(node: dict, defs: dict, name: str = "") -> st.SearchStrategy[Any]:
    """A strategy for the JSON Schema subset pydantic writes (enough for docs/schema/)."""
    if "$ref" in node:
        return from_schema(defs[node["$ref"].rsplit("/", 1)[-1]], defs, name)
    if "anyOf" in node:
        return st.one_of([from_schema(n, defs, name) for n in node["anyOf"]])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        if not props:  # a map (timings_ms)
            values = from_schema(node.get("additionalProperties", {}), defs)
            return st.dictionaries(st.text(max_size=8), values, max_size=4)
        return st.fixed_dictionaries({k: from_schema(v, defs, k) for k, v in props.items()})
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), defs), max_size=3)
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True)
        if name == "at" or name.endswith("_at"):
            return TIMES
        return st.text(max_size=12)
    if kind == "number":
        low, high = node.get("minimum", -1e6), node.get("maximum", 1e6)
        return st.floats(low, high, allow_nan=False)
    if kind == "integer":
        return st.integers(node.get("minimum", 0), 10**6)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none()  # schema-less: any JSON would do; keep it small


def valid_object(kind: str) -> st.SearchStrategy[dict]:
    schema = _schema(kind)
    strategy = from_schema(schema, schema.get("$defs", {}))

    def ours(obj: dict) -> dict:
        # Mostly the topic's own site and device (so some are stored), sometimes not.
        return {**obj, "site_id": SITE, "device_id": DEVICE}

    return st.one_of(strategy, strategy.map(ours), strategy.map(ours))


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> bytes:
    obj = draw(valid_object(kind))
    how = draw(
        st.sampled_from(
            ["none", "none", "delete", "swap", "odd_text", "odd_number", "dup", "truncate", "extra"]
        )
    )
    keys = sorted(obj)
    if how == "delete" and keys:
        obj.pop(draw(st.sampled_from(keys)))
    elif how == "swap" and keys:
        obj[draw(st.sampled_from(keys))] = draw(
            st.one_of(
                st.integers(), st.text(max_size=5), st.none(), st.lists(st.none()), st.just({})
            )
        )
    elif how == "extra":
        obj[draw(st.text(max_size=6))] = 1
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if how == "odd_text" and '"' in text:
        odd = json.dumps(draw(ODD_TEXT))  # "\ud800" survives as an escape
        at = text.find('"', draw(st.integers(0, len(text) - 1)))
        at = text.index('"') if at < 0 else at  # no quote after the drawn point: the first
        end = text.find('"', at + 1)
        if end > at and text[at - 1] != "\\":
            text = text[:at] + odd + text[end + 1 :]
    elif how == "odd_number":
        text = text.replace("true", draw(ODD_NUMBERS), 1) if "true" in text else text + "1"
        for ch in "0123456789":
            if ch in text:
                text = text.replace(ch, draw(ODD_NUMBERS), 1)
                break
    elif how == "dup" and len(keys) > 0:
        k = draw(st.sampled_from(keys))
        text = text[:-1] + f', "{k}": null}}' if text.endswith("}") else text
    data = text.encode("utf-8", "surrogatepass")
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


MESSAGES = st.one_of(
    *[st.tuples(st.just(topic(SITE, DEVICE, k)), mutated(k)) for k in KINDS],
    st.tuples(st.just(topic(SITE, DEVICE, "result")), st.binary(max_size=64)),
    st.tuples(
        st.sampled_from([topic(SITE, DEVICE, "overlay", "0" * 8 + "-0000-0000-0000-" + "0" * 12)]),
        st.one_of(st.binary(max_size=64), st.just(png_bytes()), st.just(png_bytes()[:-3])),
    ),
    st.tuples(st.just(topic(SITE, DEVICE, "result")), st.just(js(make_result()))),
)

TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = open_store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'd.sqlite'}")
    yield s
    s.close()


OUTCOMES = ("stored", "duplicate", "dead_lettered")


def _outcome(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    moved: Counter[str] = Counter()
    for name, n in after.items():
        delta = n - before.get(name, 0)
        if name.endswith("_stored"):
            moved["stored"] += delta
        elif name.endswith("_duplicate"):
            moved["duplicate"] += delta
        elif name == "dead_lettered":
            moved["dead_lettered"] += delta
        elif name.startswith("rejected_"):
            moved[name] += delta
    return moved


def test_every_wire_payload_ends_stored_duplicate_or_dead_lettered(store: Store) -> None:
    counters = Counters()
    ingest = Ingest(store, counters)
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=2000,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(MESSAGES, min_size=BATCH, max_size=BATCH))
    def run(batch: list[tuple[str, bytes]]) -> None:
        before = counters.snapshot()
        assert ingest.handle(batch) == [True] * len(batch)  # nothing left for redelivery
        moved = _outcome(before, counters.snapshot())
        assert sum(moved[k] for k in OUTCOMES) == len(batch), moved
        assert moved["rejected_internal"] == 0 and moved["rejected_store"] == 0, moved
        TALLY.update({k: v for k, v in moved.items() if v})
        TALLY["payloads"] += len(batch)

    run()
    good = make_result()
    assert ingest.handle([(topic(SITE, DEVICE, "result"), js(good))]) == [True]
    assert store.result(good["result_id"]) is not None  # intake keeps working
    assert counters.get("store_errors") == 0
    seconds = time.monotonic() - started
    print(f"\nwire fuzz: {dict(sorted(TALLY.items()))} in {seconds:.1f} s")
    assert TALLY["payloads"] >= 2000
    assert TALLY["stored"] > 0 and TALLY["dead_lettered"] > 0 and TALLY["duplicate"] > 0
