#!/usr/bin/env bash
# Make this checkout runnable: a .venv with the project installed, and (for tests) the Debian
# packages of the real peers. Idempotent and quick when everything is already there.
#   scripts/setup.sh run    # what `make run` needs
#   scripts/setup.sh test   # what `make test` needs (sipp, chromium, espeak-ng, sox, a JRE)
#   scripts/setup.sh bench  # what `make bench` needs: the test peers, gcc and janus
#   scripts/setup.sh cluster  # what `make cluster` needs: redis-server and kamailio
# All three build pjsua2 from source once (scripts/build-pjsua2.sh) and install it into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-run}"
PYTHON="${PYTHON:-}"

find_python() {
  # pjsua2's wheel exists for CPython 3.11 and 3.12 only.
  for candidate in "$PYTHON" python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! py="$(find_python)"; then
  apt_install python3 python3-venv
  py="$(find_python)" || { echo "setup: Python 3.11 or 3.12 is required (pjsua2 has no wheel for other versions)" >&2; exit 1; }
fi
"$py" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

stamp=.venv/.installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: creating .venv with $py"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# pjsua2 built for hundreds of calls per worker process (scripts/build-pjsua2.sh: once, cached by
# pjproject and Python version) replaces the PyPI wheel, which holds 4 calls per process and stays
# the fallback: GATEWAY_PJSUA2=wheel skips the build (a machine without apt, say).
if [ "${GATEWAY_PJSUA2:-build}" != wheel ]; then
  wheel="$(scripts/build-pjsua2.sh .venv/bin/python | tail -1)" || {
    echo "setup: building pjsua2 failed; GATEWAY_PJSUA2=wheel runs with the PyPI wheel (4 calls per worker)" >&2
    exit 1
  }
  want="$(basename "$wheel" | cut -d- -f2)"
  have="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pjsua2-python"))' 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "setup: installing pjsua2 $want into .venv"
    .venv/bin/python -m pip install -q --no-deps --force-reinstall "$wheel"
    .venv/bin/python scripts/check-pjsua2.py
  fi
fi

if [ "$what" = "test" ] || [ "$what" = "bench" ]; then
  # Real peers: sipp (the telephony platform), chromium (the supervisor's browser),
  # espeak-ng + sox (speech fixtures), a Java runtime for Keycloak, maven to fetch it once,
  # redis-server (the shared state of several instances: tests and benches start their own),
  # kamailio (the SIP address in front of several instances: devtools/kamailio.py; its TLS module).
  pkgs=(sip-tester chromium espeak-ng sox maven curl redis-server kamailio kamailio-tls-modules)
  if ! ls /usr/lib/jvm 2>/dev/null | grep -qE 'temurin-2[1-9]|openjdk-(2[1-9])|java-(2[1-9])'; then
    pkgs+=(openjdk-17-jre-headless)
  fi
  if [ "$what" = "bench" ]; then
    # bench/voice_sip.py: a C compiler for its RTP generator (bench/rtpbench.c) and Janus
    # AudioBridge, the anchor it compares the gateway with.
    pkgs+=(gcc libc6-dev janus)
  fi
  apt_install "${pkgs[@]}"
  # axe-core (npm) for the console's accessibility check in the Chromium tests: package.json
  # pins it, package-lock.json fixes what npm ci installs into node_modules/ (not committed).
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  if [ ! -f node_modules/axe-core/axe.min.js ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup: installing axe-core (npm ci)"
    npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
  fi
fi
if [ "$what" = "cluster" ]; then
  apt_install redis-server kamailio
fi
