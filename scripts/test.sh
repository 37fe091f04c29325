#!/usr/bin/env bash
# The project's test command (README "Tests"): installs what the tests need on a fresh
# machine, then runs the format check, clippy with -D warnings, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (stable) first, e.g. with rustup" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
            log "installing rustup component ${component}"
            rustup component add "${component}"
        fi
    done
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi
# System tools the tests call: kill and sysctl (procps) for agents and the testbed; ip and tc
# (iproute2) and ping (iputils-ping) for the WAN testbed tests, which run when root;
# iperf3 for `dwcp bench transport`.
need_apt=()
command -v kill >/dev/null 2>&1 || need_apt+=(procps)
command -v sysctl >/dev/null 2>&1 || need_apt+=(procps)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v tc >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
# QEMU (TCG) for the QEMU migration backend's tests and `dwcp bench migration`.
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need_apt[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    elif [ "$(id -u)" != 0 ]; then
        echo "note: not root: the WAN testbed tests will be skipped" >&2
    else
        echo "missing system packages: ${need_apt[*]} (install them, or run as root on Debian)" >&2
        exit 1
    fi
fi

# The QEMU tests' guest: a Debian kernel and a busybox initramfs (downloaded, not installed).
if command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    log "guest image for the QEMU tests (scripts/guest-image.sh)"
    if ! scripts/guest-image.sh target/guest; then
        [ "$(id -u)" = 0 ] && apt-get update -qq && scripts/guest-image.sh target/guest \
            || echo "note: no guest image: the QEMU tests will be skipped" >&2
    fi
fi

# --- checks --------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Doc tests first: nextest's summary line should be the last thing this script prints.
log "doc tests"
cargo test --workspace --doc --locked

log "tests (cargo nextest)"
profile=default
[ -n "${CI:-}" ] && profile=ci
cargo nextest run --workspace --all-targets --locked --profile "$profile"
