#!/bin/sh
# End to end on the CPU: a short run of examples/train_tiny_gpt.lua (loss
# logged and falling, checkpoint saved and reloaded with the same loss, both
# samples printed) and a quick build/bench-allreduce run whose results are
# correct JSON lines.  TAP.
cd "$(dirname "$0")/../.." || exit 1
n=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
nok() { n=$((n + 1)); echo "not ok $n - $1"; [ -n "$2" ] && echo "$2" | tail -20 | sed 's/^/# /'; }
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT

out=$(TMPDIR="$TMP" timeout 240 bin/tide run examples/train_tiny_gpt.lua 100 "$TMP/ckpt.safetensors" 2>&1)
rc=$?
first=$(echo "$out" | awk '/^step 1 loss/ {print $4}')
last=$(echo "$out" | awk '/^step 100 loss/ {print $4}')
if [ $rc -eq 0 ] && [ -n "$first" ] && [ -n "$last" ] &&
    awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 2) }'; then
  ok "train_tiny_gpt logs 'step <n> loss <x>' and the loss falls ($first -> $last)"
else
  nok "train_tiny_gpt logs 'step <n> loss <x>' and the loss falls" "$out"
fi
if [ -s "$TMP/ckpt.safetensors" ] && echo "$out" | grep -q '^reloaded checkpoint' &&
    echo "$out" | grep -q -- '--- untrained model' && echo "$out" | grep -q -- '--- trained model'; then
  ok "train_tiny_gpt saves, reloads and samples before and after training"
else
  nok "train_tiny_gpt saves, reloads and samples before and after training" "$out"
fi

out=$(timeout 120 build/bench-allreduce 2 1 1048576 2>&1)
lines=$(echo "$out" | grep -c '"metric":"allreduce_f32_sum_')
if [ $? -eq 0 ] && [ "$lines" -eq 3 ] && ! echo "$out" | grep -q '"correct":false'; then
  ok "bench-allreduce prints correct allreduce_f32_sum_<size> lines"
else
  nok "bench-allreduce prints correct allreduce_f32_sum_<size> lines" "$out"
fi
out=$(timeout 120 build/bench-allreduce 1 1 65536 3 2>&1)
if [ "$(echo "$out" | grep -c '"ranks":3')" -eq 2 ] && ! echo "$out" | grep -q '"correct":false'; then
  ok "bench-allreduce with 3 ranks is correct"
else
  nok "bench-allreduce with 3 ranks is correct" "$out"
fi
echo "1..$n"
