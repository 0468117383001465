//! `nbdcrypt info`: print a volume's header without key material.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::Cli;
use crate::backend::{Backend, FileBackend};
use crate::volume::{VolumeHeader, CIPHER};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Volume file or block device.
    pub volume: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, args: &InfoArgs) -> Result<()> {
    // info needs no configuration, but a named file that is missing or invalid is still an error.
    super::config::Config::load(cli.config.as_deref())?;
    let file = std::fs::File::open(&args.volume)
        .with_context(|| format!("opening {} failed", args.volume.display()))?;
    let backend = FileBackend::from_file(file)?;
    let header = VolumeHeader::read(backend.file())
        .with_context(|| format!("{} is not a usable nbdcrypt volume", args.volume.display()))?;
    let device_len = backend.len_bytes();
    let (data_offset, data_len) = header.data_area(device_len)?;
    let segment = &header.metadata.segment;
    let token = header.metadata.token.as_ref();

    let report = serde_json::json!({
        "path": args.volume.display().to_string(),
        "format": "LUKS2",
        "uuid": header.uuid,
        "label": header.label,
        "seqid": header.seqid,
        "header_needs_repair": header.needs_repair,
        "device_bytes": device_len,
        "data_offset": data_offset,
        "export_bytes": data_len,
        "sector_size": segment.sector_size.bytes(),
        "cipher": CIPHER,
        "key_bits": 512,
        "key_provider": token.map(|t| t.key_provider.clone()),
        "key_id": token.map(|t| t.key_id.clone()),
        "wrap_alg": token.map(|t| t.wrap_alg.as_str()),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }

    outln!("path:          {}", args.volume.display());
    outln!("format:        LUKS2");
    outln!("uuid:          {}", header.uuid);
    outln!("device size:   {device_len} bytes");
    outln!("data offset:   {data_offset} bytes");
    outln!("export size:   {data_len} bytes ({})", human_bytes(data_len));
    outln!("sector size:   {}", segment.sector_size.bytes());
    outln!("cipher:        {CIPHER}, 512-bit key");
    match token {
        Some(token) => {
            outln!("key provider:  {}", token.key_provider);
            outln!("key id:        {}", token.key_id);
            outln!("key wrap:      {}", token.wrap_alg.as_str());
        }
        None => outln!("key provider:  none (no nbdcrypt-kms token; a cryptsetup volume)"),
    }
    if header.needs_repair {
        outln!("warning:       one header copy is damaged or stale; the other copy was used");
        outln!("               run `nbdcrypt repair {}` to rewrite it", args.volume.display());
    }
    Ok(())
}

/// Formats a byte count with the largest IEC unit that keeps it at least 1.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
