#!/bin/sh
# Run a real Keycloak (cached distribution, fixtures/realm-cx-dev.json imported, fresh database)
# on loopback until Ctrl-C, for trying the gateway against it:
#   scripts/keycloak.sh [--port 8081]      then   GATEWAY_DEV=true GATEWAY_KEYCLOAK_URL=http://127.0.0.1:8081 python -m gateway serve
set -eu
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m devtools.keycloak --serve "$@"
