#!/bin/sh
# The size limits of issue 13, checked on the sources so they stay true: no
# C file over 1,200 lines, no function over 120 (from its opening line to
# its closing brace), engine/node.c under 800.  Run by make lint.
cd "$(dirname "$0")/.." || exit 1
bad=0
for f in engine/*.c lua/*.c gpu/*.c gpu/*.cu cmd/*.c; do
  [ -f "$f" ] || continue
  n=$(wc -l < "$f")
  if [ "$n" -gt 1200 ]; then echo "$f: $n lines (at most 1,200)" >&2; bad=1; fi
  # A function starts at a line in column 0 that names it (its parameter
  # list may go on over the next lines) and ends at the next "}" alone in
  # column 0.
  awk -v f="$f" '
    start == 0 && /^[A-Za-z_]/ && /\(/ && !/=/ && !/^(typedef|struct|enum|union)[[:space:]]/ { cand = NR; name = $0 }
    start == 0 && cand > 0 && /;[[:space:]]*$/ { cand = 0 }
    start == 0 && cand > 0 && /\{[[:space:]]*$/ { start = cand; cand = 0; next }
    start > 0 && /^}/ {
      if (NR - start + 1 > 120) { printf "%s:%d: function of %d lines (at most 120): %s\n", f, start, NR - start + 1, substr(name, 1, 70) > "/dev/stderr"; bad = 1 }
      start = 0
    }
    END { exit bad }' "$f" || bad=1
done
n=$(wc -l < engine/node.c)
if [ "$n" -ge 800 ]; then echo "engine/node.c: $n lines (under 800)" >&2; bad=1; fi
[ $bad -eq 0 ] || { echo "check-sizes: a file or function is over its limit (issue 13)" >&2; exit 1; }
