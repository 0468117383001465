#!/usr/bin/env bash
# Build nbd-tester-client, the NBD project's protocol test client, from Debian's nbd
# source package, and cache it with the transaction logs its integrity test replays.
#
# Usage: scripts/build-nbd-tester.sh
#
# Prints the cache directory on its last line. That directory contains nbd-tester-client,
# integrity-test.tr and integrityhuge-test.tr. A second run finds the cache and only
# prints its path. Set NBD_TESTER_CACHE to choose the directory
# [default: ${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt/nbd-tester-SUITE].
#
# The sources come from deb.debian.org through a private apt configuration (a deb-src
# list, package lists and cache under a temporary directory), so the machine's apt
# sources stay untouched and root is not needed. It takes trixie's nbd (3.26.1 when this
# was written): the Debian mirror this project's machines use serves that orig tarball,
# but answers 404 for bookworm's nbd_3.24.orig.tar.gz. The build needs the packages in the
# BUILD_PACKAGES list of scripts/install-deps.sh (gcc, make, pkg-config, libglib2.0-dev,
# libgnutls28-dev, libnl-genl-3-dev, bison, flex) and dpkg-dev for dpkg-source.
set -euo pipefail

readonly SUITE=trixie
readonly MIRROR=http://deb.debian.org/debian
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

cache=${NBD_TESTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdcrypt/nbd-tester-$SUITE}

die() {
  echo "build-nbd-tester: ERROR: $*" >&2
  exit 1
}

if [[ -x $cache/nbd-tester-client && -f $cache/integrity-test.tr && -f $cache/integrityhuge-test.tr ]]; then
  echo "$cache"
  exit 0
fi

for command in apt-get dpkg-source gcc make pkg-config; do
  command -v "$command" >/dev/null || die "$command not found; run scripts/install-deps.sh as root"
done
pkg-config --exists glib-2.0 || die "glib-2.0 development files not found; install libglib2.0-dev"
[[ -f $KEYRING ]] || die "$KEYRING not found; install debian-archive-keyring"

work=$(mktemp -d -t nbd-tester-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

# A private apt configuration that knows only the deb-src line below.
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src [signed-by=$KEYRING] $MIRROR $SUITE main" >"$work/sources.list"
apt_options=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=$work/no-parts"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache=$work/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=$(id -un)"
)

echo "build-nbd-tester: fetching the nbd sources from $MIRROR ($SUITE)" >&2
apt-get "${apt_options[@]}" -q update >&2 ||
  die "apt-get update for the deb-src list failed; check the network path to $MIRROR"
(cd "$work/src" && apt-get "${apt_options[@]}" -q source nbd >&2) ||
  die "apt-get source nbd failed; read apt's message above (a 404 means $MIRROR does not serve that source tarball)"
source_dir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'nbd-*' | head -n 1)
[[ -n $source_dir ]] || die "apt-get source did not unpack an nbd-* directory"

echo "build-nbd-tester: building nbd-tester-client" >&2
(
  cd "$source_dir"
  ./configure --disable-manpages --quiet >&2
  make -j"$(nproc)" -C tests/run nbd-tester-client >&2
) || die "building nbd-tester-client failed; read the compiler output above"

# Stage the files and rename the directory into place, so a concurrent run never sees a
# half-written cache. When another run got there first, its copy is kept.
mkdir -p "$(dirname "$cache")"
stage=$(mktemp -d "$(dirname "$cache")/.nbd-tester-stage.XXXXXX")
install -m 0755 "$source_dir/tests/run/nbd-tester-client" "$stage/"
install -m 0644 "$source_dir/tests/run/integrity-test.tr" "$source_dir/tests/run/integrityhuge-test.tr" "$stage/"
basename "$source_dir" >"$stage/SOURCE"
chmod 0755 "$stage"
mv -T "$stage" "$cache" 2>/dev/null || rm -rf "$stage"
echo "$cache"
