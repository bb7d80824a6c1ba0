#!/bin/sh
# Installs the Debian packages Tide builds and tests with.  Idempotent and
# quick when everything is present: one dpkg-query, no network.
#   sh scripts/deps.sh        what the build needs (every `make`)
#   sh scripts/deps.sh test   that and what only `make test` needs: prometheus,
#                             whose promtool checks /metrics and whose server
#                             scrapes a head in tests/sh/observe_test.sh
set -e
PKGS="pkg-config gcc make libuv1-dev libzmq3-dev libsodium-dev libedit-dev
libopenblas-dev node-llhttp lua-cjson lua-check libsqlite3-dev clang
libclang-rt-14-dev bible-kjv-text libssl-dev libgcrypt20-dev"
# Either LuaJIT flavour satisfies the build; never remove one that is installed.
if ! dpkg-query -W -f='${Status}\n' libluajit-5.1-dev libluajit2-5.1-dev 2>/dev/null |
    grep -q 'install ok installed'; then
  PKGS="$PKGS libluajit-5.1-dev"
fi
[ "$1" = test ] && PKGS="$PKGS prometheus"
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
# A package's install script must not start a service (prometheus would
# listen on :9090 for good): policy-rc.d says no, if there is none already,
# and only the one made here is removed.
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  policy=/usr/sbin/policy-rc.d
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null && $SUDO chmod +x $policy
fi
trap '[ -n "$policy" ] && $SUDO rm -f $policy' EXIT
$SUDO apt-get $LOCK update -qq || true
$SUDO apt-get $LOCK install -y -qq --no-install-recommends $missing >/dev/null
