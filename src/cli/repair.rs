//! `nbdcrypt repair`: rewrite both LUKS2 header copies from the one that is valid and newest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::Cli;
use crate::backend::{Backend, FileBackend};
use crate::volume::VolumeHeader;

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Volume file or block device. It must not be in use: repair takes the same exclusive
    /// lock as `serve`.
    pub volume: PathBuf,
}

pub async fn run(cli: &Cli, args: &RepairArgs) -> Result<()> {
    // repair needs no configuration, but a named file that is missing or invalid is still an error.
    super::config::Config::load(cli.config.as_deref())?;
    let path = &args.volume;
    let backend =
        FileBackend::open_exclusive(path).with_context(|| format!("opening {} failed", path.display()))?;
    let mut header = VolumeHeader::read(backend.file())
        .with_context(|| format!("{} has no valid header copy to repair from", path.display()))?;
    // The header may be fine while the data area is not, for a file truncated after create.
    // That is reported, since repairing the header does not make such a volume usable.
    if let Err(problem) = header.data_area(backend.len_bytes()) {
        eprintln!("warning: {}: the volume cannot be served: {problem}", path.display());
    }
    if !header.needs_repair {
        outln!(
            "{}: both header copies are valid and current (seqid {}); nothing to repair",
            path.display(),
            header.seqid
        );
        return Ok(());
    }

    let old_seqid = header.seqid;
    header
        .write(backend.file())
        .with_context(|| format!("rewriting the headers of {} failed", path.display()))?;

    // Read back: both copies must now be valid and current.
    let reread = VolumeHeader::read(backend.file())
        .with_context(|| format!("{} has no valid header after the rewrite", path.display()))?;
    if reread.needs_repair {
        anyhow::bail!(
            "{}: a header copy is still damaged after the rewrite; the device may be failing",
            path.display()
        );
    }
    outln!(
        "{}: rewrote both header copies from the valid one (seqid {old_seqid} -> {})",
        path.display(),
        reread.seqid
    );
    Ok(())
}
