#!/bin/busybox sh
# /init of the guest that scripts/vm/run-guest.sh boots. build-initramfs.sh
# copies this file into the initramfs, and it runs as PID 1 under busybox ash.
#
# Settings come from the kernel command line (run-guest.sh sets them):
#   vmtest.mode=kernel-nbd-client|qemu-drive|dm-crypt
#   vmtest.export_hex=HEX     NBD export name as hex bytes (empty: the
#                             server's default export). Hex keeps spaces and
#                             other bytes intact on the command line.
#   vmtest.block_size=N       logical block size in bytes that the disk must
#                             have (kernel-nbd-client: passed to nbd-client -b)
#   vmtest.connections=N      kernel-nbd-client: nbd-client -C N
#   vmtest.nbd_read_only=1    kernel-nbd-client: attach read-only (nbd-client -R)
#   vmtest.size_mib=N         filesystem modes: size of the test file.
#                             dm-crypt: MiB of plaintext to hash, 0 = all.
#   vmtest.fs_action=create|keep|verify
#                             create: mkfs.ext4, write and check a file.
#                             keep: check the file of an earlier run, then
#                             write and check a new one. verify: only check
#                             the earlier file, with no writes at all.
#   vmtest.expect=HEX         sha256 that the earlier file (keep, verify) or
#                             the plaintext (dm-crypt) must have
#   vmtest.key_bytes=N        dm-crypt: length of the raw volume key
#
# Disks are found by their virtio serial numbers, because the PCI slot
# order, not the order of QEMU's options, decides which one is vda:
#   vmtest-disk   qemu-drive: the NBD export
#   vmtest-vol    dm-crypt: the LUKS2 volume
#   vmtest-key    dm-crypt: the raw volume key in its first key_bytes bytes
#
# Every line for the host starts with "VMTEST: ". The last one is
# "VMTEST: RESULT PASS" or "VMTEST: RESULT FAIL <reason>", and then the
# guest powers off.

/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
set -o pipefail

readonly NBD_HOST=10.0.2.100
readonly NBD_PORT=10809
readonly MNT=/mnt

# The firmware leaves the cursor mid-line, so start on a fresh one.
echo

log() {
  echo "VMTEST: $*"
}

uptime_seconds() {
  cut -d' ' -f1 /proc/uptime
}

finish() {
  log "RESULT $1"
  log "guest uptime at end: $(uptime_seconds)s"
  sync
  poweroff -f
  # poweroff -f should not return. If it does, power off through sysrq.
  sleep 5
  echo o > /proc/sysrq-trigger
}

fail() {
  finish "FAIL $*"
  exit 1
}

# Print the value of vmtest.NAME from the kernel command line, or DEFAULT.
param() {
  local value
  value=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^vmtest\.$1=//p" | tail -1)
  echo "${value:-$2}"
}

# Print the bytes that a string of hex digits encodes.
decode_hex() {
  printf '%b' "$(echo "$1" | sed 's/../\\x&/g')"
}

load_modules() {
  local list=$1 module
  while read -r module; do
    [ -n "$module" ] || continue
    if ! insmod "/lib/modules/$module" 2> /tmp/insmod.err; then
      grep -q 'File exists' /tmp/insmod.err ||
        fail "insmod $module failed: $(cat /tmp/insmod.err)"
    fi
  done < "$list"
}

# Print /dev/vdX for the virtio disk with the given serial, waiting up to 2 s
# for it to appear.
disk_by_serial() {
  local serial=$1 attempt path
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    for path in /sys/block/vd*/serial; do
      if [ "$(cat "$path" 2> /dev/null)" = "$serial" ]; then
        echo "/dev/$(basename "$(dirname "$path")")"
        return 0
      fi
    done
    sleep 0.2
  done
  return 1
}

check_block_size() {
  local dev=$1 expected=$2 actual
  actual=$(cat "/sys/block/$(basename "$dev")/queue/logical_block_size")
  [ "$actual" = "$expected" ] ||
    fail "$dev has logical block size $actual, expected $expected"
  log "$dev: $(cat "/sys/block/$(basename "$dev")/size") sectors of 512 bytes," \
    "logical block size $actual, read-only $(cat "/sys/block/$(basename "$dev")/ro")"
}

# Flush and drop every cached page of the device, so that the next read
# really goes to the NBD server.
drop_caches() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  blockdev --flushbufs "$1" || fail "blockdev --flushbufs $1 failed"
}

fsck_read_only() {
  local dev=$1
  e2fsck -f -n "$dev" > /tmp/fsck.log 2>&1 || {
    cat /tmp/fsck.log
    fail "e2fsck -f -n $dev found errors"
  }
  log "e2fsck -f -n clean at $(uptime_seconds)s"
}

# Check /testfile against the sha256 stored beside it by an earlier run and,
# if given, against vmtest.expect.
verify_earlier_file() {
  local dev=$1 expected=$2 actual stored
  fsck_read_only "$dev"
  mount -t ext4 -o ro "$dev" "$MNT" || fail "mount -o ro $dev failed; see the kernel messages above"
  [ -f "$MNT/testfile" ] || fail "/testfile from an earlier run is missing"
  actual=$(sha256sum "$MNT/testfile" | cut -d' ' -f1)
  stored=$(cat "$MNT/testfile.sha256")
  umount "$MNT" || fail "umount $MNT failed"
  log "earlier file sha256=$actual"
  [ "$actual" = "$stored" ] ||
    fail "earlier file changed: sha256 $actual, but the earlier run stored $stored"
  if [ -n "$expected" ] && [ "$actual" != "$expected" ]; then
    fail "earlier file has sha256 $actual, expected $expected"
  fi
  log "earlier file verified"
}

# Write a file of random data, re-read it after dropping the caches, and
# check the filesystem in between. The first hash is taken from the page
# cache right after writing, which contains exactly the bytes that go to the
# disk. (A dd | tee | sha256sum pipeline takes about 4x longer under TCG.)
write_and_check_file() {
  local dev=$1 size_mib=$2 written read_back bytes
  mount -t ext4 "$dev" "$MNT" || fail "mount $dev failed"
  rm -f "$MNT/testfile" "$MNT/testfile.sha256"
  dd if=/dev/urandom of="$MNT/testfile" bs=1048576 count="$size_mib" 2> /tmp/dd.err ||
    fail "writing $size_mib MiB to $MNT/testfile failed: $(cat /tmp/dd.err)"
  bytes=$(stat -c %s "$MNT/testfile")
  [ "$bytes" -eq $((size_mib * 1048576)) ] ||
    fail "$MNT/testfile has $bytes bytes, expected $((size_mib * 1048576))"
  written=$(sha256sum "$MNT/testfile" | cut -d' ' -f1)
  echo "$written" > "$MNT/testfile.sha256"
  sync
  umount "$MNT" || fail "umount $MNT after writing failed"
  log "wrote $size_mib MiB, sha256=$written, at $(uptime_seconds)s"

  drop_caches "$dev"
  fsck_read_only "$dev"
  mount -t ext4 -o ro "$dev" "$MNT" || fail "mount -o ro $dev after writing failed"
  read_back=$(sha256sum "$MNT/testfile" | cut -d' ' -f1)
  umount "$MNT" || fail "umount $MNT after reading failed"
  log "read back sha256=$read_back at $(uptime_seconds)s"
  [ "$written" = "$read_back" ] ||
    fail "read back sha256 $read_back differs from the written $written"
  log "SHA256 $written"
}

run_filesystem_test() {
  local dev=$1 action size_mib expected
  action=$(param fs_action create)
  size_mib=$(param size_mib 8)
  expected=$(param expect "")

  case $action in
    create)
      # mke2fs picks 1024-byte blocks for devices under 512 MiB, and ext4
      # cannot mount blocks smaller than the device's logical block size. A
      # fixed 4096 lets --keep and --verify-only runs change the block size.
      mkfs.ext4 -q -F -b 4096 -L vmtest "$dev" || fail "mkfs.ext4 $dev failed"
      log "mkfs.ext4 done at $(uptime_seconds)s"
      ;;
    keep | verify)
      verify_earlier_file "$dev" "$expected"
      ;;
    *)
      fail "invalid vmtest.fs_action=$action"
      ;;
  esac
  if [ "$action" != verify ]; then
    write_and_check_file "$dev" "$size_mib"
  fi
}

run_kernel_nbd_client() {
  local export_name block_size connections read_only_option="" dev=/dev/nbd0
  export_name=$(decode_hex "$(param export_hex "")")
  block_size=$(param block_size 512)
  connections=$(param connections 1)
  if [ "$(param nbd_read_only 0)" = 1 ]; then
    read_only_option=-R
  fi

  # QEMU's user-mode network: the guest is 10.0.2.15/24. Connections to
  # NBD_HOST:NBD_PORT are forwarded to the host's unix socket.
  ip link set lo up
  ip link set eth0 up || fail "no eth0 (virtio_net did not load?)"
  ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr add on eth0 failed"

  log "nbd-client: export '$export_name', block size $block_size, $connections connection(s) $read_only_option"
  nbd-client "$NBD_HOST" "$NBD_PORT" "$dev" -N "$export_name" -b "$block_size" -C "$connections" \
      $read_only_option ||
    fail "nbd-client could not attach export '$export_name' to $dev"
  log "nbd-client attached $dev at $(uptime_seconds)s"
  check_block_size "$dev" "$block_size"

  run_filesystem_test "$dev"

  nbd-client -d "$dev" || fail "nbd-client -d $dev failed"
  log "nbd-client detached $dev"
}

run_qemu_drive() {
  local dev
  dev=$(disk_by_serial vmtest-disk) || fail "no virtio disk with serial vmtest-disk"
  check_block_size "$dev" "$(param block_size 512)"
  run_filesystem_test "$dev"
}

run_dm_crypt() {
  local key_bytes size_mib expected volume key_disk bytes sum start
  key_bytes=$(param key_bytes 64)
  size_mib=$(param size_mib 0)
  expected=$(param expect "")

  load_modules /lib/modules/load-order.dm-crypt
  volume=$(disk_by_serial vmtest-vol) || fail "no virtio disk with serial vmtest-vol (the LUKS2 volume)"
  key_disk=$(disk_by_serial vmtest-key) || fail "no virtio disk with serial vmtest-key (the volume key)"
  dd if="$key_disk" of=/tmp/volume.key bs="$key_bytes" count=1 2> /dev/null
  [ "$(wc -c < /tmp/volume.key)" -eq "$key_bytes" ] ||
    fail "could not read $key_bytes key bytes from $key_disk"
  log "volume $volume ($(cat "/sys/block/$(basename "$volume")/size") sectors of 512 bytes), key from $key_disk"

  # --readonly because this mode only reads, and the export may be read-only.
  # Without udev, libdevmapper creates /dev/mapper/cryptvol itself.
  start=$(uptime_seconds)
  cryptsetup open --type luks2 --readonly --volume-key-file /tmp/volume.key \
      --key-size $((key_bytes * 8)) "$volume" cryptvol > /tmp/cryptsetup.log 2>&1 ||
    fail "cryptsetup open failed: $(tr '\n' ' ' < /tmp/cryptsetup.log)"
  log "cryptsetup open took ${start}s -> $(uptime_seconds)s"
  [ -b /dev/mapper/cryptvol ] || fail "/dev/mapper/cryptvol missing after cryptsetup open"

  # The table shows the cipher, iv_offset, data offset and sector_size. The
  # key appears only as a kernel keyring reference.
  log "dm table: $(dmsetup table cryptvol 2>&1)"
  log "xts(aes) implementations: $(awk '/^name/ { n = $3 } /^driver/ { d = $3 } /^priority/ { p = $3 }
      /^$/ { if (n == "xts(aes)") printf "%s (priority %s) ", d, p; n = "" }' /proc/crypto)"

  bytes=$(($(blockdev --getsz /dev/mapper/cryptvol) * 512))
  if [ "$size_mib" = 0 ]; then
    sum=$(sha256sum /dev/mapper/cryptvol | cut -d' ' -f1) || fail "reading /dev/mapper/cryptvol failed"
    log "hashed all $bytes bytes of plaintext at $(uptime_seconds)s"
  else
    [ "$bytes" -ge $((size_mib * 1048576)) ] ||
      fail "the volume has $bytes bytes of plaintext, fewer than the requested $size_mib MiB"
    sum=$(dd if=/dev/mapper/cryptvol bs=1048576 count="$size_mib" 2> /dev/null |
      sha256sum | cut -d' ' -f1) || fail "reading /dev/mapper/cryptvol failed"
    log "hashed the first $size_mib MiB of $bytes bytes of plaintext at $(uptime_seconds)s"
  fi
  log "SHA256 $sum"
  cryptsetup close cryptvol || fail "cryptsetup close failed"
  if [ -n "$expected" ] && [ "$sum" != "$expected" ]; then
    fail "plaintext sha256 $sum differs from the expected $expected"
  fi
}

main() {
  local mode
  mode=$(param mode "")
  log "booted kernel $(uname -r), uptime $(uptime_seconds)s, mode $mode"
  mkdir -p /tmp "$MNT" /run
  load_modules /lib/modules/load-order

  case $mode in
    kernel-nbd-client) run_kernel_nbd_client ;;
    qemu-drive) run_qemu_drive ;;
    dm-crypt) run_dm_crypt ;;
    *) fail "invalid vmtest.mode=$mode" ;;
  esac
  finish PASS
}

main
