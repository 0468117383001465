//! Fuzzes the LUKS2 header parser: binary headers, checksums and JSON metadata.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    nbdcrypt_fuzz::harness::parse_luks2_header(input);
});
