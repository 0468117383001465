#!/usr/bin/env bash
# Boot a throwaway QEMU guest that tests an NBD export served on a host unix
# socket, or a LUKS2 volume, with the guest's Linux kernel. Nothing leaves the
# host: the guest's only link is QEMU's user-mode network with restrict=on,
# whose single forwarded port leads to the unix socket.
#
# Usage: scripts/vm/run-guest.sh MODE [OPTIONS] TARGET
#
# Modes:
#   kernel-nbd-client  TARGET is the NBD server's unix socket. The guest
#                      kernel's NBD driver attaches it with nbd-client, then
#                      the filesystem test runs on /dev/nbd0 (see below).
#   qemu-drive         TARGET is the NBD server's unix socket. QEMU's own NBD
#                      client attaches it as a virtio disk, then the
#                      filesystem test runs on that disk.
#   dm-crypt           TARGET is the unix socket of an NBD server that
#                      exports a LUKS2 volume, or a raw LUKS2 image file. The
#                      guest opens it read-only with `cryptsetup open --type
#                      luks2 --volume-key-file` (kernel dm-crypt) from the raw
#                      volume key alone and prints the sha256 of the plaintext.
#
# Filesystem test: mkfs.ext4, mount, write a file of random data, sync,
# umount, drop caches, e2fsck -f -n, mount read-only, compare the sha256 of
# the file with what was written, and in kernel-nbd-client mode nbd-client -d.
#
# Options:
#   --export NAME        NBD export name (default: empty, the server's
#                        default export)
#   --block-size BYTES   logical block size of the guest's disk: 512, 1024,
#                        2048 or 4096 (default 512). kernel-nbd-client passes
#                        it to nbd-client -b. qemu-drive sets it on the virtio
#                        disk.
#   --connections N      kernel-nbd-client: number of NBD connections
#                        (nbd-client -C N, default 1)
#   --size-mib N         filesystem modes: size of the test file in MiB
#                        (default 8). dm-crypt: MiB of plaintext to hash from
#                        the start of the volume, 0 for all (default 0).
#   --keep               filesystem modes: skip mkfs, verify the file that an
#                        earlier run left, then write and check a new one
#   --verify-only        filesystem modes: only verify the file that an
#                        earlier run left. The disk is attached read-only, so
#                        the guest writes nothing.
#   --expect-sha256 HEX  dm-crypt: FAIL unless the plaintext has this sha256.
#                        --keep, --verify-only: FAIL unless the earlier file
#                        has this sha256.
#   --key-file PATH      dm-crypt (required): the raw volume key, e.g. 64
#                        bytes for aes-xts-plain64 with a 512-bit key
#   --log PATH           write the guest's serial console to PATH and keep
#                        it. By default it goes to a temporary file that is
#                        deleted after a PASS and kept otherwise.
#   --timeout SECONDS    kill QEMU after this long (default 300 under TCG,
#                        120 under KVM)
#
# Environment:
#   NBDCRYPT_VM_DIR      cache of build-initramfs.sh (default
#                        ${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt-vm). It is
#                        built or refreshed before every run.
#   NBDCRYPT_VM_ACCEL    auto (default), tcg or kvm. auto picks TCG when
#                        /dev/kvm is missing or is provided by the PVM nested
#                        hypervisor (kvm_pvm), where QEMU 7.2 with -cpu host
#                        aborts ("failed to set MSR 0x10a").
#   NBDCRYPT_VM_KERNEL   pvh (default): boot the uncompressed vmlinux through
#                        the PVH entry point. bzimage: boot vmlinuz through
#                        SeaBIOS, about 5 s slower under TCG.
#   NBDCRYPT_VM_MEM      guest memory (default 512M)
#   NBDCRYPT_VM_VERBOSE  1: copy the serial console to stderr while it runs
#
# Output: the guest's "VMTEST: ..." lines on stdout, among them
# "VMTEST: SHA256 <hex>" (the written file, or the dm-crypt plaintext), then a
# summary line "run-guest: PASS|FAIL|NO RESULT ...".
# Exit status: 0 PASS, 1 FAIL, 2 no result (invalid usage, missing tool or
# file, QEMU error, guest crash or timeout).
set -euo pipefail

readonly SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly EXIT_PASS=0 EXIT_FAIL=1 EXIT_NO_RESULT=2
# The address and port that the guest's nbd-client dials. The address exists
# only inside the guest's user-mode network. init.sh uses the same values.
readonly GUEST_NBD_FORWARD=tcp:10.0.2.100:10809
# Lines of the serial console shown when a run does not pass.
readonly LOG_TAIL_LINES=40

# Print the header comment of this script, which documents its usage.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "run-guest: ERROR: $*" >&2
  exit "$EXIT_NO_RESULT"
}

# Print a JSON string literal of the argument. NBD export names are UTF-8
# without control characters, which QEMU would reject anyway.
json_string() {
  local value=$1
  [[ $value != *[[:cntrl:]]* ]] || die "control characters are not supported in '$value'"
  value=${value//\\/\\\\}
  value=${value//\"/\\\"}
  printf '"%s"' "$value"
}

hex_encode() {
  printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'
}

parse_arguments() {
  [[ $# -ge 1 ]] || { usage >&2; exit "$EXIT_NO_RESULT"; }
  case $1 in
    -h | --help) usage; exit 0 ;;
    kernel-nbd-client | qemu-drive | dm-crypt) MODE=$1 ;;
    *) die "invalid MODE '$1'; expected kernel-nbd-client, qemu-drive or dm-crypt (see --help)" ;;
  esac
  shift

  EXPORT_NAME="" BLOCK_SIZE="" CONNECTIONS="" SIZE_MIB="" FS_ACTION=create
  EXPECT_SHA256="" KEY_FILE="" LOG_PATH="" TIMEOUT="" TARGET=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --export) EXPORT_NAME=${2?--export needs a value}; shift 2 ;;
      --block-size) BLOCK_SIZE=${2?--block-size needs a value}; shift 2 ;;
      --connections) CONNECTIONS=${2?--connections needs a value}; shift 2 ;;
      --size-mib) SIZE_MIB=${2?--size-mib needs a value}; shift 2 ;;
      --keep) FS_ACTION=keep; shift ;;
      --verify-only) FS_ACTION=verify; shift ;;
      --expect-sha256) EXPECT_SHA256=${2?--expect-sha256 needs a value}; shift 2 ;;
      --key-file) KEY_FILE=${2?--key-file needs a value}; shift 2 ;;
      --log) LOG_PATH=${2?--log needs a value}; shift 2 ;;
      --timeout) TIMEOUT=${2?--timeout needs a value}; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z $TARGET ]] || die "more than one TARGET: '$TARGET' and '$1'"
        TARGET=$1
        shift
        ;;
    esac
  done
  [[ -n $TARGET ]] || die "missing TARGET (the NBD unix socket, or for dm-crypt an image file)"
}

# Reject options that the mode would ignore, so a test never believes it
# checked something that it did not.
validate_arguments() {
  local filesystem_mode=1
  [[ $MODE != dm-crypt ]] || filesystem_mode=0

  if [[ -n $BLOCK_SIZE ]]; then
    [[ $MODE != dm-crypt ]] || die "--block-size does not apply to dm-crypt mode"
    [[ $BLOCK_SIZE =~ ^(512|1024|2048|4096)$ ]] ||
      die "invalid --block-size $BLOCK_SIZE; expected 512, 1024, 2048 or 4096"
  fi
  BLOCK_SIZE=${BLOCK_SIZE:-512}

  if [[ -n $CONNECTIONS ]]; then
    [[ $MODE == kernel-nbd-client ]] || die "--connections applies only to kernel-nbd-client mode"
    [[ $CONNECTIONS =~ ^[1-9][0-9]?$ ]] || die "invalid --connections $CONNECTIONS; expected 1 to 99"
  fi
  CONNECTIONS=${CONNECTIONS:-1}

  if [[ -n $SIZE_MIB ]]; then
    [[ $SIZE_MIB =~ ^[0-9]+$ ]] || die "invalid --size-mib $SIZE_MIB; expected a number of MiB"
    [[ $filesystem_mode == 0 || $SIZE_MIB -gt 0 ]] || die "--size-mib must be at least 1 in $MODE mode"
  fi
  if [[ $filesystem_mode == 1 ]]; then
    SIZE_MIB=${SIZE_MIB:-8}
  else
    SIZE_MIB=${SIZE_MIB:-0}
  fi

  if [[ $FS_ACTION != create ]]; then
    [[ $filesystem_mode == 1 ]] || die "--keep and --verify-only apply only to the filesystem modes"
  fi
  if [[ -n $EXPECT_SHA256 ]]; then
    [[ $EXPECT_SHA256 =~ ^[0-9a-f]{64}$ ]] ||
      die "invalid --expect-sha256 '$EXPECT_SHA256'; expected 64 lowercase hex digits"
    [[ $filesystem_mode == 0 || $FS_ACTION != create ]] ||
      die "--expect-sha256 needs --keep or --verify-only in $MODE mode, because a new file is random"
  fi

  if [[ $MODE == dm-crypt ]]; then
    [[ -n $KEY_FILE ]] || die "dm-crypt mode needs --key-file (the raw volume key)"
    [[ -f $KEY_FILE && -r $KEY_FILE ]] || die "key file $KEY_FILE not found or not readable"
    KEY_BYTES=$(stat -L -c %s "$KEY_FILE")
    [[ $KEY_BYTES -ge 16 && $KEY_BYTES -le 512 ]] ||
      die "key file $KEY_FILE has $KEY_BYTES bytes; a raw volume key has 16 to 512 (64 for aes-xts-plain64)"
  elif [[ -n $KEY_FILE ]]; then
    die "--key-file applies only to dm-crypt mode"
  fi

  if [[ -S $TARGET ]]; then
    TARGET_KIND=socket
  elif [[ $MODE == dm-crypt && -f $TARGET ]]; then
    TARGET_KIND=image
    [[ -z $EXPORT_NAME ]] || die "--export applies to an NBD socket, but $TARGET is a file"
  elif [[ $MODE == dm-crypt ]]; then
    die "$TARGET is neither a unix socket nor a regular file; is the NBD server running?"
  else
    die "$TARGET is not a unix socket; is the NBD server running?"
  fi

  [[ -z $TIMEOUT || $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "invalid --timeout $TIMEOUT; expected seconds"
}

check_host_tools() {
  local tool
  for tool in qemu-system-x86_64 timeout od socat; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh as root"
  done
}

choose_accelerator() {
  ACCEL=${NBDCRYPT_VM_ACCEL:-auto}
  case $ACCEL in
    auto)
      # Under the PVM nested hypervisor, QEMU 7.2 with -cpu host aborts with
      # "failed to set MSR 0x10a".
      if [[ -d /sys/module/kvm_pvm ]]; then
        ACCEL=tcg
      elif [[ -r /dev/kvm && -w /dev/kvm ]]; then
        # NOTE: the KVM path has not been measured on a host with hardware
        # virtualization. Set NBDCRYPT_VM_ACCEL=tcg if it misbehaves.
        ACCEL=kvm
      else
        ACCEL=tcg
      fi
      ;;
    tcg | kvm) ;;
    *) die "invalid NBDCRYPT_VM_ACCEL=$ACCEL; expected auto, tcg or kvm" ;;
  esac
  if [[ $ACCEL == kvm ]]; then
    ACCEL_ARGS=(-accel kvm -cpu host)
    TIMEOUT=${TIMEOUT:-120}
  else
    # -cpu max includes the aes flag, so dm-crypt gets the AES-NI driver.
    ACCEL_ARGS=(-accel tcg -cpu max)
    TIMEOUT=${TIMEOUT:-300}
  fi
}

# Build or refresh the kernel and initramfs, and set KERNEL_IMAGE and INITRD.
prepare_guest_image() {
  VM_DIR=${NBDCRYPT_VM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt-vm}
  "$SCRIPT_DIR/build-initramfs.sh" -q "$VM_DIR" ||
    die "build-initramfs.sh $VM_DIR failed; see its message above"
  case ${NBDCRYPT_VM_KERNEL:-pvh} in
    pvh) KERNEL_IMAGE=$VM_DIR/vmlinux ;;
    bzimage) KERNEL_IMAGE=$VM_DIR/vmlinuz ;;
    *) die "invalid NBDCRYPT_VM_KERNEL=$NBDCRYPT_VM_KERNEL; expected pvh or bzimage" ;;
  esac
  INITRD=$VM_DIR/initramfs.cpio
}

# Create the run directory. QEMU's option syntax splits on commas, and
# slirp runs the guestfwd command through /bin/sh, so every path handed to
# QEMU is a symlink inside this directory, whose name contains only safe
# characters. The short path also keeps the socket path below the 108-byte
# limit of sockaddr_un.
make_run_dir() {
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nbdcrypt-guest.XXXXXX") ||
    die "mktemp -d in ${TMPDIR:-/tmp} failed"
  [[ $RUN_DIR =~ ^[A-Za-z0-9_./-]+$ ]] ||
    die "temporary directory $RUN_DIR contains characters that QEMU options cannot carry; set TMPDIR=/tmp"
  CONSOLE_LOG=$RUN_DIR/console.log
  QEMU_STDERR=$RUN_DIR/qemu.stderr
  : > "$CONSOLE_LOG"
}

# Print the -blockdev JSON of the NBD export at the run directory's socket.
nbd_blockdev() {
  local node_name=$1 read_only=$2
  local json='{"driver":"nbd","node-name":"'$node_name'","read-only":'$read_only
  json+=',"server":{"type":"unix","path":"'$RUN_DIR/nbd.sock'"}'
  if [[ -n $EXPORT_NAME ]]; then
    json+=',"export":'$(json_string "$EXPORT_NAME")
  fi
  echo "$json}"
}

# Set DEVICE_ARGS and KERNEL_ARGS for the mode.
configure_mode() {
  # cryptomgr.notests skips the self-tests that the kernel runs on its own
  # crypto implementations as they register, about 0.3 s under TCG. They do
  # not change any result, and dm-crypt mode checks the plaintext against a
  # hash from the host anyway.
  KERNEL_ARGS="console=ttyS0 panic=-1 loglevel=4 cryptomgr.notests vmtest.mode=$MODE"
  KERNEL_ARGS+=" vmtest.size_mib=$SIZE_MIB vmtest.block_size=$BLOCK_SIZE"
  KERNEL_ARGS+=" vmtest.fs_action=$FS_ACTION vmtest.export_hex=$(hex_encode "$EXPORT_NAME")"
  if [[ -n $EXPECT_SHA256 ]]; then
    KERNEL_ARGS+=" vmtest.expect=$EXPECT_SHA256"
  fi

  if [[ $TARGET_KIND == socket ]]; then
    ln -s "$(readlink -f "$TARGET")" "$RUN_DIR/nbd.sock"
  fi

  # --verify-only must not write: the disk itself is read-only.
  local read_only=false
  [[ $FS_ACTION != verify ]] || read_only=true

  case $MODE in
    kernel-nbd-client)
      # restrict=on isolates the guest. Only the guestfwd rule works: for
      # each guest connection to GUEST_NBD_FORWARD, slirp starts the command
      # with the connection on its stdin and stdout.
      local socat
      socat=$(command -v socat)
      [[ $socat =~ ^[A-Za-z0-9_./-]+$ ]] || die "socat path $socat contains characters that QEMU options cannot carry"
      DEVICE_ARGS=(
        -netdev "user,id=net0,restrict=on,guestfwd=$GUEST_NBD_FORWARD-cmd:$socat - UNIX-CONNECT:$RUN_DIR/nbd.sock"
        # romfile= skips loading the iPXE option ROM, which only slows boot.
        -device virtio-net-pci,netdev=net0,romfile=
      )
      KERNEL_ARGS+=" vmtest.connections=$CONNECTIONS"
      if [[ $read_only == true ]]; then
        KERNEL_ARGS+=" vmtest.nbd_read_only=1"
      fi
      ;;
    qemu-drive)
      DEVICE_ARGS=(
        -blockdev "$(nbd_blockdev disk "$read_only")"
        -device "virtio-blk-pci,drive=disk,serial=vmtest-disk,logical_block_size=$BLOCK_SIZE,physical_block_size=$BLOCK_SIZE"
      )
      ;;
    dm-crypt)
      local volume_blockdev
      if [[ $TARGET_KIND == socket ]]; then
        volume_blockdev=$(nbd_blockdev volume true)
      else
        ln -s "$(readlink -f "$TARGET")" "$RUN_DIR/volume.img"
        volume_blockdev='{"driver":"file","node-name":"volume","read-only":true,"filename":"'$RUN_DIR/volume.img'"}'
      fi
      # The key travels as a one-sector disk, not on the command line, so it
      # never appears in the host's process list. QEMU reads zeros past the
      # end of the file.
      ln -s "$(readlink -f "$KEY_FILE")" "$RUN_DIR/volume.key"
      DEVICE_ARGS=(
        -blockdev "$volume_blockdev"
        -device virtio-blk-pci,drive=volume,serial=vmtest-vol
        -blockdev '{"driver":"file","node-name":"key","read-only":true,"filename":"'"$RUN_DIR/volume.key"'"}'
        -device virtio-blk-pci,drive=key,serial=vmtest-key
      )
      KERNEL_ARGS+=" vmtest.key_bytes=$KEY_BYTES"
      ;;
  esac
}

# Print seconds elapsed between two `date +%s.%N` stamps.
elapsed() {
  awk -v start="$1" -v end="$2" 'BEGIN { printf "%.1f", end - start }'
}

# Run QEMU and wait for it. Set QEMU_STATUS, BOOT_TIME (until /init
# started, or "never") and TOTAL_TIME.
run_qemu() {
  local start boot_stamp="" end tail_pid=""
  start=$(date +%s.%N)
  # -serial file: sends the console to the log. -no-reboot turns a guest
  # panic (panic=-1 reboots at once) into QEMU exiting.
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 \
    -nodefaults -no-user-config -machine q35 "${ACCEL_ARGS[@]}" \
    -smp 1 -m "${NBDCRYPT_VM_MEM:-512M}" \
    -display none -monitor none -serial "file:$CONSOLE_LOG" -no-reboot \
    -kernel "$KERNEL_IMAGE" -initrd "$INITRD" -append "$KERNEL_ARGS" \
    "${DEVICE_ARGS[@]}" < /dev/null 2> "$QEMU_STDERR" &
  QEMU_PID=$!
  if [[ ${NBDCRYPT_VM_VERBOSE:-0} == 1 ]]; then
    tail --pid="$QEMU_PID" -n +1 -f "$CONSOLE_LOG" >&2 &
    tail_pid=$!
  fi

  # Boot time is measured on the host until /init prints its first line.
  while kill -0 "$QEMU_PID" 2> /dev/null; do
    if [[ -z $boot_stamp ]] && grep -aq 'VMTEST: booted' "$CONSOLE_LOG"; then
      boot_stamp=$(date +%s.%N)
    fi
    sleep 0.1
  done
  QEMU_STATUS=0
  wait "$QEMU_PID" || QEMU_STATUS=$?
  QEMU_PID=""
  end=$(date +%s.%N)
  if [[ -n $tail_pid ]]; then
    wait "$tail_pid" || true
  fi

  BOOT_TIME=never
  [[ -z $boot_stamp ]] || BOOT_TIME=$(elapsed "$start" "$boot_stamp")s
  TOTAL_TIME=$(elapsed "$start" "$end")s
}

show_failure_details() {
  if [[ -s $QEMU_STDERR ]]; then
    echo "run-guest: QEMU stderr:" >&2
    sed 's/^/  /' "$QEMU_STDERR" >&2
  fi
  if [[ ! -s $CONSOLE_LOG ]]; then
    echo "run-guest: the guest console is empty (the kernel never started?)" >&2
    return
  fi
  echo "run-guest: last $LOG_TAIL_LINES lines of the guest console ($FINAL_LOG):" >&2
  tail -n "$LOG_TAIL_LINES" "$CONSOLE_LOG" | tr -d '\r' | sed 's/^/  /' >&2
}

cleanup() {
  if [[ -n ${QEMU_PID:-} ]]; then
    kill "$QEMU_PID" 2> /dev/null || true
  fi
  if [[ -n ${RUN_DIR:-} ]]; then
    rm -rf "$RUN_DIR"
  fi
}

main() {
  parse_arguments "$@"
  validate_arguments
  check_host_tools
  choose_accelerator
  prepare_guest_image
  trap cleanup EXIT
  make_run_dir
  configure_mode
  run_qemu

  local verdict status
  if grep -aq 'VMTEST: RESULT PASS' "$CONSOLE_LOG"; then
    verdict=PASS status=$EXIT_PASS
  elif grep -aq 'VMTEST: RESULT FAIL' "$CONSOLE_LOG"; then
    verdict=FAIL status=$EXIT_FAIL
  else
    verdict="NO RESULT" status=$EXIT_NO_RESULT
  fi

  # Keep the console log at the --log path, or after a run that did not pass.
  FINAL_LOG=""
  if [[ -n $LOG_PATH ]]; then
    FINAL_LOG=$LOG_PATH
  elif [[ $status != "$EXIT_PASS" ]]; then
    FINAL_LOG=$(mktemp "${TMPDIR:-/tmp}/nbdcrypt-guest-$MODE.XXXXXX.log")
  fi
  if [[ -n $FINAL_LOG ]]; then
    cp "$CONSOLE_LOG" "$FINAL_LOG" || die "cannot write the console log to $FINAL_LOG"
  fi

  grep -ao 'VMTEST: .*' "$CONSOLE_LOG" | tr -d '\r' || true
  local qemu_note=""
  [[ $QEMU_STATUS == 0 ]] || qemu_note=" qemu_status=$QEMU_STATUS"
  [[ $QEMU_STATUS != 124 ]] || qemu_note+=" (timed out after ${TIMEOUT}s)"
  echo "run-guest: $verdict mode=$MODE accel=$ACCEL kernel=${NBDCRYPT_VM_KERNEL:-pvh}" \
    "boot=$BOOT_TIME total=$TOTAL_TIME$qemu_note${FINAL_LOG:+ log=$FINAL_LOG}"
  if [[ $status != "$EXIT_PASS" ]]; then
    show_failure_details
  fi
  exit "$status"
}

main "$@"
