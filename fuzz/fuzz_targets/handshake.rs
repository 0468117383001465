//! Fuzzes the NBD handshake: the input is everything a client sends after the greeting.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nbdcrypt_fuzz::harness::ConnectionHarness;

static HARNESS: OnceLock<ConnectionHarness> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    HARNESS.get_or_init(ConnectionHarness::new).run_handshake(input);
});
