#!/usr/bin/env bash
# SyncBatchNorm across processes, over MPI: builds normdrop with `--features mpi` and runs
# tests/mpi.rs under `mpirun` with 2 and 3 ranks on the default adapter (lavapipe without a
# GPU), every BatchNorm training fixture split unevenly across the ranks (an empty rank among
# the splits), then the sync_batch_norm example over 3 ranks. Ends with `N passed, M failed`
# over all of it. `.ci/run` calls it.
#
# 1. As root on Debian, installs what is missing: Open MPI (libopenmpi-dev, openmpi-bin) and
#    libclang-dev (the `mpi` crate's bindings are generated with bindgen).
# 2. Open MPI refuses to start as root unless told to: the script sets
#    OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) when it runs as root, and --oversubscribe lets 3 ranks
#    share a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libopenmpi-dev openmpi-bin libclang-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "test-distributed.sh: installing ${missing[*]}"
        # One `apt-get update`, only when no package lists are there yet (test.sh may have
        # fetched them for Mesa).
        if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
            apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test-distributed.sh: missing ${missing[*]} and no root apt-get to install them" >&2
        exit 1
    fi
fi
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

echo "test-distributed.sh: building with --features mpi"
cargo build --quiet --features mpi --tests --example sync_batch_norm
bin=$(cargo test --quiet --features mpi --test mpi --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\/mpi-[^"]*\)".*/\1/p' | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "test-distributed.sh: could not find the tests/mpi.rs binary" >&2
    exit 1
fi
# The MPI code is linted here: .ci/run's clippy builds without the feature.
cargo clippy --quiet --features mpi --all-targets -- -D warnings

passed=0
failed=0
for ranks in 2 3; do
    echo "test-distributed.sh: mpirun -n $ranks $bin"
    log=$(mktemp)
    status=0
    timeout 600 mpirun --oversubscribe -n "$ranks" "$bin" 2>&1 | tee "$log" | grep -v '^error: XDG_RUNTIME_DIR' || status=$?
    line=$(grep -E '^SyncBatchNorm over MPI, [0-9]+ ranks: [0-9]+ passed, [0-9]+ failed' "$log" | tail -1 || true)
    if [ -z "$line" ]; then
        echo "test-distributed.sh: the $ranks-rank run printed no summary (exit $status)" >&2
        failed=$((failed + 1))
        continue
    fi
    p=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed/\1/')
    f=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed/\2/')
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$status" != 0 ] && [ "$f" = 0 ]; then
        echo "test-distributed.sh: the $ranks-rank run exited with $status" >&2
        failed=$((failed + 1))
    fi
done
# The README's example: one data-parallel training step over 3 ranks.
echo "test-distributed.sh: mpirun -n 3 target/debug/examples/sync_batch_norm"
if timeout 300 mpirun --oversubscribe -n 3 target/debug/examples/sync_batch_norm 2>&1 | grep -v '^error: XDG_RUNTIME_DIR'; then
    passed=$((passed + 1))
else
    echo "test-distributed.sh: the sync_batch_norm example failed" >&2
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
