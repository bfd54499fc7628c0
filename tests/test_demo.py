"""The README's main command, as far as this version goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from osteofy.cli import main


def test_demo_renders_both_sites_and_says_what_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), "--scans", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "synthetic data only" in out
    assert (tmp_path / "hand" / "manifest.csv").is_file()
    assert (tmp_path / "hip" / "manifest.csv").is_file()
    assert (tmp_path / "contact_sheet.png").stat().st_size > 10_000
    assert out.count(".dcm") == 2
    assert "not in this version yet" in out
    assert "trained on synthetic data" in out and "P(op)" in out  # screened by the model
