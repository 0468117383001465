//! nbdcrypt: an NBD server that encrypts every sector of a LUKS2 volume.
//!
//! Modules, from the wire down to the disk:
//! - [`nbd`]: NBD protocol constants, the handshake and the transmission phase.
//! - [`engine`]: one request's life: bounds checks, sector locks, encryption, backend I/O.
//! - [`crypto`]: AES-256-XTS per sector, AES key wrap, key types.
//! - [`volume`]: the LUKS2 header (binary headers, JSON metadata, the KMS token).
//! - [`backend`]: the backing store trait and its file and in-memory implementations.
//! - [`keys`]: the key provider trait and the local keystore.
//! - [`daemon`]: listeners, per-connection tasks and shutdown.
//! - [`cli`]: the command line and configuration file.

#![deny(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod crypto;
pub mod daemon;
pub mod engine;
pub mod keys;
pub mod nbd;
pub mod volume;
