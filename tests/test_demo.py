"""The README's main command: the whole chain, headless, as a new user would run it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from osteofy.cli import main

HAVE_BROKER = bool(shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


@pytest.mark.skipif(not HAVE_BROKER, reason="mosquitto is not installed (apt install mosquitto)")
def test_headless_demo_sends_scans_through_the_chain_to_the_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pynetdicom", reason="the bridge extra is not installed")
    rc = main(["demo", "--headless", "--scans", "3", "--out", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "synthetic data only" in out
    assert (
        "3/3 scans stored by the bridge, 3 screened, 3 screened again with the technician's "
        "facts, 6 results on the dashboard." in out
    )
    assert out.count("dashboard: arrived") == 3
    assert "local screen:  http://127.0.0.1:" in out and "dashboard:     http://127.0.0.1:" in out
    assert "confirm with DXA" in out
    # Both sites went through (2 hands and 1 hip for 3 scans): the first of each site is the
    # clear osteoporosis case, the second hand a normal one (chosen by planned T-score).
    table = [line.split() for line in out.splitlines() if line.strip().endswith("arrived")]
    assert [(row[1], row[3]) for row in table] == [
        ("hand", "osteoporosis"),
        ("hand", "normal"),
        ("hip", "osteoporosis"),
    ]
    # Each scan shows the header-only answer, the answer with the typed facts, and a verdict.
    assert out.count("     header   ") == 3 and out.count("     + facts  ") == 3
    assert out.count("     screen class ") == 3


def test_headless_demo_without_a_broker_says_offline_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pynetdicom", reason="the bridge extra is not installed")
    import osteofy.demo as demo

    monkeypatch.setattr(demo._Mosquitto, "start", lambda self: False)
    rc = main(["demo", "--headless", "--scans", "1", "--out", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "OFFLINE mode" in out and "QUEUED (offline)" in out


@pytest.mark.skipif(not HAVE_BROKER, reason="mosquitto is not installed (apt install mosquitto)")
def test_the_readme_main_command_runs_headless_as_a_new_user_would(tmp_path: Path) -> None:
    """`scripts/demo` is what `make demo` runs: set-up (already done here), then the chain."""
    import subprocess

    pytest.importorskip("pynetdicom", reason="the bridge extra is not installed")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [
            "bash",
            str(root / "scripts" / "demo"),
            "--headless",
            "--scans",
            "2",
            "--out",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(tmp_path),
            "OSTEOFY_SKIP_APT": "1",
        },
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2/2 scans stored by the bridge, 2 screened, 2 screened again" in proc.stdout
