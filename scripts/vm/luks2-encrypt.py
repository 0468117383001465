#!/usr/bin/python3
"""Encrypt plaintext into the data segment of a LUKS2 image the way dm-crypt does.

This is a host-side oracle for tests: it needs no device-mapper, only the
image's LUKS2 metadata (read with `cryptsetup luksDump --dump-json-metadata`)
and the raw volume key. It supports segments with encryption aes-xts-plain64.

dm-crypt's plain64 IV is the sector number as a 64-bit little-endian integer,
zero-padded to 16 bytes, plus the segment's iv_tweak. The sector number counts
512-byte units even when the segment's sector_size is 4096, because cryptsetup
2.6 does not set dm-crypt's iv_large_sectors for LUKS2. So the tweak of
encryption sector n of 4096 bytes is 8*n. --tweak-unit 4096 produces the other
convention (tweak n), which dm-crypt must reject as a checksum mismatch.

Uses python3-cryptography, so run it with Debian's /usr/bin/python3.
"""

import argparse
import json
import os
import subprocess
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SUPPORTED_ENCRYPTION = "aes-xts-plain64"


def read_data_segment(image):
    """Return the LUKS2 image's single data segment from its JSON metadata."""
    try:
        metadata = subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", image],
            check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit("luks2-encrypt: cryptsetup not found; run scripts/install-deps.sh")
    except subprocess.CalledProcessError as error:
        sys.exit(f"luks2-encrypt: cryptsetup luksDump {image} failed: {error.stderr.strip()}")
    segments = json.loads(metadata)["segments"]
    if len(segments) != 1:
        sys.exit(f"luks2-encrypt: {image} has {len(segments)} segments, expected 1")
    return next(iter(segments.values()))


def encrypt_sector(key, tweak, plaintext):
    encryptor = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
    return encryptor.update(plaintext) + encryptor.finalize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="LUKS2 image file, changed in place")
    parser.add_argument("key_file", help="raw volume key (64 bytes for AES-256-XTS)")
    parser.add_argument("plaintext", help="file whose bytes go to the start of the data segment")
    parser.add_argument("--tweak-unit", type=int, default=512,
                        help="bytes per tweak increment (default 512, as dm-crypt)")
    args = parser.parse_args()

    segment = read_data_segment(args.image)
    if segment["encryption"] != SUPPORTED_ENCRYPTION:
        sys.exit(f"luks2-encrypt: segment encryption is {segment['encryption']}, "
                 f"only {SUPPORTED_ENCRYPTION} is supported")
    offset = int(segment["offset"])
    sector_size = int(segment["sector_size"])
    iv_tweak = int(segment.get("iv_tweak", "0"))

    with open(args.key_file, "rb") as key_file:
        key = key_file.read()
    if len(key) != 64:
        sys.exit(f"luks2-encrypt: {args.key_file} has {len(key)} bytes, "
                 "expected 64 (AES-256-XTS)")
    with open(args.plaintext, "rb") as plaintext_file:
        plaintext = plaintext_file.read()
    if len(plaintext) % sector_size:
        sys.exit(f"luks2-encrypt: plaintext has {len(plaintext)} bytes, "
                 f"not a multiple of the sector size {sector_size}")
    if sector_size % args.tweak_unit:
        sys.exit(f"luks2-encrypt: --tweak-unit {args.tweak_unit} does not divide "
                 f"the sector size {sector_size}")

    data_bytes = os.path.getsize(args.image) - offset
    if segment["size"] != "dynamic":
        data_bytes = min(data_bytes, int(segment["size"]))
    if len(plaintext) > data_bytes:
        sys.exit(f"luks2-encrypt: plaintext has {len(plaintext)} bytes, "
                 f"but the data segment of {args.image} has {data_bytes}")

    units_per_sector = sector_size // args.tweak_unit
    with open(args.image, "r+b") as image:
        image.seek(offset)
        for sector in range(len(plaintext) // sector_size):
            tweak = (iv_tweak + sector * units_per_sector).to_bytes(8, "little") + bytes(8)
            start = sector * sector_size
            image.write(encrypt_sector(key, tweak, plaintext[start:start + sector_size]))
    print(f"luks2-encrypt: wrote {len(plaintext)} bytes at offset {offset}, "
          f"sector size {sector_size}, tweak unit {args.tweak_unit}")


if __name__ == "__main__":
    main()
