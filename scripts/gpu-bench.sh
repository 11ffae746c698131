#!/usr/bin/env bash
# normdrop against PyTorch CUDA on a lent NVIDIA machine (the `device` tool's `run`).
#
# 1. `normdrop bench --full` on Vulkan (NVIDIA's driver), results to $OUT/normdrop.json;
# 2. the same ops and shapes in PyTorch CUDA (scripts/torch_bench.py), timed with CUDA events
#    (median after warm-up), and one table: ours, PyTorch, and the ratio.
#
# Prepare once on the development machine (x86-64, like the device machine):
#   cargo build --release -p normdrop-cli
#   echo /.gl/ >> .git/info/exclude; mkdir -p .gl /tmp/amd64/partial
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1)
# Then call the device tool with carry = [".gl", "target/release/normdrop"] and the command
#   bash scripts/gpu-bench.sh
# BENCHMARKS.md records every run with its date, device, driver and exact command.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
out="${OUT:-/tmp/normdrop-gpu-bench}"
mkdir -p "$out"
bin="${NORMDROP_BIN:-target/release/normdrop}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$bin" info | tee "$out/info.txt"
"$bin" bench --full ${BENCH_ARGS:-} --json "$out/normdrop.json" | tee "$out/normdrop.txt"
python3 scripts/torch_bench.py --ours "$out/normdrop.json" --json "$out/torch.json" | tee "$out/compare.txt"
