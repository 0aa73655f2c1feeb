#!/usr/bin/env bash
# Build pjsua2 for one Python from the pjproject that Debian sid's `asterisk` source package
# carries, once, and cache it as a wheel named like the PyPI distribution (pjsua2-python), so
# pip replaces the PyPI wheel (4 calls per process) with this build (scripts/pjsua2/config_site.h).
#   scripts/build-pjsua2.sh [PYTHON]     # default python3; the wheel's path is the last stdout line
# Cache: ${GATEWAY_PJSUA2_CACHE:-~/.cache/gw-pjsua2}/<pjproject version>-py<X.Y>-<key>/, reused
# while this script and config_site.h are unchanged (<key> hashes both, so checkouts that differ
# keep their own builds side by side); GATEWAY_PJSUA2_REBUILD=1 (or deleting it) takes the
# release sid serves now. The source tarball is kept in <cache>/sources/ for offline rebuilds.
# Downloads only from the Debian mirror (GATEWAY_PJSUA2_MIRROR, default deb.debian.org) and PyPI
# (setuptools + wheel for the build). Debian (apt) only; run as root or with sudo. ~4 minutes on
# 2 cores (GATEWAY_PJSUA2_JOBS, default all), compiled under `nice`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
py="$("${1:-python3}" -c 'import sys; print(sys.executable)')"  # absolute: the build changes directory
cache="${GATEWAY_PJSUA2_CACHE:-$HOME/.cache/gw-pjsua2}"
mirror="${GATEWAY_PJSUA2_MIRROR:-http://deb.debian.org/debian}"
jobs="${GATEWAY_PJSUA2_JOBS:-$(nproc)}"
min_version=2.15
config_site="$here/pjsua2/config_site.h"

log() { echo "build-pjsua2: $*" >&2; }

pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# Any change to the recipe (this script) or the configuration invalidates the cached build.
key="$(cat "$0" "$config_site" | sha256sum | cut -c1-16)"

cached_wheel() {
  local dir
  for dir in $(ls -d "$cache"/*-py"$pyver"-"$key" 2>/dev/null | sort -V -r); do
    if [ "$(cat "$dir/build.key" 2>/dev/null)" = "$key" ] && ls "$dir"/pjsua2_python-*.whl >/dev/null 2>&1; then
      ls "$dir"/pjsua2_python-*.whl | head -1
      return 0
    fi
  done
  return 1
}

if [ "${GATEWAY_PJSUA2_REBUILD:-0}" != 1 ] && wheel="$(cached_wheel)"; then
  echo "$wheel"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

command -v apt-get >/dev/null || { log "needs a Debian system (apt-get)"; exit 1; }
apt_install build-essential pkg-config xz-utils swig libspeex-dev libspeexdsp-dev libsrtp2-dev libssl-dev uuid-dev \
  libopus-dev
if ! "$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  apt_install "python$pyver-dev"  # a Debian-built Python; pyenv and the python images carry their headers
fi
"$py" -c 'import ensurepip' 2>/dev/null || apt_install "python$pyver-venv"

work="$(mktemp -d "${TMPDIR:-/tmp}/gw-pjsua2.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# 1. Source: sid's asterisk source package, through a private apt configuration (nothing under
#    /etc/apt changes; the index lands in $work). Its pjproject tarball is kept in the cache so
#    a rebuild after a configuration change needs no network.
t0=$SECONDS
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src" "$cache/sources"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$work/apt/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o APT::Sandbox::User=root)
if apt-get "${apt_opts[@]}" update -qq >&2 &&
   (cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only -qq asterisk >&2); then
  tarball="$(ls "$work"/src/asterisk_*.orig-Xpjproject.tar.xz 2>/dev/null | head -1)"
  [ -n "$tarball" ] || { log "sid's asterisk source package carries no pjproject tarball any more"; exit 1; }
  cp "$tarball" "$cache/sources/"
  tarball="$cache/sources/$(basename "$tarball")"
else
  tarball="$(ls "$cache"/sources/asterisk_*.orig-Xpjproject.tar.xz 2>/dev/null | sort -V | tail -1)"
  [ -n "$tarball" ] || { log "could not download asterisk's source package from $mirror (sid)"; exit 1; }
  log "download failed; building the cached $(basename "$tarball")"
fi
mkdir -p "$work/pj"
tar -xJf "$tarball" -C "$work/pj" --strip-components=1
cd "$work/pj"
version="$(awk -F':=' '/^export PJ_VERSION_(MAJOR|MINOR|REV) /{gsub(/ /, "", $2); if ($2 != "") v = v (v ? "." : "") $2} END {print v}' version.mak)"
if ! "$py" -c 'import sys; v, m = (tuple(map(int, s.split("."))) for s in sys.argv[1:]); sys.exit(v < m)' "$version" "$min_version"; then
  log "pjproject $version from $(basename "$tarball") is older than $min_version; refusing"
  exit 1
fi
t_download=$((SECONDS - t0))
log "pjproject $version ($(basename "$tarball")), Python $pyver"

# 2. The C libraries. Debian strips the bundled third-party code (DFSG): speex and srtp come
#    from the system, the codecs that would need the rest are disabled, and the Windows-only
#    BDIMAD audio device, removed as well, is still listed by pjmedia's Makefile.
t0=$SECONDS
cp "$config_site" pjlib/include/pj/config_site.h
[ -e pjmedia/src/pjmedia-audiodev/bdimad_dev.c ] || : >pjmedia/src/pjmedia-audiodev/bdimad_dev.c
# G.711 (PCMU/PCMA), G.722 and Opus (Debian's libopus, found by configure) stay: the ingress
# codecs (HD voice). Speex's codec goes (pjsua's default codec, ~4x PCMU's CPU) and with it, in
# pjmedia's Makefile, its echo canceller (unused: the workers set no echo tail) and the
# -lspeexdsp that the speex resampler still needs, hence LIBS.
./aconfigure --disable-sound --disable-video --enable-epoll --disable-shared \
  --with-external-speex --enable-speex-resample --with-external-srtp \
  --disable-speex-codec --disable-speex-aec --disable-gsm-codec --disable-ilbc-codec --disable-g7221-codec \
  --disable-l16-codec \
  --disable-opencore-amr --disable-silk --disable-bcg729 --disable-lyra \
  --disable-sdl --disable-ffmpeg --disable-v4l2 --disable-openh264 --disable-vpx --disable-libyuv \
  --disable-libwebrtc --disable-upnp \
  CFLAGS="-O2 -fPIC" CXXFLAGS="-O2 -fPIC" LIBS="-lspeexdsp" >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log" >&2; exit 1; }
# configure leaves Opus out quietly when it does not find libopus; the gateway promises Opus legs.
grep -q 'OPUS support enabled' "$work/configure.log" || { grep -i opus "$work/configure.log" >&2; log "configure did not find libopus"; exit 1; }
nice -n 10 make dep >"$work/make-dep.log" 2>&1 || { tail -30 "$work/make-dep.log" >&2; exit 1; }
nice -n 10 make -j"$jobs" lib >"$work/make-lib.log" 2>&1 || { tail -30 "$work/make-lib.log" >&2; exit 1; }
t_lib=$((SECONDS - t0))

# 3. The SWIG module, compiled by the target Python (its headers and ABI) in a throwaway venv
#    that has setuptools; pjproject's `make install` would write to ~/.local, so nothing is installed.
t0=$SECONDS
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check setuptools wheel >&2
swig_dir=pjsip-apps/src/swig/python
nice -n 10 make -C "$swig_dir" PYTHON_EXE="$work/venv/bin/python" >"$work/make-swig.log" 2>&1 ||
  { tail -30 "$work/make-swig.log" >&2; exit 1; }
t_swig=$((SECONDS - t0))

# 4. A wheel laid out like PyPI's pjsua2-python (package pjsua2, bindings in pjsua2.pjsua2), so
#    pip swaps one for the other; MAX_CALLS tells the gateway which build it got (the PyPI wheel
#    has no such attribute and holds 4 calls).
max_calls="$(awk '/^#define PJSUA_MAX_CALLS /{print $3}' "$config_site")"
wheel_version="$version+gw.$key"
tag="$("$py" -c 'import sys, sysconfig; t = "cp%d%d" % sys.version_info[:2]; print(t, t, sysconfig.get_platform().replace("-", "_").replace(".", "_"), sep="-")')"
stage="$work/stage"
mkdir -p "$stage/pjsua2" "$stage/pjsua2_python-$wheel_version.dist-info"
so="$(ls "$swig_dir"/build/lib.*/_pjsua2*.so | head -1)"
install -m 644 "$so" "$stage/pjsua2/"
strip --strip-unneeded "$stage/pjsua2/$(basename "$so")"
install -m 644 "$swig_dir/pjsua2.py" "$stage/pjsua2/pjsua2.py"
cat >"$stage/pjsua2/__init__.py" <<EOF
"""pjsua2 $version built by the gateway's scripts/build-pjsua2.sh (not the PyPI wheel).

Configuration: scripts/pjsua2/config_site.h; source: $(basename "$tarball").
"""

from .pjsua2 import *  # noqa: F403  (the SWIG bindings, as the PyPI wheel exposes them)

__version__ = "$wheel_version"
#: PJSUA_MAX_CALLS this build was compiled with (the PyPI wheel: 4, and no such attribute).
MAX_CALLS = $max_calls


def __getattr__(name):  # names the star import skips (leading underscore), like the PyPI wheel
    from . import pjsua2

    return getattr(pjsua2, name)
EOF
cat >"$stage/pjsua2_python-$wheel_version.dist-info/METADATA" <<EOF
Metadata-Version: 2.1
Name: pjsua2-python
Version: $wheel_version
Summary: pjsua2 $version (Debian sid asterisk source), built by scripts/build-pjsua2.sh
License: GPL-2.0-or-later
EOF
cat >"$stage/pjsua2_python-$wheel_version.dist-info/WHEEL" <<EOF
Wheel-Version: 1.0
Generator: build-pjsua2.sh
Root-Is-Purelib: false
Tag: $tag
EOF
echo pjsua2 >"$stage/pjsua2_python-$wheel_version.dist-info/top_level.txt"
# A missing library shows up only when the module is loaded: load it before caching anything
# (stdout carries only pjlib's log; an import error goes to stderr).
(cd "$stage" && "$work/venv/bin/python" -c 'import pjsua2; ep = pjsua2.Endpoint(); ep.libCreate(); ep.libDestroy()' >/dev/null) ||
  { log "the built module does not load"; exit 1; }
out="$cache/$version-py$pyver-$key"
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
"$work/venv/bin/python" -m wheel pack "$stage" -d "$out.tmp" >&2
echo "$key" >"$out.tmp/build.key"
printf 'download %ss, lib %ss, swig %ss\n' "$t_download" "$t_lib" "$t_swig" >"$out.tmp/build.times"
rm -rf "$out" && mv "$out.tmp" "$out"
log "built in $(cat "$out/build.times") -> $out"
ls "$out"/pjsua2_python-*.whl
