"""The systemd units in ``systemd/``: they load without a warning, their sandboxes measure within
the exposure budget, and they agree with each other and with the code they start.

``systemd-analyze verify`` checks that every ExecStart= binary exists, and the real ones
(/opt/osteofy/venv/bin/osteofy) do not on a CI machine: the units are verified inside a
temporary root (``--root``) holding the system's own unit files (the targets ours refer to)
and an executable stub at each path our units execute. ``security --offline=true`` reads the
unit files from that root too, drop-ins included. Both skip with the reason where
systemd-analyze is missing or too old (``--offline`` needs systemd 250).

The helpers here are also used by tests/test_install.py on the tree the install script writes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = sorted(p.name for p in UNIT_DIR.glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
# Where a unit of ours is allowed to go, in tenths (systemd-analyze --threshold): 2.0 for every
# unit, lower for those without network (DESIGN.md "systemd/ runs it all as hardened services").
THRESHOLD = 20
NO_NETWORK_THRESHOLD = 10
NO_NETWORK_UNITS = {"osteofy-build-engine.service"}
# systemd's version on which docs/operations.md's table was measured (its weights may change).
MEASURED_WITH = 252


def systemd_version() -> int:
    if ANALYZE is None:
        return 0
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
needs_offline_security = pytest.mark.skipif(
    systemd_version() < 250,
    reason="systemd-analyze security --offline needs systemd >= 250 "
    f"(found {systemd_version() or 'none'})",
)


# --- reading unit files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    value: str


def read_unit(*paths: Path) -> list[Setting]:
    """Settings of a unit file and its drop-ins, in order (keys repeat: a list, not a dict)."""
    out: list[Setting] = []
    for path in paths:
        section = ""
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if logical:
                line = logical + " " + line
                logical = ""
            if line.endswith("\\"):
                logical = line[:-1].rstrip()
                continue
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.append(Setting(section, key.strip(), value.strip()))
    return out


def values(settings: list[Setting], key: str) -> list[str]:
    return [s.value for s in settings if s.key == key]


def value(settings: list[Setting], key: str) -> str:
    """The effective (last) value of a key."""
    found = values(settings, key)
    assert found, f"{key}= is not set"
    return found[-1]


def unit_files(root: Path, unit: str) -> list[Path]:
    base = root / "etc/systemd/system" / unit
    return [base, *sorted((root / "etc/systemd/system" / f"{unit}.d").glob("*.conf"))]


# --- a root for systemd-analyze --------------------------------------------------------------


def _system_unit_dir() -> Path | None:
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (d / "multi-user.target").exists():
            return d.resolve()
    return None


def prepare_root(root: Path) -> None:
    """Make ``root`` (with our units in etc/systemd/system) loadable by ``systemd-analyze``.

    Copies the machine's own units (multi-user.target, network-online.target, getty@.service:
    what ours refer to) and puts an executable stub at every path our units execute that the
    root does not have yet - the venv's ``osteofy``, ``/usr/bin/cage``, ``/usr/bin/find``.
    """
    system = _system_unit_dir()
    if system is None:
        pytest.skip("this machine has no systemd unit directory to copy targets from")
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    for unit in (root / "etc/systemd/system").glob("*.service"):
        for s in read_unit(*unit_files(root, unit.name)):
            if not s.key.startswith("Exec") or not s.value:
                continue
            binary = s.value.split()[0].lstrip("-+!@:")
            stub = root / binary.lstrip("/")
            if not stub.exists():
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)


def install_units(root: Path, dropins: bool = False) -> None:
    """Our units (and, when asked, the shipped drop-ins) as scripts/install.sh places them."""
    dest = root / "etc/systemd/system"
    dest.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        shutil.copy(UNIT_DIR / unit, dest / unit)
    if dropins:
        for d in UNIT_DIR.glob("*.service.d"):
            shutil.copytree(d, dest / d.name, dirs_exist_ok=True)


def verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", f"--root={root}", "--recursive-errors=yes", "--man=no", unit],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


def security(root: Path, unit: str, threshold: int = 100) -> tuple[int, float, str]:
    """(exit code at ``threshold``, overall exposure, the full report)."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [
            ANALYZE,
            "security",
            "--offline=true",
            f"--root={root}",
            f"--threshold={threshold}",
            "--no-pager",
            unit,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return proc.returncode, float(m.group(1)), proc.stdout


def threshold_of(unit: str) -> int:
    return NO_NETWORK_THRESHOLD if unit in NO_NETWORK_UNITS else THRESHOLD


def documented_exposures() -> dict[str, float]:
    """The hardening table of docs/operations.md: ``| `unit` ... | 1.2 | ...``."""
    out: dict[str, float] = {}
    text = (ROOT / "docs/operations.md").read_text()
    for m in re.finditer(
        r"^\| `(osteofy-[a-z-]+\.service)`( \+ `gpu\.conf`)? \| (\d\.\d) \|", text, re.M
    ):
        out[m.group(1) + ("+gpu" if m.group(2) else "")] = float(m.group(3))
    return out


# --- the tests -------------------------------------------------------------------------------


def test_the_units_we_ship() -> None:
    assert UNITS == [
        "osteofy-bridge.service",
        "osteofy-build-engine.service",
        "osteofy-dashboard.service",
        "osteofy-edge.service",
        "osteofy-kiosk.service",
    ]


@needs_analyze
@pytest.mark.parametrize("dropins", [False, True], ids=["units", "with-gpu-dropin"])
def test_every_unit_verifies_without_a_warning(tmp_path: Path, dropins: bool) -> None:
    install_units(tmp_path, dropins=dropins)
    prepare_root(tmp_path)
    for unit in UNITS:
        proc = verify(tmp_path, unit)
        assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), (
            f"{unit}:\n{proc.stdout}{proc.stderr}"
        )


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check is not vacuous: a misspelt key and a missing binary are both reported."""
    install_units(tmp_path)
    prepare_root(tmp_path)
    unit = tmp_path / "etc/systemd/system/osteofy-edge.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchDogSec="))
    (tmp_path / "opt/osteofy/venv/bin/osteofy").unlink()
    proc = verify(tmp_path, "osteofy-edge.service")
    assert proc.returncode != 0
    assert "WatchDogSec" in proc.stderr and "/opt/osteofy/venv/bin/osteofy" in proc.stderr


@needs_analyze
@needs_offline_security
@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_is_within_its_exposure_budget(tmp_path: Path, unit: str) -> None:
    install_units(tmp_path)
    threshold = threshold_of(unit)
    rc, exposure, report = security(tmp_path, unit, threshold)
    assert rc == 0 and exposure <= threshold / 10, f"{unit}: {exposure}\n{report}"


@needs_analyze
@needs_offline_security
def test_the_gpu_dropin_stays_within_budget(tmp_path: Path) -> None:
    install_units(tmp_path / "plain")
    install_units(tmp_path / "gpu", dropins=True)
    rc, exposure, report = security(tmp_path / "gpu", "osteofy-edge.service", THRESHOLD)
    assert rc == 0 and exposure <= THRESHOLD / 10, report
    # The drop-in is applied (it opens the devices), so the measurement is of the real thing.
    assert exposure > security(tmp_path / "plain", "osteofy-edge.service")[1]


@needs_analyze
@needs_offline_security
@pytest.mark.skipif(
    systemd_version() != MEASURED_WITH,
    reason=f"docs/operations.md's exposure table was measured with systemd {MEASURED_WITH}",
)
def test_the_documented_exposure_table_is_what_systemd_measures(tmp_path: Path) -> None:
    documented = documented_exposures()
    install_units(tmp_path / "plain")
    install_units(tmp_path / "gpu", dropins=True)
    measured = {u: security(tmp_path / "plain", u)[1] for u in UNITS}
    measured["osteofy-edge.service+gpu"] = security(tmp_path / "gpu", "osteofy-edge.service")[1]
    assert documented == measured


# --- what the units must agree on ------------------------------------------------------------


def unit(name: str) -> list[Setting]:
    return read_unit(UNIT_DIR / name)


def test_edge_runtime_is_a_notify_service_with_a_watchdog_and_limits() -> None:
    edge = unit("osteofy-edge.service")
    assert value(edge, "Type") == "notify" and value(edge, "NotifyAccess") == "main"
    assert value(edge, "WatchdogSec").endswith("s") and value(edge, "Restart") == "on-failure"
    assert value(edge, "MemoryMax") and value(edge, "MemoryHigh")
    assert value(edge, "RestartPreventExitStatus") == "2"  # a configuration error: no loop
    assert value(edge, "ExecStart") == (
        "/opt/osteofy/venv/bin/osteofy edge serve --config /etc/osteofy/config.yaml"
    )
    # The engine build runs first, but its failure never keeps the runtime from starting.
    assert "osteofy-build-engine.service" in " ".join(values(edge, "Wants"))
    assert "osteofy-build-engine.service" in " ".join(values(edge, "After"))
    assert "osteofy-build-engine.service" not in " ".join(values(edge, "Requires"))


def test_bridge_and_runtime_share_user_and_data() -> None:
    """The bridge writes the inbox 0640, the runtime reads it: same user, same state dir."""
    bridge, edge = unit("osteofy-bridge.service"), unit("osteofy-edge.service")
    for key in ("User", "Group"):
        assert value(bridge, key) == value(edge, key) == "osteofy"
    assert "osteofy" in value(bridge, "StateDirectory").split()
    assert value(edge, "StateDirectory") == "osteofy"
    # pynetdicom's spool: on disk, beside the inbox, created by systemd, emptied at start.
    tmpdir = value(bridge, "Environment").removeprefix("TMPDIR=")
    assert tmpdir == "/var/lib/osteofy/tmp"
    assert "osteofy/tmp" in value(bridge, "StateDirectory").split()
    assert tmpdir in value(bridge, "ExecStartPre")
    assert value(bridge, "PrivateTmp") == "yes"  # and /tmp itself stays private


def test_engine_build_is_skipped_without_tensorrt_and_needs_no_network() -> None:
    build = unit("osteofy-build-engine.service")
    assert value(build, "Type") == "oneshot"
    assert value(build, "ExecCondition").endswith("osteofy-build-engines --check")
    assert "osteofy-edge.service" in value(build, "Before")
    assert value(build, "PrivateNetwork") == "yes"
    assert "SuccessExitStatus" not in {s.key for s in build}  # a Jetson's failure must show


def test_kiosk_opens_the_local_screen_after_the_runtime() -> None:
    from osteofy.config import ScreenConfig

    kiosk = unit("osteofy-kiosk.service")
    screen = ScreenConfig()
    assert f"http://{screen.host}:{screen.port}/" in value(kiosk, "ExecStart")
    assert "osteofy-edge.service" in " ".join(values(kiosk, "After"))
    assert value(kiosk, "User") == "osteofy-kiosk" and value(kiosk, "PAMName")
    for flag in ("--kiosk", "--noerrdialogs", "--disable-translate"):
        assert flag in value(kiosk, "ExecStart")
    assert "graphical.target" in value(kiosk, "WantedBy")
    assert value(kiosk, "IPAddressAllow") == "localhost"


def check_credentials(unit_name: str, settings: list[Setting]) -> None:
    """Every Environment= path into the credentials directory names this unit and a credential
    the unit loads (a typo would hand the service a path that never exists)."""
    loaded = {v.split(":", 1)[0] for v in values(settings, "LoadCredential")}
    for env in values(settings, "Environment"):
        _, _, path = env.partition("=")
        if path.startswith("/run/credentials/"):
            where, _, cred = path.removeprefix("/run/credentials/").partition("/")
            assert where == unit_name, env
            assert cred in loaded, f"{env}: no LoadCredential={cred}:..."
    for v in values(settings, "LoadCredential"):
        cred, _, source = v.partition(":")
        assert source == f"/etc/osteofy/credentials/{cred}", v


@pytest.mark.parametrize("name", UNITS)
def test_credentials_are_consistent(name: str) -> None:
    check_credentials(name, unit(name))


def test_the_site_secret_reaches_the_runtime_as_a_credential() -> None:
    edge = unit("osteofy-edge.service")
    assert "site-secret:/etc/osteofy/credentials/site-secret" in values(edge, "LoadCredential")
    assert "OSTEOFY_SITE_SECRET_FILE=/run/credentials/osteofy-edge.service/site-secret" in values(
        edge, "Environment"
    )
    from osteofy.config import load_config

    cfg = load_config(
        None,
        environ={"OSTEOFY_SITE_SECRET_FILE": "/run/credentials/osteofy-edge.service/site-secret"},
    )
    assert str(cfg.site_secret_file) == "/run/credentials/osteofy-edge.service/site-secret"


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_drops_privileges(name: str) -> None:
    s = unit(name)
    assert value(s, "NoNewPrivileges") == "yes" and value(s, "CapabilityBoundingSet") == ""
    assert value(s, "ProtectSystem") == "strict" and value(s, "ProtectHome") == "yes"
    assert values(s, "User") or value(s, "DynamicUser") == "yes"
    assert "root" not in values(s, "User")


# --- the engine build helper -----------------------------------------------------------------


HELPER = UNIT_DIR / "osteofy-build-engines"


def test_build_helper_check_says_why_there_is_nothing_to_build() -> None:
    import sys

    from edge.engines import tensorrt_status

    usable, why = tensorrt_status()
    proc = subprocess.run(
        [str(HELPER), "--check"],
        env={**os.environ, "OSTEOFY_VENV": sys.prefix},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == (0 if usable else 1), proc.stderr
    assert why in proc.stdout  # the journal says why the unit was skipped


def test_build_helper_builds_each_int8_package_and_reports_failure(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = venv / "bin/osteofy"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$2" in *bad*) exit 4;; esac\nexit 0\n')
    fake.chmod(0o755)
    models = tmp_path / "models"
    for name, int8 in (("good-v1", True), ("fp32only-v1", False), ("bad-v1", True)):
        (models / name).mkdir(parents=True)
        (models / name / "card.json").write_text("{}")
        if int8:
            (models / name / "model.int8.onnx").write_bytes(b"")
    (models / "not-a-package").mkdir()
    env = {**os.environ, "OSTEOFY_VENV": str(venv)}
    run = [str(HELPER), str(models), str(tmp_path / "engines")]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # bad-v1 failed: the unit fails
    built = sorted(
        line.split()[1].rstrip("/").rsplit("/", 1)[1] for line in calls.read_text().splitlines()
    )
    assert built == ["bad-v1", "good-v1"]
    assert "fp32only-v1: no model.int8.onnx" in proc.stdout
    assert "bad-v1: engine build failed (exit 4)" in proc.stderr
    assert all(f"--cache {tmp_path / 'engines'}" in line for line in calls.read_text().splitlines())

    (models / "bad-v1" / "model.int8.onnx").unlink()
    assert subprocess.run(run, env=env, capture_output=True, timeout=30).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(HELPER), str(empty), "x"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "no model package" in proc.stderr
