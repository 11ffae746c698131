#!/usr/bin/env bash
# normdrop in the browser: builds tests/web.rs and the demo's web/tests/demo.rs for
# wasm32-unknown-unknown and runs them with
# wasm-bindgen-test-runner in headless Chromium, on its WebGPU adapter (SwiftShader on a machine
# without a GPU: subgroups of 4, no shader-f16). Chromium's flags are in webdriver.json.
# Ends with `N passed, M failed`. `.ci/run` calls it.
#
# Installs what is missing (as root on Debian): chromium and chromium-driver, the wasm32 target
# (rustup), and wasm-bindgen-cli at exactly the version of `wasm-bindgen` in Cargo.lock (the
# runner and the library must agree).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for p in chromium chromium-driver; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "test-web.sh: installing ${missing[*]}"
        if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
            apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test-web.sh: missing ${missing[*]} and no root apt-get to install them" >&2
        exit 1
    fi
fi
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || rustup target add wasm32-unknown-unknown
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if [ -z "$version" ]; then
    echo "test-web.sh: no wasm-bindgen in Cargo.lock" >&2
    exit 1
fi
if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q " $version\$" && ! wasm-bindgen --version 2>/dev/null | grep -q " $version\$"; then
    echo "test-web.sh: installing wasm-bindgen-cli $version"
    cargo install --quiet wasm-bindgen-cli --version "$version"
fi

passed=0
failed=0
# The library's browser tests, then the demo page's work (web/tests/demo.rs).
for target in "-p normdrop --test web" "-p normdrop-web --test demo"; do
    echo "test-web.sh: cargo test --target wasm32-unknown-unknown $target (headless Chromium, WebGPU)"
    log=$(mktemp)
    status=0
    # shellcheck disable=SC2086
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
        CHROMEDRIVER="$(command -v chromedriver)" \
        WASM_BINDGEN_TEST_TIMEOUT=300 \
        timeout 900 cargo test --target wasm32-unknown-unknown $target 2>&1 | tee "$log" || status=$?
    line=$(grep -E '^test result: .* [0-9]+ passed; [0-9]+ failed' "$log" | tail -1 || true)
    if [ -z "$line" ]; then
        echo "test-web.sh: no test summary from $target (exit $status)" >&2
        failed=$((failed + 1))
        continue
    fi
    p=$(echo "$line" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\2/')
    if [ "$status" != 0 ] && [ "$f" = 0 ]; then
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
