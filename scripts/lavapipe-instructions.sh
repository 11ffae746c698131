#!/usr/bin/env bash
# Deterministic A/B figure for lavapipe, where wall time on a shared 2-core VM swings 2-3x
# between runs of one binary: the instructions executed in lavapipe's JIT-compiled shader code
# per bench sample, counted by valgrind's callgrind (which counts instructions, not time, so
# the count repeats exactly for the same binary and arguments when one script runs at a time;
# two at once moved it by up to 2%).
#
#   scripts/lavapipe-instructions.sh BINARY OP [bench arguments...]
#   e.g. scripts/lavapipe-instructions.sh target/release/normdrop layer_norm_forward --ln 1024x768
#
# Runs `BINARY bench --ops OP` twice under callgrind, with 2 and 12 samples, and prints the
# difference of the instructions counted in JIT code (callgrind's object "???") divided by 10:
# what one bench sample runs, i.e. OP's untimed and timed calls, the copy's paired with them,
# and for a fused op the parts of its unfused sequence (the copy is the same for any build, so
# the difference between two builds is the difference of the ops). Each run takes a minute or two,
# most of it LLVM compiling every pipeline under valgrind. It counts instructions, so it misses
# what is not one: latency chains (a Philox call's dependent multiplies), cache misses, and the
# per-dispatch thread wake-ups. Needs valgrind (apt-get install valgrind).
set -euo pipefail
bin=$1 op=$2
shift 2
out=$(mktemp -d)
jit_ir() {
    local n=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$n" "$bin" bench --ops "$op" --samples "$n" "$@" \
        >"$out/log.$n" 2>&1 || { cat "$out/log.$n" >&2; exit 1; }
    callgrind_annotate "$out/cg.$n" 2>/dev/null | awk '/\[\?\?\?\]$/ { gsub(",", "", $1); s += $1 } END { printf "%.0f\n", s }'
}
# The two runs in parallel: valgrind runs a program on one core.
jit_ir 2 "$@" >"$out/a" &
jit_ir 12 "$@" >"$out/b"
wait
a=$(cat "$out/a") b=$(cat "$out/b")
echo "$bin $op $* : $(( (b - a) / 10 )) JIT instructions per sample"
rm -rf "$out"
