#!/usr/bin/env bash
# Run one nbdcrypt fuzz target with cargo fuzz for a fixed number of executions.
#
# Usage: fuzz/run.sh TARGET [RUNS] [extra libFuzzer flags]
#   TARGET is handshake, transmission or luks2_header; RUNS defaults to 10000000.
#
# New inputs go to fuzz/work/TARGET (git-ignored); the committed seeds in
# fuzz/corpus/TARGET are read only. Crashes land in fuzz/artifacts/TARGET.
# cargo fuzz needs nightly flags, so on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks them.
# The sanitizer is off: the targets run safe Rust over nbdcrypt's entry points, and
# without AddressSanitizer they run several times faster. Debug assertions (and with
# them integer overflow checks) stay on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

target=${1:?usage: fuzz/run.sh TARGET [RUNS] [libFuzzer flags]}
runs=${2:-10000000}
shift $(( $# >= 2 ? 2 : 1 ))

# The transmission target builds without compare tracing into a target directory of its
# own: tracing every byte comparison of the engine's zero scans cost about half its speed,
# and the seeds already carry the request magic and commands that tracing would find.
build_flags=()
case $target in
  handshake) max_len=16384 ;;
  transmission) max_len=8192; build_flags=(--no-trace-compares --target-dir target/no-trace-compares) ;;
  luks2_header) max_len=40000 ;;
  *) echo "run.sh: unknown target $target (handshake, transmission, luks2_header)" >&2; exit 2 ;;
esac

mkdir -p "work/$target"
export RUSTC_BOOTSTRAP=1
exec nice -n 10 cargo fuzz run --sanitizer none --debug-assertions "${build_flags[@]}" "$target" "work/$target" "corpus/$target" -- \
  -runs="$runs" -max_len="$max_len" -timeout=30 -print_final_stats=1 "$@"
