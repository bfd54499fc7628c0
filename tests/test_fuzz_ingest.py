"""Fuzzing the ingest path in CI: a short Hypothesis-driven run over cohort seeds.

The harness (tests/fuzz/harness.py) mutates valid cohort files where parsers break - lengths,
VRs, tags, transfer syntax, Rows/Columns - and checks the oracle: ``load_study`` accepts a
consistent study or refuses with a one-line reason and a rule, never anything else. CI runs a
few hundred inputs; the long run (docs/security.md has its figures) is

    OSTEOFY_FUZZ_SECONDS=3600 .venv/bin/python -m pytest tests/test_fuzz_ingest.py -k long -s

or ``.venv/bin/python tests/fuzz/harness.py --seconds 3600``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzz.harness import Seed, check, fuzz, load_seeds, make_corpus

CI_EXAMPLES = 1000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    paths = make_corpus(tmp_path_factory.mktemp("fuzz-corpus"))
    return load_seeds(paths)


def test_the_seed_corpus_is_varied_and_accepted(seeds: list[Seed], tmp_path: Path) -> None:
    assert len(seeds) >= 8
    syntaxes = {s.data[s.ts_value[0] : s.ts_value[0] + s.ts_value[1]] for s in seeds if s.ts_value}
    assert len(syntaxes) >= 3  # implicit, explicit, JPEG 2000 lossless (and lossy when drawn)
    for seed in seeds:
        assert check(tmp_path / "seed.dcm", seed.data, None) == "accepted", seed.name
        assert seed.lengths and seed.tags and seed.header_end > 132


def test_short_fuzz_run_finds_no_uncaught_exception(seeds: list[Seed], tmp_path: Path) -> None:
    stats = fuzz(seeds, tmp_path, examples=CI_EXAMPLES, batch=200, crashes=tmp_path / "crashes")
    print(f"\nfuzz (CI): {stats.summary()}")
    assert stats.failure is None and stats.inputs >= CI_EXAMPLES
    # The mutations reach past the first checks: several rules fire, and some inputs still load.
    assert len(stats.outcomes) >= 5


@pytest.mark.skipif(
    not os.environ.get("OSTEOFY_FUZZ_SECONDS"), reason="the long run: set OSTEOFY_FUZZ_SECONDS"
)
def test_long_fuzz_run(seeds: list[Seed], tmp_path: Path) -> None:
    seconds = float(os.environ["OSTEOFY_FUZZ_SECONDS"])
    crashes = Path(os.environ.get("OSTEOFY_FUZZ_CRASHES", tmp_path / "crashes"))
    stats = fuzz(seeds, tmp_path, seconds=seconds, crashes=crashes)
    print(f"\nfuzz (long): {stats.summary()}")
    assert stats.failure is None
