#!/usr/bin/env bash
# normdrop's test command (the README's, and what .ci/run calls).
#
# 1. If no Vulkan or no GL adapter is found and this is a Debian machine where we are root,
#    install Mesa's lavapipe (Vulkan on the CPU) and llvmpipe (GL on the CPU).
# 2. Run the whole test suite on the default adapter (Vulkan/lavapipe on a machine without a GPU).
# 3. Run it again on the GL backend (WGPU_BACKEND=gl): required in CI, skipped with a message
#    on a machine without GL (e.g. macOS).
#
# GPU tests fail, not skip, without an adapter; NORMDROP_ALLOW_NO_GPU=1 opts out explicitly.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -- batch_norm`).
set -euo pipefail
cd "$(dirname "$0")/.."

mesa_packages=(mesa-vulkan-drivers libvulkan1 libegl1 libgl1-mesa-dri)

# Property tests draw their cases from this seed, so a CI run is reproducible. Plain
# `cargo test` (no script) explores fresh random seeds; a failure prints its minimal case.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261126}"

cargo build --quiet -p normdrop-cli
normdrop=target/debug/normdrop
has_backend() { WGPU_BACKEND="$1" "$normdrop" info >/dev/null 2>&1; }

# Check Vulkan and GL separately: Debian images often carry Mesa's GL (EGL) without any Vulkan
# driver, and then "some adapter exists" would hide a missing lavapipe.
if ! has_backend vulkan || ! has_backend gl; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "test.sh: Vulkan or GL adapter missing; installing Mesa lavapipe/llvmpipe: ${mesa_packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${mesa_packages[@]}" >/dev/null
    else
        echo "test.sh: no Vulkan or no GL adapter, and no root apt-get to install Mesa's (${mesa_packages[*]})"
    fi
fi
if ! "$normdrop" info >/dev/null 2>&1 && [ "${NORMDROP_ALLOW_NO_GPU:-}" != 1 ]; then
    echo "test.sh: no GPU adapter at all; install ${mesa_packages[*]} or set NORMDROP_ALLOW_NO_GPU=1 to skip the GPU tests" >&2
    exit 1
fi
"$normdrop" info 2>/dev/null | head -3 || true

echo "test.sh: full suite on the default adapter"
cargo test --workspace "$@"

# scripts/gpu-check.sh in its local mode (selftest, fixtures, both bench dtypes on this
# adapter; no NVIDIA or PyTorch steps), so that the GPU machine's script cannot rot. Skipped
# when test arguments narrow the run.
if [ "$#" = 0 ]; then
    echo "test.sh: scripts/gpu-check.sh --local (normdrop selftest, check, bench) on the default adapter"
    NORMDROP_BIN="$normdrop" bash scripts/gpu-check.sh --local "$(mktemp -d)"
fi

if WGPU_BACKEND=gl "$normdrop" info >/dev/null 2>&1; then
    echo "test.sh: GPU tests again on the GL backend"
    # One test thread: wgpu's GL backend serializes all work behind one context lock that
    # panics after 6 s of waiting, and on llvmpipe a large submission from one test can hold it
    # that long while others wait.
    WGPU_BACKEND=gl RUST_TEST_THREADS=1 cargo test --workspace "$@"
    if [ "$#" = 0 ]; then
        echo "test.sh: normdrop selftest on the GL backend"
        # pipefail: a failing selftest fails the script.
        WGPU_BACKEND=gl "$normdrop" selftest 2>/dev/null | grep -E "^adapter|^subgroup|FAILED|skipped|passed,"
    fi
elif [ "${CI:-}" = true ] && [ "${NORMDROP_ALLOW_NO_GPU:-}" != 1 ]; then
    echo "test.sh: no GL adapter (WGPU_BACKEND=gl) in CI; install libegl1 libgl1-mesa-dri" >&2
    exit 1
else
    echo "test.sh: no GL adapter on this machine; GL pass not run (it is required in CI)"
fi
