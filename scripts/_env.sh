# shellcheck shell=bash
# Shared setup for scripts/test and scripts/demo; source it, don't run it.
#
# Brings a fresh Debian/Ubuntu machine (root, or a user with sudo) or CI to a working checkout:
# the Debian tools some tests drive (dcmtk, dicom3tools), a virtual environment in .venv with
# the project installed in editable mode. Each step is skipped when already done, so running
# it again costs a second.
#
# Environment knobs:
#   OSTEOFY_PYTHON    interpreter that creates .venv (default: python3; needs >= 3.11)
#   OSTEOFY_SKIP_APT  set to 1 to never call apt-get (tests needing the tools then skip)

OSTEOFY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OSTEOFY_VENV="$OSTEOFY_ROOT/.venv"
OSTEOFY_STAMP="$OSTEOFY_VENV/.osteofy-stamp"
OSTEOFY_EXTRAS="dev,train,dashboard,bridge"
# Debian packages some tests drive (they skip with a stated reason when absent).
OSTEOFY_APT_PACKAGES="dcmtk dicom3tools mosquitto chromium openssl shellcheck"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

osteofy_log() {
    printf '==> %s\n' "$*" >&2
}

osteofy_warn() {
    printf 'warning: %s\n' "$*" >&2
}

# Runs apt-get with root rights: directly as root, else through sudo (non-interactive when
# there is no terminal to ask for a password on). Returns non-zero when that is impossible.
_osteofy_apt() {
    local -a prefix=()
    if ! command -v apt-get >/dev/null 2>&1; then
        return 1
    fi
    if [ "${EUID:-$(id -u)}" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            return 1
        fi
        if [ -t 0 ]; then
            prefix=(sudo)
        else
            prefix=(sudo -n)
        fi
    fi
    "${prefix[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@"
}

# Installs Debian packages; refreshes the package lists and tries again only when the first
# attempt fails (a fresh image often has none).
_osteofy_apt_install() {
    osteofy_log "apt-get install -y $*"
    if _osteofy_apt install -y -q "$@"; then
        return 0
    fi
    osteofy_log "install failed; apt-get update, then apt-get install -y $*"
    _osteofy_apt update -q && _osteofy_apt install -y -q "$@"
}

# Makes sure the command-line tools some tests need are on PATH. Failure is not fatal:
# those tests skip with a stated reason.
osteofy_ensure_system_tools() {
    local -a missing=()
    command -v storescu >/dev/null 2>&1 || missing+=(storescu)
    command -v dciodvfy >/dev/null 2>&1 || missing+=(dciodvfy)
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "${OSTEOFY_SKIP_APT:-0}" = "1" ]; then
        osteofy_warn "missing ${missing[*]}; OSTEOFY_SKIP_APT=1, not installing (tests needing them will skip)"
        return 0
    fi
    osteofy_log "missing ${missing[*]}: installing Debian packages $OSTEOFY_APT_PACKAGES"
    # shellcheck disable=SC2086
    if ! _osteofy_apt_install $OSTEOFY_APT_PACKAGES; then
        osteofy_warn "could not install $OSTEOFY_APT_PACKAGES (no apt-get, no root/sudo, or no network);" \
            "tests needing ${missing[*]} will skip"
    fi
}

# Creates .venv when it is missing or its interpreter no longer runs (a moved or copied
# checkout), then installs the project with the dev extra unless the stamp says that the
# current pyproject.toml is already installed.
osteofy_ensure_venv() {
    local python="${OSTEOFY_PYTHON:-python3}"
    if [ -d "$OSTEOFY_VENV" ] && ! "$OSTEOFY_VENV/bin/python" -c '' >/dev/null 2>&1; then
        osteofy_log "$OSTEOFY_VENV is broken (its python does not run): recreating it"
        rm -rf "$OSTEOFY_VENV"
    fi
    if [ ! -d "$OSTEOFY_VENV" ]; then
        if ! command -v "$python" >/dev/null 2>&1; then
            echo "error: $python not found; install Python 3.11 or newer (or set OSTEOFY_PYTHON)" >&2
            return 1
        fi
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "error: $("$python" -V 2>&1) is too old; Osteofy Edge needs Python 3.11 or newer" \
                "(set OSTEOFY_PYTHON to a newer interpreter)" >&2
            return 1
        fi
        osteofy_log "$python -m venv .venv"
        if ! "$python" -m venv "$OSTEOFY_VENV"; then
            # Debian and Ubuntu ship venv/ensurepip in a separate package (python3.X-venv).
            rm -rf "$OSTEOFY_VENV"
            local venv_pkg
            venv_pkg="$("$python" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
            if [ "${OSTEOFY_SKIP_APT:-0}" = "1" ] || ! _osteofy_apt_install "$venv_pkg"; then
                echo "error: '$python -m venv' failed; install the venv module" \
                    "(on Debian/Ubuntu: apt-get install $venv_pkg)" >&2
                return 1
            fi
            "$python" -m venv "$OSTEOFY_VENV"
        fi
    fi

    local want have=""
    want="$(sha256sum "$OSTEOFY_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$OSTEOFY_STAMP" ]; then
        have="$(cat "$OSTEOFY_STAMP")"
    fi
    if [ "$want" = "$have" ]; then
        return 0
    fi
    osteofy_log "pip install -e '.[$OSTEOFY_EXTRAS]' (pyproject.toml changed or first run)"
    (cd "$OSTEOFY_ROOT" && "$OSTEOFY_VENV/bin/python" -m pip install -q -e ".[$OSTEOFY_EXTRAS]")
    printf '%s\n' "$want" >"$OSTEOFY_STAMP"
}

# The Python packages mypy checks: those of the list that exist in this checkout.
osteofy_mypy_packages() {
    local pkg
    for pkg in osteofy cohort edge quantize firmware_bridge dashboard; do
        if [ -d "$OSTEOFY_ROOT/$pkg" ]; then
            printf '%s\n' "$pkg"
        fi
    done
}
