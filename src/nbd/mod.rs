//! The NBD protocol: the fixed-newstyle handshake and the transmission phase with simple
//! replies (NetworkBlockDevice/nbd `doc/proto.md`). This module holds no storage logic; it
//! calls the [`crate::engine::Export`] chosen during the handshake.

pub mod consts;
mod handshake;
mod transmission;

use std::sync::Arc;

use crate::engine::{EngineError, Export};
pub use handshake::{negotiate, HandshakeLimits, HandshakeOutcome};
pub use transmission::{serve_transmission, TransmissionLimits};

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("client disconnected")]
    Disconnected,
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("I/O on the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    HandshakeTimeout,
}

/// The exports a server offers, looked up by name during the handshake.
#[derive(Debug, Default)]
pub struct ExportTable {
    exports: Vec<Arc<Export>>,
}

impl ExportTable {
    /// Builds the table; fails when two exports share a name.
    pub fn new(exports: Vec<Arc<Export>>) -> Result<Self, String> {
        for (i, export) in exports.iter().enumerate() {
            if exports[..i].iter().any(|other| other.name() == export.name()) {
                return Err(format!(
                    "two exports are named {:?}: give each [[exports]] entry of the configuration file \
                     a unique name",
                    export.name()
                ));
            }
        }
        Ok(ExportTable { exports })
    }

    /// Finds an export by name; the empty name selects the only export when there is one.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.first();
        }
        self.exports.iter().find(|export| export.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}

/// Maps an engine error to the NBD error value sent to the client. Out-of-range writes get
/// ENOSPC and out-of-range reads and trims EINVAL, as the protocol asks.
pub fn error_code(error: &EngineError, command: u16) -> u32 {
    match error {
        EngineError::OutOfRange { .. } => match command {
            consts::CMD_WRITE | consts::CMD_WRITE_ZEROES => consts::ENOSPC,
            _ => consts::EINVAL,
        },
        EngineError::ReadOnly => consts::EPERM,
        EngineError::DiscardDisabled => consts::EINVAL,
        EngineError::Io(e) => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => consts::ENOSPC,
            _ => consts::EIO,
        },
        EngineError::Worker(_) => consts::EIO,
        EngineError::FastZeroUnsupported => consts::ENOTSUP,
    }
}
