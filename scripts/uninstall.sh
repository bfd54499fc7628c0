#!/usr/bin/env bash
# Remove Osteofy Edge's services and code (what scripts/install.sh put in place).
#
#   sudo scripts/uninstall.sh            # keeps configuration, secrets, models and data
#   sudo scripts/uninstall.sh --purge    # also those, and the service users
#   scripts/uninstall.sh --root DIR --dry-run [--purge]   # on a tree made by install.sh --dry-run
#
# Kept without --purge, so that a reinstall carries on where this one stopped:
#   /etc/osteofy (config.yaml, dashboard.yaml, credentials/ with the SITE SECRET, tls/),
#   /opt/osteofy/models (packages an operator may have copied there),
#   /var/lib/osteofy (inbox, results, the outbox of messages not yet delivered, engines),
#   /var/lib/osteofy-kiosk, the dashboard's database, the users osteofy and osteofy-kiosk.
# --purge deletes them too. Without the site secret, the patient and study keys this site's
# devices made can no longer be matched with new ones: keep a copy if results are kept.
set -euo pipefail

ROOT=""
DRY_RUN=0
PURGE=0

OPT=/opt/osteofy
UNITS=/etc/systemd/system
ALL_UNITS=(osteofy-kiosk.service osteofy-edge.service osteofy-bridge.service
    osteofy-build-engine.service osteofy-dashboard.service)

# shellcheck source=scripts/_admin.sh
. "$(dirname "${BASH_SOURCE[0]}")/_admin.sh"

while [ "$#" -gt 0 ]; do
    case "$1" in
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
if [ -n "$ROOT" ]; then
    [ "$DRY_RUN" -eq 1 ] || die "--root is for --dry-run only"
    ROOT="$(cd "$ROOT" && pwd)" || die "--root: no such directory"
    [ "$ROOT" != "/" ] || ROOT=""
fi
if [ "$DRY_RUN" -eq 1 ] && [ -z "$ROOT" ]; then
    die "--dry-run needs --root DIR"
fi
if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo)"
fi

installed=()
for unit in "${ALL_UNITS[@]}"; do
    [ ! -e "$(T "$UNITS/$unit")" ] || installed+=("$unit")
done
if [ "${#installed[@]}" -gt 0 ]; then
    run systemctl disable --now "${installed[@]}"
fi
for unit in "${ALL_UNITS[@]}"; do
    rm -f "$(T "$UNITS/$unit")"
    # Our drop-ins; one an operator added with `systemctl edit` goes only with --purge.
    rm -f "$(T "$UNITS/$unit.d/50-credentials.conf")" "$(T "$UNITS/$unit.d/gpu.conf")"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$(T "$UNITS/$unit.d")"
    else
        rmdir "$(T "$UNITS/$unit.d")" 2>/dev/null || true
    fi
done
run systemctl daemon-reload
log "removed the units"

rm -rf "$(T $OPT/venv)" "$(T $OPT/libexec)" "$(T $OPT/docs)" "$(T $OPT/share)"
log "removed the code ($OPT/venv) and its helpers"

if [ "$PURGE" -eq 0 ]; then
    log "kept /etc/osteofy (configuration, credentials with the site secret), $OPT/models," \
        "/var/lib/osteofy (results, outbox, engines); --purge removes them"
    rmdir "$(T $OPT)" 2>/dev/null || true
    exit 0
fi

rm -rf "$(T $OPT)" "$(T /etc/osteofy)" "$(T /var/lib/osteofy)" "$(T /var/lib/osteofy-kiosk)" \
    "$(T /var/lib/private/osteofy-dashboard)" "$(T /var/lib/osteofy-dashboard)"
for user in osteofy-kiosk osteofy; do
    if grep -q "^$user:" "$(T /etc/passwd)" 2>/dev/null; then
        run userdel "$user"
    fi
done
log "purged configuration, credentials, models, data and the service users"
