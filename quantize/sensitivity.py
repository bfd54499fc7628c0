"""Layer sensitivity: which backbone blocks to keep in floating point so the gates hold.

The unit is a backbone block (``/body.K/...``): keeping a whole block in FP32 keeps its
Q/DQ boundaries together and its cost is easy to state. Each block is scored by quantizing
*only that block* and measuring the damage on a selection set of held-out images
(:func:`quantize.fidelity.error_score`). Blocks are then kept in FP32, worst first, until the
gates hold on the selection set. The verdict images (the rest of the held-out folder) are
never seen by the search.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^/body\.(\d+)/")


def blocks(node_names: list[str]) -> dict[str, list[str]]:
    """Backbone node names grouped by block, in graph order: {"body.0": [...], ...}."""
    out: dict[str, list[str]] = {}
    for name in node_names:
        m = _BLOCK.match(name)
        if m:
            out.setdefault(f"body.{m.group(1)}", []).append(name)
    return out


@dataclass
class Search:
    """The sensitivity ranking and the greedy steps, for the report."""

    scores: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    selection_n: int = 0


def rank(
    groups: dict[str, list[str]], score_only: Callable[[list[str]], float]
) -> dict[str, float]:
    """Error of quantizing each block alone (``score_only(nodes_quantized)``), worst first."""
    scores = {}
    for name, nodes in groups.items():
        scores[name] = score_only(nodes)
        log.info("sensitivity %s: %.4f", name, scores[name])
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def greedy(
    ranking: dict[str, float],
    gates_fail: Callable[[list[str]], list[str]],
    search: Search,
) -> list[str] | None:
    """Keep blocks in FP32, worst first, until ``gates_fail(kept_blocks)`` is empty.

    Returns the kept blocks, or None when even keeping every ranked block fails.
    """
    kept: list[str] = []
    order = list(ranking)
    for i in range(len(order) + 1):
        kept = order[:i]
        failed = gates_fail(kept)
        search.steps.append({"kept_fp32": list(kept), "failed_gates": failed})
        log.info("keeping %s in FP32: %s", kept or "nothing", failed or "gates hold")
        if not failed:
            search.kept = kept
            return kept
    return None
