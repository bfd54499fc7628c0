"""A small fleet through Mosquitto into the dashboard (``bench.fleet``): exact counts only.

The full fleet (200 devices x 50 results) and its rates are ``python -m bench.fleet``;
timings are measurements, not tests, so nothing here asserts one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench.fleet import MOSQUITTO, fleet_ids, markdown, measure_ingest, result_payload, write_docs
from edge.result import Result

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


@pytest.mark.parametrize(("scenario", "max_batch"), [("live", 100), ("backlog", 1)])
def test_every_result_of_a_small_fleet_is_stored_exactly_once(
    scenario: str, max_batch: int, tmp_path: Path
) -> None:
    r = measure_ingest(20, 25, max_batch, scenario, tmp_path, timeout=120)
    assert r["sent"] == r["acked_by_broker"] == 500
    assert r["stored"] == r["stored_distinct"] == 500
    assert r["missing"] == r["unexpected"] == 0
    if max_batch == 1:
        assert r["commits"] == 500  # the "before" figure really commits once per message
    assert r["results_per_s"] > 0


def test_simulated_devices_send_valid_results() -> None:
    rng = random.Random(3)
    fleet = fleet_ids(12)
    assert fleet[0] == ("clinic-000", "edge-0000") and fleet[11][0] == "clinic-002"
    for site, dev in fleet:
        p = result_payload(site, dev, rng)
        assert Result.model_validate(p).payload() == json.loads(json.dumps(p))


def test_docs_section_is_replaced_in_place(tmp_path: Path) -> None:
    run = {
        "scenario": "backlog",
        "max_batch": 1,
        "devices": 2,
        "results_per_device": 3,
        "sent": 6,
        "stored_distinct": 6,
        "results_per_s": 10.0,
        "commits": 6,
        "seconds": 0.6,
    }
    res = {
        "machine": {
            "date": "2026-01-01T00:00:00Z",
            "cpu": "cpu",
            "cores": 2,
            "load_average_start": [0.1],
            "python": "3.11",
            "sqlite": "3.40",
            "mosquitto": "2.0",
            "sqlite_commit_ms": 0.3,
        },
        "runs": [run, {**run, "max_batch": 100, "results_per_s": 40.0}],
        "backlog_speedup": 4.0,
        "live_speedup": 2.0,
        "exact": True,
        "latency": {"samples": 3, "p50_ms": 250.0, "p95_ms": 400.0, "max_ms": 450.0},
    }
    page = tmp_path / "dashboard.md"
    page.write_text(
        "# Dashboard\n\nintro\n\n<!-- fleet-figures:start -->\nold\n"
        "<!-- fleet-figures:end -->\n\nrest\n"
    )
    write_docs(page, res)
    text = page.read_text()
    assert text.startswith("# Dashboard\n\nintro\n") and text.endswith("\n\nrest\n")
    assert "old" not in text and markdown(res) in text and "| **40** |" in text
