#!/bin/sh
# The README's first command on a machine that never built Tide: removes
# three -dev packages the build needs, clones the committed HEAD into a
# temporary directory and runs `make demo` there ONCE; it must install the
# packages itself and build and run the flagship (examples/genai.lua) on
# that first run.  CI
# machines keep the packages between runs, so without the removal a
# Makefile that reads pkg-config before scripts/deps.sh has run (issue 11,
# item 1) would pass there and fail for a new user.
#
# Needs root and apt-get; the packages are installed again whatever happens.
# Run by .ci/run (as root) and by `make check-bare`.  LuaJIT is never
# removed: either flavour may be the one installed.
set -u
PKGS="libuv1-dev libzmq3-dev libedit-dev"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "check-bare: needs root and apt-get (it removes and reinstalls $PKGS)" >&2
  exit 2
fi
root=$(git rev-parse --show-toplevel) || exit 2
tmp=$(mktemp -d /tmp/tide-bare-XXXXXX)
export DEBIAN_FRONTEND=noninteractive
restore() {
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $PKGS >/dev/null 2>&1 ||
    echo "check-bare: could not reinstall $PKGS; run: sh scripts/deps.sh" >&2
}
trap 'restore; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

git clone -q "$root" "$tmp/tide" || exit 1
apt-get -o DPkg::Lock::Timeout=300 remove -y -qq $PKGS >/dev/null 2>&1 || {
  echo "check-bare: apt-get remove $PKGS failed" >&2; exit 1; }
for p in $PKGS; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    echo "check-bare: $p is still installed after apt-get remove" >&2; exit 1
  fi
done
echo "check-bare: removed $PKGS; running 'make demo' once in a fresh clone"
start=$(date +%s)
if ! (cd "$tmp/tide" && make demo) >"$tmp/demo.log" 2>&1; then
  echo "check-bare: FAILED: the first 'make demo' on a machine without $PKGS; last lines:" >&2
  tail -20 "$tmp/demo.log" >&2
  exit 1
fi
# The flagship's last line; a demo that built but ran nothing lacks it.
if ! grep -q '^done in ' "$tmp/demo.log"; then
  echo "check-bare: FAILED: 'make demo' exited 0 but examples/genai.lua did not finish; last lines:" >&2
  tail -20 "$tmp/demo.log" >&2
  exit 1
fi
echo "check-bare: ok: the first 'make demo' installed the packages, built and ran examples/genai.lua in $(( $(date +%s) - start )) s"
