#!/bin/sh
# Installs the Debian packages Tide builds and tests with.  Idempotent and
# quick when everything is present: one dpkg-query, no network.
set -e
PKGS="pkg-config gcc make libuv1-dev libzmq3-dev libsodium-dev libedit-dev
libopenblas-dev node-llhttp lua-cjson lua-check libsqlite3-dev clang
libclang-rt-14-dev bible-kjv-text libssl-dev"
# Either LuaJIT flavour satisfies the build; never remove one that is installed.
if ! dpkg-query -W -f='${Status}\n' libluajit-5.1-dev libluajit2-5.1-dev 2>/dev/null |
    grep -q 'install ok installed'; then
  PKGS="$PKGS libluajit-5.1-dev"
fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# Another apt-get (a second build, a second checkout) may hold dpkg's lock:
# wait for it rather than fail the build.
LOCK="-o DPkg::Lock::Timeout=300"
$SUDO apt-get $LOCK update -qq || true
$SUDO apt-get $LOCK install -y -qq --no-install-recommends $missing >/dev/null
