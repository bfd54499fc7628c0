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
#   OSTEOFY_PYTHON310 interpreter for the device leg's .venv310 (default: python3.10 on PATH,
#                     else pyenv's newest 3.10); see osteofy_device_leg
#   OSTEOFY_TEST_PY310  auto (default), 1 or 0: whether scripts/test also runs the device tests
#                     on Python 3.10 (see osteofy_device_leg)

OSTEOFY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OSTEOFY_VENV="$OSTEOFY_ROOT/.venv"
OSTEOFY_STAMP="$OSTEOFY_VENV/.osteofy-stamp"
OSTEOFY_EXTRAS="dev,train,dashboard,bridge"
# The device side runs on Python 3.10 (JetPack 6's TensorRT bindings): its own venv and extras.
OSTEOFY_VENV310="$OSTEOFY_ROOT/.venv310"
OSTEOFY_DEVICE_EXTRAS="device,test"
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

# Prints the Python 3.10 interpreter for the device leg: $OSTEOFY_PYTHON310, python3.10 on
# PATH, or pyenv's newest 3.10. Returns non-zero when there is none.
osteofy_find_python310() {
    local candidate pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    local -a candidates=("${OSTEOFY_PYTHON310:-}" python3.10)
    candidates+=("$(find "$pyenv_root/versions" -maxdepth 3 -path '*/3.10.*/bin/python3.10' \
        2>/dev/null | sort -V | tail -n 1)")
    for candidate in "${candidates[@]}"; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Creates or updates .venv310 with the device extras, like osteofy_ensure_venv does .venv.
osteofy_ensure_venv310() {
    local python="$1" want have=""
    if [ -d "$OSTEOFY_VENV310" ] && ! "$OSTEOFY_VENV310/bin/python" -c \
        'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
        osteofy_log "$OSTEOFY_VENV310 is broken or not Python 3.10: recreating it"
        rm -rf "${OSTEOFY_VENV310:?}"
    fi
    if [ ! -x "$OSTEOFY_VENV310/bin/python" ]; then
        osteofy_log "$python -m venv .venv310"
        "$python" -m venv "$OSTEOFY_VENV310" || {
            echo "error: '$python -m venv' failed; install the venv module" \
                "(on Debian/Ubuntu: apt-get install python3.10-venv)" >&2
            return 1
        }
    fi
    # The checkout is part of the key: an editable install points at one checkout.
    want="$(cat "$OSTEOFY_ROOT/pyproject.toml" <(printf '%s\n' "$OSTEOFY_ROOT") | sha256sum |
        cut -d' ' -f1)"
    if [ -f "$OSTEOFY_VENV310/.osteofy-stamp" ]; then
        have="$(cat "$OSTEOFY_VENV310/.osteofy-stamp")"
    fi
    if [ "$want" = "$have" ]; then
        return 0
    fi
    osteofy_log "python3.10: pip install -e '.[$OSTEOFY_DEVICE_EXTRAS]' (pyproject.toml changed or first run)"
    (cd "$OSTEOFY_ROOT" &&
        "$OSTEOFY_VENV310/bin/python" -m pip install -q -e ".[$OSTEOFY_DEVICE_EXTRAS]")
    printf '%s\n' "$want" >"$OSTEOFY_VENV310/.osteofy-stamp"
}

# The device leg: the tests marked `device` on Python 3.10, in .venv310 (no PyTorch there).
# OSTEOFY_TEST_PY310=auto (default) runs it when scripts/test got no arguments or only
# reporting options (-q, -v, -x, -rX, --tb=..., --color=..., --durations=N), which it passes
# on; arguments that choose tests (-k, -m, paths) skip it. =1 always runs it, with all the
# arguments after `-m device` (a -m of yours replaces that); =0 never does. Without a
# Python 3.10 it is skipped with a message. Returns pytest's status.
osteofy_device_leg() {
    local mode="${OSTEOFY_TEST_PY310:-auto}" arg python rc=0
    case "$mode" in
    0)
        osteofy_log "device tests on Python 3.10: skipped (OSTEOFY_TEST_PY310=0)"
        return 0
        ;;
    auto)
        for arg in "$@"; do
            if ! [[ "$arg" =~ ^(-q+|-v+|-x|-r[a-zA-Z]+|--tb=.+|--color=.+|--durations=[0-9]+)$ ]]; then
                osteofy_log "device tests on Python 3.10: skipped (the arguments choose tests;" \
                    "OSTEOFY_TEST_PY310=1 runs them there too)"
                return 0
            fi
        done
        ;;
    1) ;;
    *)
        echo "error: OSTEOFY_TEST_PY310 must be auto, 1 or 0, not '$mode'" >&2
        return 2
        ;;
    esac
    if ! python="$(osteofy_find_python310)"; then
        osteofy_log "device tests on Python 3.10: skipped (no python3.10 found; set OSTEOFY_PYTHON310)"
        return 0
    fi
    osteofy_ensure_venv310 "$python" || return 1
    osteofy_log "python3.10 -m pytest -m device $*"
    env -u OSTEOFY_TEST_PY310 "$OSTEOFY_VENV310/bin/python" -m pytest -m device "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "scripts/test: FAILED: pytest -m device on Python 3.10 collected no tests" >&2
    fi
    return "$rc"
}
