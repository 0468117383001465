#!/usr/bin/env bash
# Run every nbdcrypt test: unit and property tests, the raw-protocol conformance suite,
# real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio), cryptsetup, and the
# QEMU guest tests (kernel nbd-client, QEMU's NBD driver, dm-crypt).
#
# Usage: scripts/test.sh [cargo test arguments before "--", such as a test name]
#
# As root, missing Debian packages are installed first (scripts/install-deps.sh). As
# another user, a missing tool makes the tests that need it fail with its name.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -eq 0 ]]; then
  scripts/install-deps.sh
else
  echo "test.sh: not root, so packages are not installed; tests needing a missing tool will fail" >&2
fi

if ! command -v cargo >/dev/null; then
  echo "test.sh: cargo not found; install Rust with rustup (see README.md)" >&2
  exit 1
fi

cargo build --locked --all-targets

# Tests that need root (loop devices) are #[ignore]d by default and run here as root.
libtest_args=()
if [[ $(id -u) -eq 0 ]]; then
  libtest_args=(--include-ignored)
fi
cargo test --locked --lib --bins --tests "$@" -- "${libtest_args[@]}"

# Benchmarks run once each as a smoke test; their numbers come from scripts/bench.sh.
cargo test --locked --benches "$@"
