#!/usr/bin/env bash
# Build the kernel and initramfs of the throwaway QEMU guest that
# scripts/vm/run-guest.sh boots to run the Linux kernel NBD client and
# dm-crypt, which the host kernel may lack.
#
# Usage: scripts/vm/build-initramfs.sh [-q] [OUTDIR]
#   -q       print nothing when OUTDIR is already up to date
#   OUTDIR   cache directory (default: $NBDCRYPT_VM_DIR, else
#            ${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt-vm)
#
# Environment:
#   NBDCRYPT_VM_KERNEL_PACKAGE  Debian kernel package to use, e.g.
#                               linux-image-6.1.0-57-amd64 (default: the one
#                               that linux-image-amd64 depends on, resolved once
#                               and then kept)
#
# OUTDIR afterwards contains:
#   vmlinuz             Debian's kernel image (bzImage)
#   vmlinux             the same kernel as an uncompressed ELF, which QEMU boots
#                       through the PVH entry point without firmware
#                       decompression (about 2x faster to boot under TCG)
#   initramfs.cpio      busybox-static, nbd-client, mke2fs, e2fsck, cryptsetup,
#                       dmsetup with their shared libraries, kernel modules, and
#                       init.sh as /init. It is not compressed (24 MB), because
#                       gunzip under TCG delayed /init by about 0.5 s.
#   kernel-release      the kernel's release string (uname -r)
#   kernel/             the unpacked kernel package (about 400 MB)
#
# The kernel package is only downloaded (apt-get download) and unpacked
# (dpkg -x), never installed on the host. The first run downloads about 70 MB
# from the configured Debian mirror and takes about 15 s. Later runs reuse OUTDIR and rebuild the
# initramfs only when init.sh, this script, the kernel or one of the copied
# host binaries or libraries changed. A lock on OUTDIR/.lock serializes
# concurrent builds, e.g. from tests that run in parallel.
set -euo pipefail

readonly SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly PYTHON=/usr/bin/python3
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

# Modules that every mode loads, dependencies resolved below:
#   nbd                  the kernel NBD client that nbd-client configures
#   virtio_pci, virtio_net, virtio_blk
#                        the guest's NIC (user-mode network) and disks
#   crc32c_generic       ext4's metadata_csum needs a crc32c shash. The
#                        kernel would request it through modprobe, which the
#                        guest does not run, so it is loaded explicitly.
#   ext4                 (pulls in jbd2, mbcache, crc16)
readonly BASE_MODULES=(nbd virtio_pci virtio_net virtio_blk crc32c_generic ext4)
# Modules that only dm-crypt mode loads. In Debian's 6.1 config the generic
# AES cipher, the skcipher API and the kernel keyring are built in, and these
# are modules. aesni_intel provides xts-aes-aesni, which dm-crypt picks
# because QEMU's "-cpu max" has the aes flag. xts pulls in ecb through its
# "softdep=pre: ecb" and would fall back to xts(ecb(aes-generic)).
readonly DM_CRYPT_MODULES=(dm_mod dm_crypt xts aesni_intel)

# Host programs copied into the guest, with the path they get there.
readonly GUEST_PROGRAMS=(
  "nbd-client:/sbin/nbd-client"
  "mke2fs:/sbin/mke2fs"
  "e2fsck:/sbin/e2fsck"
  "cryptsetup:/sbin/cryptsetup"
  "dmsetup:/sbin/dmsetup"
)

die() {
  echo "build-initramfs: ERROR: $*" >&2
  exit 1
}

say() {
  echo "build-initramfs: $*" >&2
}

# Print the header comment of this script, which documents its usage.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

check_host_tools() {
  local tool
  for tool in busybox cpio ldd file apt-get apt-cache dpkg flock sha256sum \
      nbd-client mke2fs e2fsck cryptsetup dmsetup; do
    command -v "$tool" >/dev/null ||
      die "$tool not found; run scripts/install-deps.sh as root"
  done
  [[ -x $PYTHON ]] || die "$PYTHON not found; run scripts/install-deps.sh as root"
  file -L "$(command -v busybox)" | grep -q 'statically linked' ||
    die "$(command -v busybox) is not statically linked; install busybox-static"
}

# Resolve the kernel package once and remember it in kernel/package, so
# later runs neither ask apt nor switch kernels after an `apt-get update`.
kernel_package_name() {
  local remembered=$OUT/kernel/package package
  if [[ -n ${NBDCRYPT_VM_KERNEL_PACKAGE:-} ]]; then
    echo "$NBDCRYPT_VM_KERNEL_PACKAGE"
    return
  fi
  if [[ -s $remembered ]]; then
    cat "$remembered"
    return
  fi
  # linux-image-amd64 is a metapackage that depends on the versioned image.
  package=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [[ -n $package ]] ||
    die "cannot resolve linux-image-amd64 to a kernel package; run apt-get update (or scripts/install-deps.sh), or set NBDCRYPT_VM_KERNEL_PACKAGE"
  echo "$package" > "$remembered"
  echo "$package"
}

# Download and unpack the kernel package into kernel/PACKAGE/ unless it is
# there already. Print the unpacked tree's path.
fetch_kernel() {
  local package=$1
  local dir=$OUT/kernel/$package
  if [[ -f $dir/unpacked.done ]]; then
    echo "$dir/tree"
    return
  fi

  say "downloading $package (about 70 MB) from the Debian mirror"
  local staging
  staging=$(mktemp -d "$OUT/kernel/.download.XXXXXX")
  local apt_options=(-q)
  # As root, apt-get download would try to drop to the _apt user, which
  # cannot write to this directory, and warn about it.
  if [[ $EUID -eq 0 ]]; then
    apt_options+=(-o APT::Sandbox::User=root)
  fi
  (cd "$staging" && apt-get download "${apt_options[@]}" "$package" >&2) ||
    die "apt-get download $package failed; run apt-get update, or check the package name"
  local deb
  deb=$(find "$staging" -maxdepth 1 -name "${package}_*.deb" | head -1)
  [[ -n $deb ]] || die "apt-get download $package produced no .deb in $staging"

  say "unpacking $(basename "$deb")"
  dpkg -x "$deb" "$staging/tree" || die "dpkg -x $deb failed"
  # Only the unpacked tree is kept, which saves the .deb's 70 MB.
  rm -rf "$dir"
  mkdir -p "$dir"
  mv "$staging/tree" "$dir/tree"
  rm -rf "$staging"
  touch "$dir/unpacked.done"
  echo "$dir/tree"
}

# Extract the ELF kernel from the bzImage's XZ payload. Debian builds with
# CONFIG_PVH=y, so QEMU can start this ELF directly at its PVH entry point.
extract_vmlinux() {
  local vmlinuz=$1 vmlinux=$2
  "$PYTHON" - "$vmlinuz" "$vmlinux.tmp" <<'PY' || die "extracting vmlinux from $1 failed"
import lzma
import sys

bzimage = open(sys.argv[1], "rb").read()
start = bzimage.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no XZ stream in the bzImage; the kernel is not built with CONFIG_KERNEL_XZ")
# The decompressor stops at the end of the XZ stream and ignores the
# bzImage's trailing bytes.
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the XZ payload of the bzImage is not an ELF file")
open(sys.argv[2], "wb").write(elf)
PY
  mv "$vmlinux.tmp" "$vmlinux"
}

# Print the program and every shared library it loads, one path a line.
program_and_libraries() {
  local program=$1
  echo "$program"
  # ldd prints "libX.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
  ldd "$program" 2>/dev/null | grep -oE '/[^ ]+' || true
}

# Print a fingerprint of every input of the initramfs. A change in any of
# them (new init.sh, kernel, upgraded e2fsprogs or libc) forces a rebuild.
initramfs_fingerprint() {
  local kernel_release=$1 entry program
  {
    echo "kernel $kernel_release"
    sha256sum "$SCRIPT_DIR/init.sh" "$SCRIPT_DIR/build-initramfs.sh"
    for program in busybox "${GUEST_PROGRAMS[@]%%:*}"; do
      program_and_libraries "$(command -v "$program")"
    done | sort -u | while read -r entry; do
      stat -L -c '%n %s %Y' "$entry"
    done
    if [[ -f /etc/mke2fs.conf ]]; then
      sha256sum /etc/mke2fs.conf
    fi
  } | sha256sum | cut -d' ' -f1
}

# Copy a program into the root tree with all its shared libraries at their
# host paths, so that the dynamic loader finds them in the guest.
copy_program() {
  local root=$1 program=$2 destination=$3 library
  cp -L "$program" "$root$destination"
  ldd "$program" 2>/dev/null | grep -oE '/[^ ]+' | while read -r library; do
    mkdir -p "$root$(dirname "$library")"
    cp -L -n "$library" "$root$library"
  done
}

# Module resolution. The .deb has no modules.dep because depmod runs at
# install time, so the load order comes from each module's .modinfo section:
# "depends=" lists hard dependencies and "softdep=pre: ..." modules that
# should load first.
declare -A MODULE_PATH=()
declare -A MODULE_SEEN=()
MODULE_ORDER=()

index_modules() {
  local module_dir=$1 path name
  while IFS= read -r -d '' path; do
    name=${path##*/}
    name=${name%%.ko*}
    MODULE_PATH[${name//-/_}]=$path
  done < <(find "$module_dir/kernel" -name '*.ko' -print0 -o -name '*.ko.xz' -print0)
}

# Print a module's uncompressed contents.
module_contents() {
  local path=$1
  if [[ $path == *.xz ]]; then
    xz -dc "$path"
  else
    cat "$path"
  fi
}

# Append a module to MODULE_ORDER after its dependencies. The third argument
# is "hard" or "soft". A soft dependency without a module file is skipped,
# because softdeps may name an alias: ext4's "crypto-crc32c" is provided by
# crc32c_generic in BASE_MODULES. A missing hard dependency is an error.
resolve_module() {
  local name=${1//-/_} module_dir=$2 kind=${3:-hard}
  [[ -n ${MODULE_SEEN[$name]:-} ]] && return
  MODULE_SEEN[$name]=1

  local path=${MODULE_PATH[$name]:-}
  if [[ -z $path ]]; then
    # Built into the kernel: nothing to load.
    if grep -qE "/${name//_/[-_]}\.ko$" "$module_dir/modules.builtin" 2>/dev/null; then
      return
    fi
    if [[ $kind == soft ]]; then
      say "skipping softdep $1, which is no module file (an alias?)"
      return
    fi
    die "kernel module $name is neither in the package nor built in"
  fi

  local modinfo dependencies soft_pre dependency
  modinfo=$(module_contents "$path" | tr '\0' '\n' | grep -aE '^(depends|softdep)=' || true)
  dependencies=$(sed -n 's/^depends=//p' <<<"$modinfo" | tr ',' ' ')
  soft_pre=$(sed -n 's/^softdep=.*pre: *\([^:]*\)\( post:.*\)\{0,1\}$/\1/p' <<<"$modinfo")
  for dependency in $soft_pre; do
    resolve_module "$dependency" "$module_dir" soft
  done
  for dependency in $dependencies; do
    resolve_module "$dependency" "$module_dir" hard
  done
  MODULE_ORDER+=("$name")
}

# Copy MODULE_ORDER[FIRST..END) into the root tree, uncompressed, and write
# their load order to lib/modules/LIST.
install_modules() {
  local root=$1 first=$2 end=$3 list=$4 i name
  : > "$root/lib/modules/$list"
  for ((i = first; i < end; i++)); do
    name=${MODULE_ORDER[$i]}
    module_contents "${MODULE_PATH[$name]}" > "$root/lib/modules/$name.ko"
    echo "$name.ko" >> "$root/lib/modules/$list"
  done
}

build_root() {
  local root=$1 module_dir=$2 entry program destination

  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules,lib64,usr/bin,usr/sbin}
  cp -L "$(command -v busybox)" "$root/bin/busybox"
  install -m 0755 "$SCRIPT_DIR/init.sh" "$root/init"
  # mke2fs reads its ext4 feature defaults from /etc/mke2fs.conf.
  if [[ -f /etc/mke2fs.conf ]]; then
    cp /etc/mke2fs.conf "$root/etc/"
  fi

  for entry in "${GUEST_PROGRAMS[@]}"; do
    program=${entry%%:*}
    destination=${entry#*:}
    copy_program "$root" "$(command -v "$program")" "$destination"
  done
  ln -s mke2fs "$root/sbin/mkfs.ext4"
  ln -s e2fsck "$root/sbin/fsck.ext4"

  index_modules "$module_dir"
  local module
  for module in "${BASE_MODULES[@]}"; do
    resolve_module "$module" "$module_dir"
  done
  local base_count=${#MODULE_ORDER[@]}
  for module in "${DM_CRYPT_MODULES[@]}"; do
    resolve_module "$module" "$module_dir"
  done
  install_modules "$root" 0 "$base_count" load-order
  install_modules "$root" "$base_count" "${#MODULE_ORDER[@]}" load-order.dm-crypt
  say "modules: ${MODULE_ORDER[*]:0:base_count}"
  say "dm-crypt modules: ${MODULE_ORDER[*]:base_count}"
}

main() {
  local quiet=0
  while [[ $# -gt 0 ]]; do
    case $1 in
      -q) quiet=1; shift ;;
      -h | --help) usage; exit 0 ;;
      -*) die "unknown option $1; usage: $0 [-q] [OUTDIR]" ;;
      *) break ;;
    esac
  done
  [[ $# -le 1 ]] || die "too many arguments; usage: $0 [-q] [OUTDIR]"
  OUT=${1:-${NBDCRYPT_VM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt-vm}}
  mkdir -p "$OUT/kernel" || die "cannot create $OUT"
  OUT=$(cd "$OUT" && pwd)

  check_host_tools

  exec 9> "$OUT/.lock"
  flock 9 || die "cannot lock $OUT/.lock"
  # Remove leftovers of interrupted builds and downloads. No other build can
  # use them while this process holds the lock.
  rm -rf "$OUT"/.build.* "$OUT"/kernel/.download.*

  local package tree vmlinuz kernel_release
  package=$(kernel_package_name)
  tree=$(fetch_kernel "$package")
  vmlinuz=$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' | head -1)
  [[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $tree; delete $OUT/kernel/$package and retry"
  kernel_release=${vmlinuz##*/vmlinuz-}
  local module_dir=$tree/lib/modules/$kernel_release
  [[ -d $module_dir/kernel ]] || die "no modules in $module_dir; delete $OUT/kernel/$package and retry"

  if [[ ! -f $OUT/vmlinux || $(cat "$OUT/kernel-release" 2>/dev/null) != "$kernel_release" ]]; then
    cp "$vmlinuz" "$OUT/vmlinuz"
    extract_vmlinux "$OUT/vmlinuz" "$OUT/vmlinux"
    echo "$kernel_release" > "$OUT/kernel-release"
  fi

  local fingerprint
  fingerprint=$(initramfs_fingerprint "$kernel_release")
  if [[ -f $OUT/initramfs.cpio && $(cat "$OUT/initramfs.fingerprint" 2>/dev/null) == "$fingerprint" ]]; then
    [[ $quiet == 1 ]] || say "$OUT is up to date (kernel $kernel_release)"
    return
  fi

  STAGING_DIR=$(mktemp -d "$OUT/.build.XXXXXX")
  trap 'rm -rf "$STAGING_DIR"' EXIT
  build_root "$STAGING_DIR/root" "$module_dir"
  (cd "$STAGING_DIR/root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --quiet) > "$STAGING_DIR/initramfs.cpio" ||
    die "packing the initramfs failed"
  # rename() is atomic, so a guest that starts meanwhile reads either the old
  # or the new initramfs, never a partial one.
  mv "$STAGING_DIR/initramfs.cpio" "$OUT/initramfs.cpio"
  echo "$fingerprint" > "$OUT/initramfs.fingerprint"
  say "built $OUT/initramfs.cpio ($(du -h "$OUT/initramfs.cpio" | cut -f1)), kernel $kernel_release"
}

main "$@"
