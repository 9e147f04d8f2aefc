#!/usr/bin/env bash
# Install the pinned Azurite (Azure Storage emulator, npm) into a project-local folder, and make the
# production-style blob host name of the emulator's account resolve to loopback.
#
#   bash infra/install-azurite.sh            # -> .cache/azurite/node_modules/.bin/azurite
#
# Idempotent and cache-friendly: does nothing when the pinned version is already there. The stand-in
# (tests/azure_standin) finds it at .cache/azurite, or at $AZURITE_BIN.
# Azurite is always started by the stand-in with --disableTelemetry: never start it without.
set -euo pipefail

AZURITE_VERSION="${AZURITE_VERSION:-3.35.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${AZURITE_PREFIX:-$ROOT/.cache/azurite}"
BIN="$PREFIX/node_modules/.bin/azurite"

installed_version() {
    node -e "console.log(require('$PREFIX/node_modules/azurite/package.json').version)" 2>/dev/null || true
}

if ! command -v npm >/dev/null 2>&1; then
    echo "install-azurite: npm not found; install Node.js >= 18 (Debian: apt-get install -y nodejs npm)" >&2
    exit 1
fi

if [ -x "$BIN" ] && [ "$(installed_version)" = "$AZURITE_VERSION" ]; then
    echo "install-azurite: azurite $AZURITE_VERSION already in $PREFIX"
else
    mkdir -p "$PREFIX"
    # A private package.json so npm installs here and never touches a global prefix.
    [ -f "$PREFIX/package.json" ] || echo '{"name":"orch-azurite","private":true}' > "$PREFIX/package.json"
    npm install --prefix "$PREFIX" --no-audit --no-fund --no-save --loglevel=error \
        "azurite@$AZURITE_VERSION"
    echo "install-azurite: installed azurite $(installed_version) in $PREFIX"
fi

# Blob URLs are https://{account}.blob.{storage_endpoint}; with storage_endpoint core.localhost:10000 the
# host is devstoreaccount1.blob.core.localhost. The stand-in also patches name resolution in-process for its
# own tests, so this is only needed for jobs and tools run by hand. Only as root, and only once.
HOSTS_LINE="127.0.0.1 devstoreaccount1.blob.core.localhost orchkv.vault.localhost vault.localhost"
if [ "$(id -u)" = "0" ] && [ -w /etc/hosts ]; then
    if ! grep -q "devstoreaccount1.blob.core.localhost" /etc/hosts; then
        echo "$HOSTS_LINE" >> /etc/hosts
        echo "install-azurite: added '$HOSTS_LINE' to /etc/hosts"
    fi
else
    echo "install-azurite: not root: add '$HOSTS_LINE' to /etc/hosts by hand for use outside the test process"
fi
