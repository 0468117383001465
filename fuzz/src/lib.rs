//! Support for the nbdcrypt fuzz targets. The harness lives in `harness.rs` so that the
//! product's `cargo test` can include the same file and replay the corpus without libFuzzer.

pub mod harness;
