#!/usr/bin/env bash
# normdrop on a GPU machine with no Rust toolchain, in one run of at most 8 minutes:
#
#   1. nvidia-smi and `normdrop info`;
#   2. `normdrop selftest --thorough` (every op and path against the f64 reference);
#   3. `normdrop check` on every PyTorch fixture;
#   4. `normdrop bench --full` with f32 and f16 activations (JSON reports);
#   5. the same ops and shapes in PyTorch CUDA (scripts/torch_bench.py);
#   6. one summary table per dtype: each op's GB/s, % of copy, PyTorch's GB/s and the ratio.
#
# Everything goes to the output folder: the first argument, else $OUT, else
# /tmp/normdrop-gpu-check. The exit status is nonzero when the selftest or the fixture check
# failed (the later steps still run, so that one call brings back everything).
#
# Usage:  bash scripts/gpu-check.sh [--local] [OUTDIR]
#
# --local (or GPU_CHECK_LOCAL=1): the same steps without the NVIDIA- and PyTorch-specific ones
# and with the quick presets (`selftest`, `bench --quick`), on whatever adapter this machine has.
# CI runs it this way (scripts/test.sh), so the script cannot rot.
#
# Preparing a GPU run (on an x86-64 development machine; the GPU machine has no Rust, no
# internet, and receives a copy of this tree of at most 64 MiB):
#   cargo build --release -p normdrop-cli                   # the binary: target/release/normdrop
#   mkdir -p .gl /tmp/amd64/partial && echo /.gl/ >> .git/info/exclude
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update && (cd .gl && apt-get $o download libvulkan1)   # the Vulkan loader .deb
# then run this script there with `.gl` and `target/release/normdrop` carried along (the
# device tool: carry = [".gl", "target/release/normdrop"], command `bash scripts/gpu-check.sh`).
# It unpacks the loader with `dpkg -x` and points Vulkan at NVIDIA's ICD. Record the results
# under "GPU runs" in BENCHMARKS.md with the date, GPU, driver and this command.
set -uo pipefail
cd "$(dirname "$0")/.."

local_mode="${GPU_CHECK_LOCAL:-0}"
if [ "${1:-}" = "--local" ]; then
    local_mode=1
    shift
fi
out="${1:-${OUT:-/tmp/normdrop-gpu-check}}"
mkdir -p "$out"
bin="${NORMDROP_BIN:-target/release/normdrop}"
if [ ! -x "$bin" ]; then
    echo "gpu-check: no normdrop binary at $bin; build it with: cargo build --release -p normdrop-cli" >&2
    echo "  (or set NORMDROP_BIN); see the header of $0 for preparing a GPU run" >&2
    exit 2
fi
status=0
step() { echo; echo "== $*"; }

if [ "$local_mode" != 1 ]; then
    if [ -d .gl ]; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
        /etc/vulkan/icd.d/nvidia_icd.json; do
        if [ -f "$icd" ]; then
            export VK_DRIVER_FILES="$icd"
            break
        fi
    done
    step "nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/nvidia-smi.txt"
fi

step "normdrop info"
"$bin" info 2>/dev/null | tee "$out/info.txt" || {
    echo "gpu-check: normdrop found no adapter" >&2
    exit 2
}

if [ "$local_mode" = 1 ]; then
    selftest_args=(selftest --quick)
    bench_preset=--quick
else
    selftest_args=(selftest --thorough)
    bench_preset=--full
fi

step "normdrop ${selftest_args[*]}"
"$bin" "${selftest_args[@]}" 2>/dev/null >"$out/selftest.txt"
rc=$?
grep -E "FAILED|skipped" "$out/selftest.txt" | head -40
tail -1 "$out/selftest.txt"
[ "$rc" = 0 ] || status=1

step "normdrop check (every fixture)"
"$bin" check tests/fixtures/torch/*.safetensors 2>/dev/null >"$out/check.txt"
rc=$?
grep -E "FAILED" "$out/check.txt" | head -20
tail -1 "$out/check.txt"
[ "$rc" = 0 ] || status=1

for dtype in f32 f16; do
    step "normdrop bench $bench_preset --dtype $dtype"
    "$bin" bench "$bench_preset" --dtype "$dtype" --json "$out/bench-$dtype.json" 2>/dev/null \
        >"$out/bench-$dtype.txt"
    rc=$?
    cat "$out/bench-$dtype.txt"
    [ "$rc" = 0 ] || status=1
done

if [ "$local_mode" != 1 ]; then
    for dtype in f32 f16; do
        step "PyTorch CUDA, $dtype: summary"
        python3 scripts/torch_bench.py --ours "$out/bench-$dtype.json" --dtype "$dtype" \
            --json "$out/torch-$dtype.json" | tee "$out/summary-$dtype.txt"
    done
else
    step "summary (local mode: no PyTorch CUDA comparison; the bench tables above hold GB/s and % of copy)"
fi

echo
echo "gpu-check: results in $out; $( [ "$status" = 0 ] && echo "selftest and fixtures passed" || echo "FAILURES above")"
exit "$status"
