//! Fuzzes the NBD transmission phase: a fixed handshake attaches to the export, then the
//! input follows as requests (the first byte picks the options sent before NBD_OPT_GO).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nbdcrypt_fuzz::harness::ConnectionHarness;

static HARNESS: OnceLock<ConnectionHarness> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    HARNESS.get_or_init(ConnectionHarness::new).run_transmission(input);
});
