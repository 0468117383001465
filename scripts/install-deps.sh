#!/usr/bin/env bash
# Install the Debian 12 packages that nbdcrypt's tests, benchmarks and VM
# guest harness need. Run as root. Safe to run again: when every package is
# already installed, it exits without calling apt at all.
#
# Usage: sudo scripts/install-deps.sh
#
# The guest kernel is not installed here. scripts/vm/build-initramfs.sh
# downloads Debian's kernel package and unpacks it into its own cache.
set -euo pipefail

# Peers and clients that the tests drive against nbdcrypt.
readonly NBD_PACKAGES=(
  qemu-system-x86       # guest for the kernel NBD client and dm-crypt (TCG)
  libnbd-bin            # nbdinfo, nbdcopy, nbdsh
  python3-libnbd
  fio                   # has ioengine=nbd
  nbdkit
  nbd-client            # copied into the guest initramfs
  nbd-server
  socat                 # bridges the guest's forwarded TCP port to a unix socket
)

# LUKS2 oracle and guest userland.
readonly CRYPTO_PACKAGES=(
  cryptsetup-bin        # luksFormat/luksDump on the host, cryptsetup open in the guest
  dmsetup
  python3-cryptography  # host-side AES-256-XTS (OpenSSL 3.0's `openssl enc` rejects XTS)
  python3-pykmip        # KMIP server for key-management tests
  openssl
  busybox-static        # the guest's shell and tools, statically linked
  e2fsprogs             # mke2fs/e2fsck in the guest, debugfs on the host
  cpio
  gzip
  file
)

# Needed to build nbd's nbd-tester-client from a git checkout: autogen.sh
# runs autoreconf, configure.ac requires AX_PROG_BISON (autoconf-archive),
# flex, pkg-config and glib >= 2.32. GnuTLS enables the tester's TLS tests and
# libnl the netlink tests. Man pages would need docbook-utils, so configure
# that tree with --disable-manpages.
readonly BUILD_PACKAGES=(
  autoconf
  autoconf-archive
  automake
  libtool
  pkg-config
  libglib2.0-dev
  libgnutls28-dev
  libnl-genl-3-dev
  bison
  flex
  make
  gcc
)

# scripts/bench.sh: parsing fio's JSON, arithmetic, and profiles of the server.
readonly BENCH_PACKAGES=(
  jq
  bc
  linux-perf
  valgrind
)

# Installed in a second apt run, see install_qemu_utils.
readonly QEMU_UTILS=qemu-utils

# Commands that the tests and scripts call. They are checked besides the
# packages so that a deleted binary is reported instead of passing the fast
# path. apt does not restore it: reinstall its package with --reinstall.
readonly REQUIRED_COMMANDS=(
  qemu-system-x86_64 qemu-img qemu-nbd qemu-io
  nbdinfo nbdcopy nbdsh fio nbdkit nbd-client nbd-server socat
  cryptsetup dmsetup openssl busybox mke2fs e2fsck debugfs cpio gzip file
  autoreconf automake libtoolize pkg-config bison flex make gcc
  jq bc perf valgrind
)

die() {
  echo "install-deps: ERROR: $*" >&2
  exit 1
}

# Print the packages from the arguments that dpkg does not list as installed.
missing_packages() {
  local package status
  for package in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
      echo "$package"
    fi
  done
}

# Print the commands from the arguments that are not on PATH. The sbin
# directories are searched too, because root's PATH may lack them.
missing_commands() {
  local command
  for command in "$@"; do
    if ! PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin command -v "$command" >/dev/null; then
      echo "$command"
    fi
  done
}

apt_install() {
  apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "$@"
}

# Debian 12's qemu-system-x86 (7.2) conflicts with a newer qemu-utils, such as
# 10.0 from bookworm-backports. That qemu-utils declares "Breaks:
# qemu-system-common (<< 1:8.0+dfsg-5~)", so apt removes it while installing
# qemu-system-x86, and qemu-img and qemu-nbd disappear. Asking for both in one
# apt run fails with "held broken packages". Installing qemu-utils afterwards
# gets the version that matches qemu-system-x86.
install_qemu_utils() {
  if [[ -z $(missing_packages "$QEMU_UTILS") ]]; then
    return
  fi
  echo "install-deps: installing $QEMU_UTILS (apt removed it or it was never installed)"
  apt_install "$QEMU_UTILS"
}

main() {
  [[ $EUID -eq 0 ]] || die "must run as root (apt-get install); try: sudo $0"
  command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
    die "apt-get or dpkg-query not found; this script supports Debian 12 (bookworm) only"

  local all_packages=("${NBD_PACKAGES[@]}" "${CRYPTO_PACKAGES[@]}" "${BUILD_PACKAGES[@]}" "${BENCH_PACKAGES[@]}")
  local missing
  missing=$(missing_packages "${all_packages[@]}" "$QEMU_UTILS")
  if [[ -z $missing && -z $(missing_commands "${REQUIRED_COMMANDS[@]}") ]]; then
    echo "install-deps: all $((${#all_packages[@]} + 1)) packages are installed; nothing to do"
    return
  fi
  echo "install-deps: missing packages:" $missing

  export DEBIAN_FRONTEND=noninteractive
  # Always refresh the package lists. Stale lists can name dependency versions
  # older than the installed libraries, and apt then reports unmet
  # dependencies. For example, libpcre2-dev 10.42-1 requires libpcre2-8-0
  # (= 10.42-1) while 10.42-1+deb12u1 is installed.
  apt-get update -q -o DPkg::Lock::Timeout=300 ||
    die "apt-get update failed; check /etc/apt/sources.list* and the network path to the Debian mirror"
  apt_install "${all_packages[@]}" ||
    die "apt-get install failed; read apt's message above"
  install_qemu_utils ||
    die "apt-get install $QEMU_UTILS failed; read apt's message above"

  # Fail loudly when anything is still absent, because tests that miss a
  # tool must fail rather than skip.
  local still_missing_packages still_missing_commands
  still_missing_packages=$(missing_packages "${all_packages[@]}" "$QEMU_UTILS")
  still_missing_commands=$(missing_commands "${REQUIRED_COMMANDS[@]}")
  [[ -z $still_missing_packages ]] ||
    die "packages still not installed after apt-get:" $still_missing_packages
  [[ -z $still_missing_commands ]] ||
    die "commands still missing after apt-get:" $still_missing_commands

  local busybox_path
  busybox_path=$(command -v busybox)
  file -L "$busybox_path" | grep -q 'statically linked' ||
    die "$busybox_path is not statically linked; the guest initramfs needs busybox-static"

  echo "install-deps: done: $(qemu-system-x86_64 --version | head -1); $(qemu-nbd --version | head -1)"
}

main "$@"
