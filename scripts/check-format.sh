#!/bin/sh
# The C lines a change adds or edits, checked against .clang-format
# (clang-format-diff reformats only those lines, so older code that
# predates the file does not fail a change).  Usage:
#   sh scripts/check-format.sh [BASE]    BASE: a commit (default: HEAD~1)
# Prints the reformatting it wants and exits 1, or exits 0.  Part of make
# lint; skipped with a note when clang-format is not installed.
cd "$(dirname "$0")/.." || exit 1
base=${1:-HEAD~1}
cfd=$(command -v clang-format-diff || command -v clang-format-diff-14)
if [ -z "$cfd" ]; then echo "check-format: clang-format-diff not found (Debian clang-format); skipped"; exit 0; fi
out=$(git diff -U0 --no-color "$base" -- '*.c' '*.h' | "$cfd" -p1)
[ -z "$out" ] && exit 0
echo "$out"
echo "check-format: the lines above do not follow .clang-format (fix: git diff -U0 $base | $cfd -p1 -i)" >&2
exit 1
