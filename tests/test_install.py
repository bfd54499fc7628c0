"""scripts/install.sh and scripts/uninstall.sh, as far as a machine without a container allows:
``--root DIR --dry-run`` writes the whole installation into DIR and only prints what would
change the machine itself (apt-get, useradd, chown, venv and pip, systemctl); the tree it
writes is checked file by file, its configuration is loaded with the real loader, its model
packages pass their sha256 checks, and its units (with the drop-ins it generated) are verified
and measured by systemd-analyze. Never runs anything outside a temporary directory.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_systemd_units import (
    THRESHOLD,
    check_credentials,
    needs_analyze,
    needs_offline_security,
    prepare_root,
    read_unit,
    security,
    threshold_of,
    unit_files,
    values,
    verify,
)

from edge.package import load_package
from osteofy.config import load_config

ROOT = Path(__file__).parent.parent
INSTALL = ROOT / "scripts/install.sh"
UNINSTALL = ROOT / "scripts/uninstall.sh"
BASH = shutil.which("bash")
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        # This interpreter: CI's python3 may be older than 3.11.
        [str(BASH), str(INSTALL), "--root", str(root), "--dry-run", "--python", PYTHON, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def uninstall(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BASH), str(UNINSTALL), "--root", str(root), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dry_runs(proc: subprocess.CompletedProcess) -> list[str]:
    return [line.removeprefix("dry-run: ") for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def device_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A full install: device and central roles and the kiosk, on a machine without a GPU."""
    root = tmp_path_factory.mktemp("root")
    proc = install(
        root, "--role", "all", "--kiosk", "--site-id", "clinic-007", "--device-id", "edge-42"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc.stdout


def test_the_tree_has_every_file_with_its_mode(device_tree: tuple[Path, str]) -> None:
    root, _ = device_tree
    expected = {
        "etc/osteofy": 0o755,
        "etc/osteofy/config.yaml": 0o640,
        "etc/osteofy/dashboard.yaml": 0o644,
        "etc/osteofy/credentials": 0o700,
        "etc/osteofy/credentials/site-secret": 0o600,
        "etc/osteofy/tls": 0o755,
        "var/lib/osteofy": 0o750,
        "opt/osteofy/libexec/osteofy-build-engines": 0o755,
        "opt/osteofy/docs/operations.md": 0o644,
        "opt/osteofy/share/mosquitto/central.conf": 0o644,
        "opt/osteofy/share/mosquitto/osteofy.acl": 0o644,
        "etc/systemd/system/osteofy-bridge.service": 0o644,
        "etc/systemd/system/osteofy-edge.service": 0o644,
        "etc/systemd/system/osteofy-build-engine.service": 0o644,
        "etc/systemd/system/osteofy-kiosk.service": 0o644,
        "etc/systemd/system/osteofy-dashboard.service": 0o644,
        "etc/systemd/system/osteofy-edge.service.d/50-credentials.conf": 0o644,
        "etc/systemd/system/osteofy-dashboard.service.d/50-credentials.conf": 0o644,
    }
    for rel, want in expected.items():
        path = root / rel
        assert path.exists(), rel
        assert mode(path) == want, f"{rel}: {oct(mode(path))}, want {oct(want)}"
    # No GPU here: the GPU drop-in is not installed.
    assert not (root / "etc/systemd/system/osteofy-edge.service.d/gpu.conf").exists()
    # Nothing left half-written.
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".new", ".old"))]


def test_the_configuration_loads_and_matches_the_units(device_tree: tuple[Path, str]) -> None:
    root, _ = device_tree
    cfg = load_config(root / "etc/osteofy/config.yaml", environ={})
    assert (cfg.site_id, cfg.device_id) == ("clinic-007", "edge-42")
    edge = read_unit(*unit_files(root, "osteofy-edge.service"))
    # data_dir is the units' StateDirectory=, models_dir where the packages were copied.
    assert str(cfg.data_dir) == "/var/lib/" + values(edge, "StateDirectory")[-1]
    assert str(cfg.models_dir) == "/opt/osteofy/models"
    assert cfg.mqtt.url == ""  # offline until the operator names a broker
    assert str(cfg.site_secret_file) == "/etc/osteofy/credentials/site-secret"
    # ... and what the unit's environment makes of it inside the service.
    env = dict(v.split("=", 1) for v in values(edge, "Environment"))
    inside = load_config(root / "etc/osteofy/config.yaml", environ=env)
    assert str(inside.site_secret_file) == "/run/credentials/osteofy-edge.service/site-secret"
    dash = load_config(root / "etc/osteofy/dashboard.yaml", environ={})
    assert dash.dashboard.db_url == "sqlite:////var/lib/osteofy-dashboard/dashboard.sqlite"
    text = (root / "etc/osteofy/config.yaml").read_text()
    assert "@SITE_ID@" not in text and "@DEVICE_ID@" not in text


def test_a_fresh_site_secret_and_verified_model_packages(device_tree: tuple[Path, str]) -> None:
    root, _ = device_tree
    secret = (root / "etc/osteofy/credentials/site-secret").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", secret)
    names = sorted(p.name for p in (root / "opt/osteofy/models").iterdir())
    assert names == ["hand-v1", "hand-v2", "hip-v2"]  # the fusion packages; baselines stay behind
    for name in names:
        pkg = load_package(root / "opt/osteofy/models" / name, verify=True)  # sha256 of each
        assert pkg.name


def test_dry_run_prints_what_would_change_the_machine(device_tree: tuple[Path, str]) -> None:
    _, out = device_tree
    joined = "\n".join(dry_runs(subprocess.CompletedProcess([], 0, out, "")))
    assert re.search(r"^useradd --system .*--shell /usr/sbin/nologin .* osteofy$", joined, re.M)
    assert re.search(r"^useradd --system .* osteofy-kiosk$", joined, re.M)
    assert re.search(r"^\S*python\S* -m venv \S+/opt/osteofy/venv$", joined, re.M)
    assert "--system-site-packages" not in joined  # not a Jetson
    assert re.search(r"^systemctl enable osteofy-bridge.service osteofy-edge.service", joined, re.M)
    assert "osteofy-kiosk.service" in joined and "osteofy-dashboard.service" in joined
    assert "set-default graphical.target" in joined


def test_dry_run_changes_nothing_outside_its_root(tmp_path: Path) -> None:
    before = Path("/etc/passwd").read_text()
    unit = Path("/etc/systemd/system/osteofy-edge.service")
    had_unit = unit.exists()
    proc = install(tmp_path, "--site-id", "c1", "--device-id", "e1")
    assert proc.returncode == 0, proc.stderr
    assert Path("/etc/passwd").read_text() == before
    assert unit.exists() == had_unit


@needs_analyze
def test_installed_units_verify(device_tree: tuple[Path, str], tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(device_tree[0], root, symlinks=True)
    prepare_root(root)  # the venv's binaries as stubs: the dry run made no venv
    for unit in sorted(p.name for p in (root / "etc/systemd/system").glob("*.service")):
        proc = verify(root, unit)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{unit}: {proc.stderr}"
        check_credentials(unit, read_unit(*unit_files(root, unit)))


@needs_analyze
@needs_offline_security
def test_installed_units_are_within_budget(device_tree: tuple[Path, str]) -> None:
    root, _ = device_tree
    for unit in sorted(p.name for p in (root / "etc/systemd/system").glob("*.service")):
        rc, exposure, report = security(root, unit, threshold_of(unit))
        assert rc == 0, f"{unit}: {exposure}\n{report}"


def test_running_it_again_keeps_configuration_and_secret(tmp_path: Path) -> None:
    assert install(tmp_path, "--site-id", "c1", "--device-id", "e1").returncode == 0
    config = tmp_path / "etc/osteofy/config.yaml"
    secret = tmp_path / "etc/osteofy/credentials/site-secret"
    config.write_text(config.read_text().replace('url: ""', 'url: "mqtt://10.0.0.5:1883"'))
    before = (config.read_text(), secret.read_text())
    (tmp_path / "opt/osteofy/models/hand-v1/model.onnx").write_bytes(b"tampered")
    proc = install(tmp_path, "--site-id", "other", "--device-id", "other")
    assert proc.returncode == 0, proc.stderr
    assert (config.read_text(), secret.read_text()) == before
    assert "kept /etc/osteofy/config.yaml" in proc.stderr
    load_package(tmp_path / "opt/osteofy/models/hand-v1", verify=True)  # shipped model restored


def test_an_existing_site_secret_is_imported(tmp_path: Path) -> None:
    shared = tmp_path / "site.secret"
    shared.write_text("f" * 64 + "\n")
    root = tmp_path / "root"
    root.mkdir()
    assert install(root, "--site-secret", str(shared), "--device-id", "e2").returncode == 0
    installed = root / "etc/osteofy/credentials/site-secret"
    assert installed.read_text() == shared.read_text() and mode(installed) == 0o600


@needs_analyze
def test_optional_secrets_become_credentials(tmp_path: Path) -> None:
    cred = tmp_path / "etc/osteofy/credentials"
    cred.mkdir(parents=True)
    (cred / "mqtt-tls-key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (cred / "dashboard-api-token").write_text("t" * 32)
    assert install(tmp_path, "--role", "all", "--device-id", "e3").returncode == 0
    edge = tmp_path / "etc/systemd/system/osteofy-edge.service.d/50-credentials.conf"
    text = edge.read_text()
    assert "LoadCredential=mqtt-tls-key:/etc/osteofy/credentials/mqtt-tls-key" in text
    assert (
        "Environment=OSTEOFY_MQTT__TLS__KEY=/run/credentials/osteofy-edge.service/mqtt-tls-key"
        in text
    )
    assert "mqtt-password" not in text  # absent: a LoadCredential= of it would stop the unit
    dash = tmp_path / "etc/systemd/system/osteofy-dashboard.service.d/50-credentials.conf"
    assert "OSTEOFY_DASHBOARD__API_TOKEN_FILE=/run/credentials/osteofy-dashboard.service/" in (
        dash.read_text()
    )
    # The keys the environment sets are keys the configuration knows.
    for unit in ("osteofy-edge.service", "osteofy-dashboard.service"):
        settings = read_unit(*unit_files(tmp_path, unit))
        env = dict(v.split("=", 1) for v in values(settings, "Environment") if "OSTEOFY_" in v)
        load_config(tmp_path / "etc/osteofy/config.yaml", environ=env)
    prepare_root(tmp_path)
    for unit in ("osteofy-edge.service", "osteofy-dashboard.service"):
        proc = verify(tmp_path, unit)
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.device
def test_a_jetson_gets_the_system_packages_and_the_gpu(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    proc = install(tmp_path, "--device-id", "orin-1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"-m venv --system-site-packages \S+/opt/osteofy/venv", proc.stdout)
    gpu = tmp_path / "etc/systemd/system/osteofy-edge.service.d/gpu.conf"
    assert gpu.exists()
    if shutil.which("systemd-analyze"):
        from test_systemd_units import systemd_version

        if systemd_version() >= 250:
            rc, exposure, report = security(tmp_path, "osteofy-edge.service", THRESHOLD)
            assert rc == 0, report
            assert "SupplementaryGroups=" in report  # the drop-in is in effect
    # Moved to a machine without GPU: a reinstall removes the drop-in.
    (tmp_path / "etc/nv_tegra_release").unlink()
    assert install(tmp_path, "--device-id", "orin-1").returncode == 0
    assert not gpu.exists()


@pytest.mark.device
@pytest.mark.skipif(sys.version_info >= (3, 11), reason="the refusal on a Python older than 3.11")
def test_the_dashboard_needs_python_311(tmp_path: Path) -> None:
    for role in ("central", "all"):
        proc = install(tmp_path, "--role", role)
        assert proc.returncode == 2, proc.stderr
        assert f"role '{role}' needs Python >= 3.11" in proc.stderr


def test_the_central_role_installs_the_dashboard_only(tmp_path: Path) -> None:
    proc = install(tmp_path, "--role", "central")
    assert proc.returncode == 0, proc.stderr
    units = sorted(p.name for p in (tmp_path / "etc/systemd/system").glob("*.service"))
    assert units == ["osteofy-dashboard.service"]
    assert not (tmp_path / "etc/osteofy/config.yaml").exists()
    assert "useradd" not in proc.stdout  # DynamicUser=: no account to create
    assert (tmp_path / "opt/osteofy/share/mosquitto/central.conf").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--dry-run"],  # without --root it would write into /
        ["--root", "/tmp"],  # --root without --dry-run
        ["--root", "ROOT", "--dry-run", "--site-id", "a/b"],
        ["--root", "ROOT", "--dry-run", "--device-id", "edge 1"],
        ["--root", "ROOT", "--dry-run", "--role", "central", "--kiosk"],
        ["--root", "ROOT", "--dry-run", "--role", "cloud"],
        ["--root", "ROOT", "--dry-run", "--models", "no-such-model"],
    ],
)
def test_it_refuses_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path) if a == "ROOT" else a for a in args]
    proc = subprocess.run(
        [str(BASH), str(INSTALL), "--python", PYTHON, *args], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "install.sh:" in proc.stderr


def test_uninstall_keeps_data_unless_purged(tmp_path: Path) -> None:
    assert install(tmp_path, "--device-id", "e4").returncode == 0
    results = tmp_path / "var/lib/osteofy/results.sqlite"
    results.write_bytes(b"queued results")
    dropin_dir = tmp_path / "etc/systemd/system/osteofy-edge.service.d"
    (dropin_dir / "override.conf").write_text("[Service]\nMemoryMax=3G\n")  # systemctl edit

    proc = uninstall(tmp_path)
    assert proc.returncode == 0, proc.stderr
    disable = next(x for x in dry_runs(proc) if x.startswith("systemctl disable --now"))
    assert "osteofy-edge.service" in disable and "osteofy-bridge.service" in disable
    assert not list((tmp_path / "etc/systemd/system").glob("osteofy-*.service"))
    assert not (tmp_path / "opt/osteofy/venv").exists()
    assert not (tmp_path / "opt/osteofy/libexec").exists()
    for kept in (
        results,
        tmp_path / "etc/osteofy/config.yaml",
        tmp_path / "etc/osteofy/credentials/site-secret",
        tmp_path / "opt/osteofy/models/hand-v1/card.json",
        dropin_dir / "override.conf",  # the operator's, not ours
    ):
        assert kept.exists(), kept
    assert not (dropin_dir / "50-credentials.conf").exists()

    # Reinstalling finds everything where it was.
    assert install(tmp_path, "--device-id", "other").returncode == 0
    assert load_config(tmp_path / "etc/osteofy/config.yaml", environ={}).device_id == "e4"

    proc = uninstall(tmp_path, "--purge")
    assert proc.returncode == 0, proc.stderr
    for gone in ("etc/osteofy", "var/lib/osteofy", "opt/osteofy"):
        assert not (tmp_path / gone).exists(), gone
    assert not dropin_dir.exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_scripts_pass_shellcheck() -> None:
    scripts = [INSTALL, UNINSTALL, ROOT / "systemd/osteofy-build-engines"]
    proc = subprocess.run(  # -x: follow the helpers they source (scripts/_admin.sh)
        ["shellcheck", "-x", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout
