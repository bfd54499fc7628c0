# shellcheck shell=bash
# Helpers shared by install.sh and uninstall.sh (sourced, never run). Each script sets ROOT
# (--root) and DRY_RUN (--dry-run) before calling them.

# One line on stderr, named after the script, and exit 2 (a usage or environment error).
die() {
    printf '%s: %s\n' "$(basename "$0")" "$*" >&2
    exit 2
}

log() {
    printf '==> %s\n' "$*" >&2
}

warn() {
    printf 'warning: %s\n' "$*" >&2
}

# Commands that change the machine outside the files of the tree (packages, users, ownership,
# the venv, services): run them, or under --dry-run print them.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf 'dry-run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# The path of an installed file: under --root, inside that directory.
T() {
    printf '%s%s' "$ROOT" "$1"
}
