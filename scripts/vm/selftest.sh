#!/usr/bin/env bash
# Prove the guest harness end to end with qemu-nbd standing in for nbdcrypt.
# Every run-guest.sh mode is checked, including runs that must FAIL, so the
# harness is shown to catch wrong data.
#
# Usage: scripts/vm/selftest.sh [nbd|dm-crypt|all]   (default all)
#
#   nbd       a 256 MiB raw image served by qemu-nbd under an export name
#             with a space in it:
#               1. kernel-nbd-client, block size 512: mkfs, write, verify
#               2. debugfs reads the file out of the image on the host, and
#                  its sha256 must equal the guest's
#               3. kernel-nbd-client, block size 4096, 2 connections, --keep
#               4. qemu-nbd restarts, qemu-drive --verify-only must find the
#                  file of step 3
#               5. qemu-drive, block size 4096: mkfs, write, verify
#               6. must FAIL: qemu-drive --verify-only expecting step 3's hash
#               7. must FAIL: kernel-nbd-client with an unknown export name
#   dm-crypt  a LUKS2 image (cryptsetup luksFormat, 4096-byte sectors, pbkdf2
#             at 1000 iterations), whose 16 MiB data segment the host fills
#             with random plaintext encrypted by luks2-encrypt.py:
#               1. the image file, whole volume hashed
#               2. a read-only qemu-nbd export of it, first 4 MiB hashed
#               3. after luksKillSlot removed the only keyslot, first 1 MiB
#               4. must FAIL: a wrong volume key
#               5. must FAIL: plaintext encrypted with tweak n instead of 8*n
#
# Environment:
#   NBDCRYPT_SELFTEST_DIR  work directory, kept afterwards (default: a new
#                          temporary directory, deleted after a PASS)
#   NBDCRYPT_VM_*          passed on to run-guest.sh (see its --help)
#
# Exit status: 0 when every step behaved as expected, 1 otherwise.
set -euo pipefail

readonly SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly RUN_GUEST=$SCRIPT_DIR/run-guest.sh
readonly PYTHON=/usr/bin/python3
readonly EXPORT_NAME="nbdcrypt selftest"
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

WORK_DIR=""
QEMU_NBD_PID_FILE=""
TIMINGS=()

# Print the header comment of this script, which documents its usage.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

fail() {
  echo "selftest: FAIL: $*" >&2
  if [[ -n $WORK_DIR ]]; then
    echo "selftest: work directory kept: $WORK_DIR" >&2
  fi
  exit 1
}

check_host_tools() {
  local tool
  for tool in qemu-nbd qemu-system-x86_64 cryptsetup debugfs sha256sum truncate; do
    command -v "$tool" >/dev/null || fail "$tool not found; run scripts/install-deps.sh as root"
  done
  "$PYTHON" -c 'import cryptography' 2>/dev/null ||
    fail "$PYTHON cannot import cryptography; run scripts/install-deps.sh as root"
}

# Serve IMAGE on SOCKET with qemu-nbd. --persistent keeps serving after a
# client disconnects, and --shared=8 accepts up to 8 connections at once.
# With --fork, qemu-nbd returns once the socket is listening.
start_qemu_nbd() {
  local socket=$1 image=$2
  shift 2
  QEMU_NBD_PID_FILE=$WORK_DIR/qemu-nbd.pid
  rm -f "$socket" "$QEMU_NBD_PID_FILE"
  qemu-nbd --socket="$socket" --format=raw --persistent --shared=8 \
    --pid-file="$QEMU_NBD_PID_FILE" --fork "$@" "$image" ||
    fail "qemu-nbd could not serve $image on $socket"
}

stop_qemu_nbd() {
  if [[ -n $QEMU_NBD_PID_FILE && -f $QEMU_NBD_PID_FILE ]]; then
    local pid
    pid=$(cat "$QEMU_NBD_PID_FILE")
    kill "$pid" 2>/dev/null || true
    # Wait for it to exit so the image is closed before the next step.
    while kill -0 "$pid" 2>/dev/null; do
      sleep 0.05
    done
    rm -f "$QEMU_NBD_PID_FILE"
  fi
  QEMU_NBD_PID_FILE=""
}

cleanup() {
  stop_qemu_nbd
}

# Run run-guest.sh and check its exit status. Set GUEST_SHA256 to the hash
# from its "VMTEST: SHA256" line, if any.
#   guest STEP EXPECTED_STATUS [run-guest.sh arguments...]
guest() {
  local step=$1 expected=$2
  shift 2
  local output=$WORK_DIR/$step.out status=0 start
  echo "selftest: --- $step: run-guest.sh $*"
  start=$(date +%s.%N)
  "$RUN_GUEST" "$@" --log "$WORK_DIR/$step.log" > "$output" 2> "$WORK_DIR/$step.err" || status=$?
  sed 's/^/  /' "$output"
  local seconds
  seconds=$(awk -v start="$start" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }')
  if [[ $status != "$expected" ]]; then
    sed 's/^/  /' "$WORK_DIR/$step.err" >&2
    fail "$step: run-guest.sh exited with $status, expected $expected"
  fi
  GUEST_SHA256=$(sed -n 's/^VMTEST: SHA256 \([0-9a-f]\{64\}\)$/\1/p' "$output" | tail -1)
  TIMINGS+=("$step: ${seconds}s, $(grep -o 'boot=[^ ]* total=[^ ]*' "$output")")
  echo "selftest: $step: exit status $status as expected (${seconds}s)"
}

test_nbd() {
  local image=$WORK_DIR/disk.raw socket=$WORK_DIR/nbd.sock
  rm -f "$image"
  truncate -s 256M "$image"
  start_qemu_nbd "$socket" "$image" --export-name="$EXPORT_NAME"

  guest nbd-1-kernel-512 0 kernel-nbd-client --export "$EXPORT_NAME" "$socket"
  local first_sha256=$GUEST_SHA256
  [[ -n $first_sha256 ]] || fail "nbd-1-kernel-512 printed no VMTEST: SHA256 line"

  # debugfs reads the ext4 image in user space, so this needs no kernel
  # support on the host. The image is read while qemu-nbd idles.
  local host_sha256
  host_sha256=$(debugfs -R 'cat /testfile' "$image" 2>/dev/null | sha256sum | cut -d' ' -f1)
  [[ $host_sha256 == "$first_sha256" ]] ||
    fail "nbd-2-debugfs: /testfile in $image has sha256 $host_sha256 on the host, the guest wrote $first_sha256"
  echo "selftest: nbd-2-debugfs: the host reads the guest's file from the image (sha256 $host_sha256)"

  guest nbd-3-kernel-4096-keep 0 kernel-nbd-client --export "$EXPORT_NAME" \
    --block-size 4096 --connections 2 --keep --expect-sha256 "$first_sha256" "$socket"
  local kept_sha256=$GUEST_SHA256

  stop_qemu_nbd
  start_qemu_nbd "$socket" "$image" --export-name="$EXPORT_NAME"
  guest nbd-4-drive-verify 0 qemu-drive --export "$EXPORT_NAME" --verify-only \
    --expect-sha256 "$kept_sha256" "$socket"

  guest nbd-5-drive-4096 0 qemu-drive --export "$EXPORT_NAME" --block-size 4096 "$socket"

  guest nbd-6-drive-stale-hash 1 qemu-drive --export "$EXPORT_NAME" --verify-only \
    --expect-sha256 "$kept_sha256" "$socket"
  grep -q 'RESULT FAIL earlier file has sha256' "$WORK_DIR/nbd-6-drive-stale-hash.out" ||
    fail "nbd-6-drive-stale-hash failed for another reason than the hash; see $WORK_DIR/nbd-6-drive-stale-hash.log"

  guest nbd-7-kernel-unknown-export 1 kernel-nbd-client --export "no such export" "$socket"
  grep -q 'RESULT FAIL nbd-client could not attach' "$WORK_DIR/nbd-7-kernel-unknown-export.out" ||
    fail "nbd-7-kernel-unknown-export failed for another reason; see $WORK_DIR/nbd-7-kernel-unknown-export.log"

  stop_qemu_nbd
}

# Create a LUKS2 image with a 16 MiB data segment and write its raw volume
# key to KEY_FILE.
make_luks2_image() {
  local image=$1 key_file=$2 passphrase_file=$WORK_DIR/passphrase
  rm -f "$image" "$key_file"
  head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' > "$passphrase_file"
  truncate -s 32M "$image"
  # Force 1000 pbkdf2 iterations because `cryptsetup open --volume-key-file`
  # checks the volume key against the pbkdf2 digest. With the benchmarked
  # count (105703 on a 2-core Xeon host) that took 3.2 s in the TCG guest,
  # against 0.26 s at 1000.
  cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 \
    --key-size 512 --sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$passphrase_file" "$image" || fail "cryptsetup luksFormat $image failed"
  cryptsetup luksDump --batch-mode --dump-volume-key --volume-key-file "$key_file" \
    --key-file "$passphrase_file" "$image" > /dev/null ||
    fail "cryptsetup luksDump --dump-volume-key $image failed"
  [[ $(stat -c %s "$key_file") == 64 ]] || fail "the volume key in $key_file is not 64 bytes"
}

test_dm_crypt() {
  local image=$WORK_DIR/luks2.img key_file=$WORK_DIR/volume.key
  local plaintext=$WORK_DIR/plaintext.bin socket=$WORK_DIR/luks2.sock
  make_luks2_image "$image" "$key_file"

  local data_offset
  data_offset=$(cryptsetup luksDump --dump-json-metadata "$image" |
    "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["segments"]["0"]["offset"])')
  head -c $(($(stat -c %s "$image") - data_offset)) /dev/urandom > "$plaintext"
  "$PYTHON" "$SCRIPT_DIR/luks2-encrypt.py" "$image" "$key_file" "$plaintext" ||
    fail "luks2-encrypt.py failed"
  local whole_sha256 first_4_sha256 first_1_sha256
  whole_sha256=$(sha256sum < "$plaintext" | cut -d' ' -f1)
  first_4_sha256=$(head -c 4M "$plaintext" | sha256sum | cut -d' ' -f1)
  first_1_sha256=$(head -c 1M "$plaintext" | sha256sum | cut -d' ' -f1)

  guest dm-crypt-1-file-whole 0 dm-crypt --key-file "$key_file" \
    --expect-sha256 "$whole_sha256" "$image"

  start_qemu_nbd "$socket" "$image" --read-only
  guest dm-crypt-2-nbd-4mib 0 dm-crypt --key-file "$key_file" --size-mib 4 \
    --expect-sha256 "$first_4_sha256" "$socket"
  stop_qemu_nbd

  # In batch mode luksKillSlot still reads stdin for a passphrase, prints
  # "Nothing to read on input." and removes the last keyslot anyway.
  cryptsetup luksKillSlot --batch-mode "$image" 0 < /dev/null > /dev/null 2>&1 ||
    fail "cryptsetup luksKillSlot $image 0 failed"
  local keyslots
  keyslots=$(cryptsetup luksDump --dump-json-metadata "$image" |
    "$PYTHON" -c 'import json, sys; print(len(json.load(sys.stdin)["keyslots"]))')
  [[ $keyslots == 0 ]] || fail "$image still has $keyslots keyslots after luksKillSlot"
  guest dm-crypt-3-no-keyslot 0 dm-crypt --key-file "$key_file" --size-mib 1 \
    --expect-sha256 "$first_1_sha256" "$image"

  # Add 1 (modulo 256) to the first key byte.
  local wrong_key=$WORK_DIR/wrong.key
  { head -c 1 "$key_file" | LC_ALL=C tr '\000-\377' '\001-\377\000'; tail -c +2 "$key_file"; } > "$wrong_key"
  guest dm-crypt-4-wrong-key 1 dm-crypt --key-file "$wrong_key" --size-mib 1 "$image"
  grep -q 'RESULT FAIL cryptsetup open failed' "$WORK_DIR/dm-crypt-4-wrong-key.out" ||
    fail "dm-crypt-4-wrong-key failed for another reason; see $WORK_DIR/dm-crypt-4-wrong-key.log"

  # Sector 0 has tweak 0 under both conventions, so hash 1 MiB (256 sectors).
  "$PYTHON" "$SCRIPT_DIR/luks2-encrypt.py" --tweak-unit 4096 "$image" "$key_file" "$plaintext" > /dev/null ||
    fail "luks2-encrypt.py --tweak-unit 4096 failed"
  guest dm-crypt-5-tweak-n 1 dm-crypt --key-file "$key_file" --size-mib 1 \
    --expect-sha256 "$first_1_sha256" "$image"
  grep -q 'RESULT FAIL plaintext sha256' "$WORK_DIR/dm-crypt-5-tweak-n.out" ||
    fail "dm-crypt-5-tweak-n failed for another reason; see $WORK_DIR/dm-crypt-5-tweak-n.log"
}

main() {
  local part=${1:-all}
  case $part in
    -h | --help) usage; exit 0 ;;
    nbd | dm-crypt | all) ;;
    *) echo "selftest: ERROR: invalid part '$part'; expected nbd, dm-crypt or all" >&2; exit 1 ;;
  esac

  local keep_work_dir=0
  if [[ -n ${NBDCRYPT_SELFTEST_DIR:-} ]]; then
    WORK_DIR=$NBDCRYPT_SELFTEST_DIR
    mkdir -p "$WORK_DIR"
    WORK_DIR=$(cd "$WORK_DIR" && pwd)
    keep_work_dir=1
  else
    WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nbdcrypt-selftest.XXXXXX")
  fi
  trap cleanup EXIT
  check_host_tools

  # Build or refresh the guest image first, so its time is not counted in
  # the first step.
  "$SCRIPT_DIR/build-initramfs.sh" -q || fail "build-initramfs.sh failed"

  local start=$SECONDS
  if [[ $part == nbd || $part == all ]]; then
    test_nbd
  fi
  if [[ $part == dm-crypt || $part == all ]]; then
    test_dm_crypt
  fi

  echo "selftest: timings (step: whole step, then run-guest.sh's host-side boot and QEMU run):"
  printf '  %s\n' "${TIMINGS[@]}"
  echo "selftest: PASS ($part) in $((SECONDS - start))s"
  if [[ $keep_work_dir == 0 ]]; then
    rm -rf "$WORK_DIR"
  fi
}

main "$@"
