"""``osteofy screen FILE…``: one-shot screening with the DESIGN.md output forms.

With ``--json``: one line per file, in the order given — the ``osteofy.result.v1`` object plus
``"input": PATH`` (a local path, never published), or ``{"input": PATH, "rejected": REASON}``.
Exit code 3 when any file was rejected, 0 otherwise. Files are not moved: quarantine belongs
to ``edge serve``'s inbox.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge.answer import tscore_text
from edge.facts import merge_facts, parse_facts_json
from edge.overlay import encode_png
from edge.runtime import Screener
from osteofy.config import Config
from osteofy.errors import InputRejected, UsageError
from osteofy.fsutil import atomic_write_bytes


def _clinical(text: str | None) -> dict | None:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--clinical: cannot read {text[1:]} ({exc.strerror})") from None
    try:
        facts = parse_facts_json(text, "--clinical facts")
        merge_facts({}, None, facts)  # unknown names, wrong types: a usage error, said once
        return facts
    except InputRejected as exc:
        raise UsageError(f"--clinical: {exc}") from None


def screen_files(
    cfg: Config,
    files: list[Path],
    as_json: bool = False,
    overlay_dir: Path | None = None,
    backend: str | None = None,
    precision: str | None = None,
    clinical: str | None = None,
) -> int:
    facts = _clinical(clinical)
    screener = Screener(cfg, backend=backend, precision=precision)
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    rejected = 0
    for path in files:
        try:
            outcome = screener.screen(path, facts)
        except InputRejected as exc:
            rejected += 1
            if as_json:
                print(json.dumps({"input": str(path), "rejected": str(exc)}), flush=True)
            else:
                print(f"{path}: rejected: {exc}", file=sys.stderr, flush=True)
            continue
        r = outcome.result
        if overlay_dir is not None:
            atomic_write_bytes(overlay_dir / f"{r.result_id}.png", encode_png(outcome.overlay()))
        if as_json:
            print(json.dumps({**r.payload(), "input": str(path)}), flush=True)
        else:
            p = r.prediction
            flags = f" [{', '.join(r.quality.flags)}]" if r.quality.flags else ""
            print(
                f"{path}: {p.class_} (P {p.probs.normal:.2f}/{p.probs.osteopenia:.2f}/"
                f"{p.probs.osteoporosis:.2f}), T-score estimate {tscore_text(p.tscore)}, "
                f"{'REFER for DXA' if p.refer else 'no referral'}{flags}, "
                f"{r.timings_ms['total']:.0f} ms",
                flush=True,
            )
    if not as_json:
        print("Screening aid - confirm with DXA.", file=sys.stderr)
    return 3 if rejected else 0
