#!/usr/bin/env bash
# Install (or update) Osteofy Edge as hardened systemd services on a Jetson or any
# Debian/Ubuntu machine. docs/operations.md explains every step; systemd/ holds the units.
#
#   sudo scripts/install.sh [--role device|central|all] [--kiosk] [--site-id ID]
#                           [--device-id ID] [--site-secret FILE] [--models NAME,...]
#                           [--python PY] [--wheelhouse DIR] [--no-apt] [--no-enable]
#   scripts/install.sh --root DIR --dry-run [...]     # everything into DIR, nothing else
#
# What it does, idempotently (running it again updates code, units and shipped models and
# keeps configuration, secrets and data):
#   * the service user `osteofy` (system account, no login shell; `osteofy-kiosk` with --kiosk);
#   * /opt/osteofy: a virtual environment with the code (venv --system-site-packages on a
#     Jetson, so that JetPack's TensorRT bindings are visible), the model packages, the engine
#     build helper, this documentation;
#   * /etc/osteofy/config.yaml (device) or dashboard.yaml (central) from systemd/config/,
#     written only when absent; /etc/osteofy/credentials/ (root only) with a new site secret
#     unless one exists or --site-secret gives the site's;
#   * /var/lib/osteofy (data; the units' StateDirectory=), logs go to the journal;
#   * the units in /etc/systemd/system, a drop-in loading the credentials present, the GPU
#     drop-in where a GPU is found; enabled and (re)started.
#
# Roles: `device` = bridge + edge runtime + engine build (+ kiosk with --kiosk);
# `central` = dashboard (and the Mosquitto examples in /opt/osteofy/share/mosquitto);
# `all` = both on one machine.
#
# --root DIR --dry-run: writes the whole tree under DIR and only *prints* what would change
# the machine itself (apt-get, useradd, chown, the venv and pip, systemctl). The tests run it
# so (tests/test_install.py); it is also a way to read what an install would do.
set -euo pipefail

SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=""
DRY_RUN=0
ROLE="device"
KIOSK=0
ENABLE=1
APT=1
PYTHON="${OSTEOFY_PYTHON:-python3}"
SITE_ID="clinic-001"
DEVICE_ID=""
SITE_SECRET=""
MODELS=""
WHEELHOUSE=""

OPT=/opt/osteofy
VENV=$OPT/venv
ETC=/etc/osteofy
CRED=$ETC/credentials
STATE=/var/lib/osteofy
UNITS=/etc/systemd/system

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# shellcheck source=scripts/_admin.sh
. "$(dirname "${BASH_SOURCE[0]}")/_admin.sh"

while [ "$#" -gt 0 ]; do
    case "$1" in
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --role) ROLE="${2:?--role needs device, central or all}"; shift 2 ;;
    --kiosk) KIOSK=1; shift ;;
    --site-id) SITE_ID="${2:?}"; shift 2 ;;
    --device-id) DEVICE_ID="${2:?}"; shift 2 ;;
    --site-secret) SITE_SECRET="${2:?}"; shift 2 ;;
    --models) MODELS="${2:?}"; shift 2 ;;
    --python) PYTHON="${2:?}"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="${2:?}"; shift 2 ;;
    --no-apt) APT=0; shift ;;
    --no-enable) ENABLE=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# --- checks ----------------------------------------------------------------------------------

case "$ROLE" in
device | central | all) ;;
*) die "--role must be device, central or all, not '$ROLE'" ;;
esac
DEVICE=0
CENTRAL=0
[ "$ROLE" = "central" ] || DEVICE=1
[ "$ROLE" = "device" ] || CENTRAL=1
if [ "$KIOSK" -eq 1 ] && [ "$DEVICE" -eq 0 ]; then
    die "--kiosk belongs to a device (--role device or all)"
fi
if [ -n "$ROOT" ]; then
    [ "$DRY_RUN" -eq 1 ] || die "--root is for --dry-run only (a venv does not survive a move)"
    ROOT="$(cd "$ROOT" && pwd)" || die "--root: no such directory"
    [ "$ROOT" != "/" ] || ROOT=""
fi
if [ "$DRY_RUN" -eq 1 ] && [ -z "$ROOT" ]; then
    die "--dry-run needs --root DIR: the tree is written there"
fi
if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or try it out with --root DIR --dry-run"
fi
[ -n "$DEVICE_ID" ] || DEVICE_ID="$(hostname -s 2>/dev/null || echo edge-01)"
# MQTT topic levels, file names, certificate CNs: a conservative alphabet.
id_ok='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'
[[ "$SITE_ID" =~ $id_ok ]] || die "--site-id '$SITE_ID': letters, digits, '.', '_', '-' (<= 64)"
[[ "$DEVICE_ID" =~ $id_ok ]] || die "--device-id '$DEVICE_ID': letters, digits, '.', '_', '-' (<= 64)"
if [ -n "$SITE_SECRET" ] && [ ! -r "$SITE_SECRET" ]; then
    die "--site-secret $SITE_SECRET: not readable"
fi
# A device runs on Python 3.10 (JetPack 6's TensorRT bindings are for 3.10 only); the
# dashboard needs 3.11 or newer.
if [ "$CENTRAL" -eq 1 ]; then min_py=11; else min_py=10; fi
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (--python PY: Python >= 3.$min_py)"
"$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, $min_py))" ||
    die "$("$PYTHON" -V 2>&1) is too old: role '$ROLE' needs Python >= 3.$min_py (--python PY)"

# The units hide /home and /root (ProtectHome=yes): a venv made from an interpreter there
# (pyenv, a user's conda) would not start.
base="$("$PYTHON" -c 'import sys; print(sys.base_prefix)')"
case "$base" in
/home/* | /root/*)
    msg="$PYTHON lives in $base, which the services cannot see (ProtectHome=yes): use a system Python (/usr/bin/python3.10 on a device, 3.11+ for the dashboard) or one under /opt or /usr/local (--python PY)"
    if [ "$DRY_RUN" -eq 1 ]; then warn "$msg"; else die "$msg"; fi
    ;;
esac

JETSON=0
GPU=0
if [ -e "$(T /etc/nv_tegra_release)" ]; then
    JETSON=1
    GPU=1
elif [ -e "$(T /proc/driver/nvidia/version)" ]; then
    GPU=1
fi

log "installing role '$ROLE' from $SOURCE${ROOT:+ into $ROOT (dry run)}"

# --- Debian packages -------------------------------------------------------------------------

apt_install() { # REQUIRED(1/0) PACKAGE...
    local required="$1"
    shift
    if [ "$APT" -eq 0 ]; then
        warn "--no-apt: make sure these are installed: $*"
    elif ! run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; then
        [ "$required" -eq 0 ] || die "apt-get install $* failed"
        warn "apt-get install $* failed: the kiosk will not start (docs/operations.md, 'The kiosk')"
    fi
}

"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    apt_install 1 "$("$PYTHON" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
if [ "$KIOSK" -eq 1 ]; then
    # Not fatal: Ubuntu has no chromium .deb (a snap), and a device screens without a screen.
    apt_install 0 cage chromium
fi
if [ "$KIOSK" -eq 1 ] && [ -e "$(T /snap/bin/chromium)" ] && [ ! -e "$(T /usr/bin/chromium)" ]; then
    warn "Chromium is a snap here: it cannot run in osteofy-kiosk.service (docs/operations.md, 'The kiosk')"
fi

# --- users -----------------------------------------------------------------------------------

has_user() {
    if [ -z "$ROOT" ]; then
        getent passwd "$1" >/dev/null
    else
        grep -q "^$1:" "$ROOT/etc/passwd" 2>/dev/null
    fi
}

add_user() { # NAME HOME COMMENT
    if has_user "$1"; then
        return 0
    fi
    run useradd --system --user-group --home-dir "$2" --no-create-home \
        --shell /usr/sbin/nologin --comment "$3" "$1"
}

if [ "$DEVICE" -eq 1 ]; then
    add_user osteofy "$STATE" "Osteofy Edge services"
fi
if [ "$KIOSK" -eq 1 ]; then
    add_user osteofy-kiosk /var/lib/osteofy-kiosk "Osteofy kiosk browser"
fi

# --- files -----------------------------------------------------------------------------------

install -d -m 0755 "$(T $OPT)" "$(T $OPT/libexec)" "$(T $OPT/docs)" "$(T $OPT/models)"
install -m 0644 "$SOURCE/docs/operations.md" "$(T $OPT/docs/operations.md)"
# /etc/osteofy is world-traversable (the dashboard's dynamic user reads dashboard.yaml); each
# file's mode protects it: config.yaml 0640 root:osteofy, credentials/ root only.
install -d -m 0755 "$(T $ETC)"
install -d -m 0700 "$(T $CRED)"
install -d -m 0755 "$(T $ETC/tls)"

# A template is written once, with the ids filled in; an existing file is the operator's.
write_once() { # TEMPLATE DEST MODE GROUP
    local dest
    dest="$(T "$2")"
    if [ -e "$dest" ]; then
        log "kept $2 (yours; the template is $1)"
        return 0
    fi
    sed -e "s/@SITE_ID@/$SITE_ID/g" -e "s/@DEVICE_ID@/$DEVICE_ID/g" "$SOURCE/$1" >"$dest.tmp"
    chmod "$3" "$dest.tmp"
    mv "$dest.tmp" "$dest"
    run chown "root:$4" "$dest"
    log "wrote $2 from $1"
}

if [ "$DEVICE" -eq 1 ]; then
    install -d -m 0750 "$(T $STATE)"
    run chown osteofy:osteofy "$(T $STATE)"
    install -m 0755 "$SOURCE/systemd/osteofy-build-engines" "$(T $OPT/libexec/osteofy-build-engines)"
    write_once systemd/config/device.yaml $ETC/config.yaml 0640 osteofy
    secret="$(T $CRED/site-secret)"
    if [ -e "$secret" ]; then
        log "kept the site secret $CRED/site-secret"
    else
        (
            umask 077
            if [ -n "$SITE_SECRET" ]; then
                cat "$SITE_SECRET" >"$secret.tmp"
            else
                "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$secret.tmp"
            fi
            mv "$secret.tmp" "$secret"
        )
        log "wrote the site secret $CRED/site-secret${SITE_SECRET:+ (from $SITE_SECRET)}: copy it to every device of site $SITE_ID"
    fi

    # Model packages: card.json and the files it lists (their sha256 is checked at every load).
    # The default is the fusion packages the source ships; image-only baselines stay behind.
    names="$("$PYTHON" - "$SOURCE/models" "$MODELS" <<'EOF'
import json, sys
from pathlib import Path
root, wanted = Path(sys.argv[1]), [m for m in sys.argv[2].split(",") if m]
for card in sorted(root.glob("*/card.json")):
    c = json.loads(card.read_text())
    if (card.parent.name in wanted) if wanted else c.get("clinical_inputs", True):
        print(card.parent.name)
missing = set(wanted) - {p.parent.name for p in root.glob("*/card.json")}
if missing:
    sys.exit(f"no such model package in {root}: {', '.join(sorted(missing))}")
EOF
    )" || die "--models: see above"
    [ -n "$names" ] || die "no model package to install from $SOURCE/models"
    mapfile -t model_names <<<"$names"
    for name in "${model_names[@]}"; do
        dest="$(T "$OPT/models/$name")"
        rm -rf "$dest.new"
        install -d -m 0755 "$dest.new"
        install -m 0644 "$SOURCE/models/$name/card.json" "$dest.new/card.json"
        files="$("$PYTHON" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["files"]))' \
            "$SOURCE/models/$name/card.json")" || die "models/$name/card.json: no 'files'"
        mapfile -t model_files <<<"$files"
        for file in "${model_files[@]}"; do
            install -m 0644 "$SOURCE/models/$name/$file" "$dest.new/$file"
        done
        rm -rf "$dest.old"
        [ ! -e "$dest" ] || mv "$dest" "$dest.old"
        mv "$dest.new" "$dest"
        rm -rf "$dest.old"
        log "model package $name -> $OPT/models/$name"
    done
fi

if [ "$CENTRAL" -eq 1 ]; then
    write_once systemd/config/dashboard.yaml $ETC/dashboard.yaml 0644 root
    install -d -m 0755 "$(T $OPT/share/mosquitto)"
    install -m 0644 "$SOURCE"/systemd/mosquitto/* "$(T $OPT/share/mosquitto)/"
fi

# --- the virtual environment -----------------------------------------------------------------

venv_args=()
if [ "$JETSON" -eq 1 ]; then
    venv_args+=(--system-site-packages)
    # JetPack's TensorRT bindings (python3-libnvinfer) are built for the system Python only.
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' ||
        warn "Jetson: the venv sees the system's packages, but JetPack 6's TensorRT bindings" \
            "are for Python 3.10 and this is $("$PYTHON" -V 2>&1): use --python /usr/bin/python3.10" \
            "or backend onnxruntime (docs/jetson.md)"
fi
extras=()
[ "$DEVICE" -eq 0 ] || extras+=(device)
[ "$CENTRAL" -eq 0 ] || extras+=(dashboard)
spec="$(
    IFS=,
    printf '%s' "${extras[*]}"
)"
if [ -n "$WHEELHOUSE" ]; then
    pip_args=(--no-index --find-links "$WHEELHOUSE" "osteofy-edge[$spec]")
else
    pip_args=("${SOURCE}[$spec]")
fi
if [ ! -x "$(T $VENV/bin/python)" ]; then
    run "$PYTHON" -m venv "${venv_args[@]}" "$(T $VENV)"
fi
run "$(T $VENV/bin/python)" -m pip install --quiet --upgrade "${pip_args[@]}"
if [ "$DRY_RUN" -eq 0 ] && [ "$DEVICE" -eq 1 ]; then
    "$VENV/bin/python" -c 'import sys; from pathlib import Path; from osteofy.config import load_config; load_config(Path(sys.argv[1]), environ={})' \
        "$ETC/config.yaml" || die "$ETC/config.yaml is not valid (see above)"
fi

# --- units -----------------------------------------------------------------------------------

install -d -m 0755 "$(T $UNITS)"
units=()
if [ "$DEVICE" -eq 1 ]; then
    units+=(osteofy-bridge.service osteofy-edge.service osteofy-build-engine.service)
    [ "$KIOSK" -eq 0 ] || units+=(osteofy-kiosk.service)
fi
[ "$CENTRAL" -eq 0 ] || units+=(osteofy-dashboard.service)
for unit in "${units[@]}"; do
    install -m 0644 "$SOURCE/systemd/$unit" "$(T "$UNITS/$unit")"
done

# The optional secrets present in /etc/osteofy/credentials/: each one is loaded as a credential
# (a private copy under /run/credentials/UNIT/) and its configuration key pointed at that copy.
# LoadCredential= of a missing file stops a unit from starting, hence one line per file found.
credentials_dropin() { # UNIT NAME=ENVIRONMENT_VARIABLE...
    local unit="$1" dir out pair name var
    shift
    dir="$(T "$UNITS/$unit.d")"
    install -d -m 0755 "$dir"
    out="$dir/50-credentials.conf"
    {
        echo "# Written by scripts/install.sh for the secrets found in $CRED/;"
        echo "# run it again (or edit this file) after adding or removing one (docs/operations.md)."
        echo "[Service]"
        for pair in "$@"; do
            name="${pair%%=*}"
            var="${pair#*=}"
            if [ -e "$(T "$CRED/$name")" ]; then
                echo "LoadCredential=$name:$CRED/$name"
                echo "Environment=$var=/run/credentials/$unit/$name"
            fi
        done
    } >"$out.tmp"
    chmod 0644 "$out.tmp"
    mv "$out.tmp" "$out"
}

if [ "$DEVICE" -eq 1 ]; then
    credentials_dropin osteofy-edge.service \
        mqtt-password=OSTEOFY_MQTT__PASSWORD_FILE mqtt-tls-key=OSTEOFY_MQTT__TLS__KEY
    gpu_dropin="$(T $UNITS/osteofy-edge.service.d/gpu.conf)"
    if [ "$GPU" -eq 1 ]; then
        install -m 0644 "$SOURCE/systemd/osteofy-edge.service.d/gpu.conf" "$gpu_dropin"
        log "GPU found: osteofy-edge.service may open it (osteofy-edge.service.d/gpu.conf)"
    else
        rm -f "$gpu_dropin"
    fi
fi
if [ "$CENTRAL" -eq 1 ]; then
    credentials_dropin osteofy-dashboard.service \
        dashboard-api-token=OSTEOFY_DASHBOARD__API_TOKEN_FILE \
        dashboard-users=OSTEOFY_DASHBOARD__USERS_FILE \
        dashboard-mqtt-password=OSTEOFY_MQTT__PASSWORD_FILE \
        dashboard-mqtt-tls-key=OSTEOFY_MQTT__TLS__KEY \
        dashboard-pgpass=PGPASSFILE
fi

# --- enable and start ------------------------------------------------------------------------

enable=()
if [ "$DEVICE" -eq 1 ]; then
    enable+=(osteofy-bridge.service osteofy-edge.service)
    [ "$KIOSK" -eq 0 ] || enable+=(osteofy-kiosk.service)
fi
[ "$CENTRAL" -eq 0 ] || enable+=(osteofy-dashboard.service)
if [ "$ENABLE" -eq 1 ]; then
    run systemctl daemon-reload
    run systemctl enable "${enable[@]}"
    if [ "$KIOSK" -eq 1 ]; then
        run systemctl set-default graphical.target
        if [ -e "$(T $UNITS/display-manager.service)" ]; then
            warn "a display manager is enabled: it competes for tty1 with the kiosk;" \
                "disable it (systemctl disable display-manager.service) on a dedicated device"
        fi
    fi
    run systemctl restart "${enable[@]}"
else
    log "--no-enable: start with 'systemctl enable --now ${enable[*]}'"
fi

if [ "$DEVICE" -eq 1 ]; then
    log "done. Check the device: sudo $VENV/bin/osteofy doctor --config $ETC/config.yaml"
fi
log "logs: journalctl -u 'osteofy-*' (docs/operations.md)"
