//! `nbdcrypt create`: format a LUKS2 volume whose volume key is wrapped by a key provider.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use zeroize::Zeroizing;

use super::config::{parse_size, Config, Providers};
use super::info::human_bytes;
use super::Cli;
use crate::backend::{Backend, FileBackend, ZeroMode};
use crate::crypto::{SectorCipher, SectorSize, VolumeKey};
use crate::engine::{Export, ExportOptions};
use crate::keys::KeyProvider;
use crate::volume::{KmsToken, VolumeHeader, DATA_OFFSET};

/// Largest regular file Linux allows (the file offset is a signed 64-bit value).
const MAX_FILE_BYTES: u64 = i64::MAX as u64;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Volume file or block device. A missing file is created sparse.
    pub volume: PathBuf,
    /// Usable (export) size, with an optional K, M, G or T suffix (powers of 1024).
    /// Required for a new file; defaults to what an existing file or device holds.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Encryption sector size in bytes.
    #[arg(long, default_value = "4096", value_parser = parse_sector_size)]
    pub sector_size: u32,
    /// Key provider that creates and holds the key-encryption key [default: the configured
    /// default_key_provider, or "local"].
    #[arg(long, value_name = "NAME")]
    pub key_provider: Option<String>,
    /// Overwrite a file or device that already carries a LUKS header or a filesystem.
    #[arg(long)]
    pub force: bool,
    /// Write encrypted zeros over the whole data area, so old contents read as zeros
    /// instead of noise.
    #[arg(long)]
    pub wipe: bool,
}

fn parse_sector_size(text: &str) -> Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{text} is not a supported sector size: use 4096 or 512")),
    }
}

pub async fn run(cli: &Cli, args: &CreateArgs) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let providers = Providers::from_config(&config, cli.keystore.as_deref())?;
    let provider = providers.get(args.key_provider.as_deref())?;
    let sector_size = SectorSize::from_bytes(args.sector_size)?;
    let requested = args.size.as_deref().map(parse_size).transpose()?;
    if let Some(size) = requested {
        if size < sector_size.len_u64() {
            bail!("size {size} is smaller than one {}-byte sector", sector_size.bytes());
        }
        if size > MAX_FILE_BYTES - DATA_OFFSET - sector_size.len_u64() {
            bail!("size {size} is too large: a file holds at most {MAX_FILE_BYTES} bytes, including the 16 MiB header area");
        }
    }

    // A new file is built under a temporary name and linked into place only when complete,
    // so a failed or interrupted create leaves nothing at the path, and two creates of one
    // path cannot both succeed. The temporary file is removed when `staging` drops.
    let (backend, segment_size, staging) =
        prepare_backing_store(&args.volume, requested, sector_size, args.force)?;
    let (header, data_len, key_id) =
        format_volume(args, backend, &*provider, segment_size, sector_size).await?;
    if let Some(staging) = &staging {
        staging.publish()?;
    }

    outln!("created {}", args.volume.display());
    outln!("uuid:          {}", header.uuid);
    outln!("export size:   {data_len} bytes ({})", human_bytes(data_len));
    outln!("sector size:   {}", sector_size.bytes());
    outln!("key provider:  {}", provider.name());
    outln!("key id:        {key_id}");
    Ok(())
}

/// Creates the key-encryption key, then clears the header area, wipes the data area when
/// asked, and writes the header last. A key provider failure therefore changes nothing on
/// disk, and an interrupted wipe leaves no header that would make the volume look finished.
/// Returns the header, the export size and the key id.
async fn format_volume(
    args: &CreateArgs,
    backend: FileBackend,
    provider: &dyn KeyProvider,
    segment_size: Option<u64>,
    sector_size: SectorSize,
) -> Result<(VolumeHeader, u64, String)> {
    let backend = Arc::new(backend);
    let uuid = uuid::Uuid::new_v4().to_string();
    let volume_key = VolumeKey::generate()?;
    let key_id = provider
        .create_key(&uuid)
        .await
        .with_context(|| format!("key provider {:?} could not create a key", provider.name()))?;
    let wrapped = provider.wrap_volume_key(&key_id, &volume_key).await?;
    let token = KmsToken {
        key_provider: provider.name().to_string(),
        key_id: key_id.clone(),
        wrap_alg: wrapped.alg,
        wrapped_key: Zeroizing::new(wrapped.bytes.to_vec()),
    };

    let mut header = VolumeHeader::new(uuid, &volume_key, segment_size, sector_size, token)?;
    let (data_offset, data_len) = header.data_area(backend.len_bytes())?;

    // Remove whatever was in the header and keyslot areas (an old LUKS keyslot contains key
    // material) before the new header goes in.
    backend
        .write_zeroes(0, DATA_OFFSET, ZeroMode { may_unmap: true, fast_only: false })
        .with_context(|| format!("clearing the header area of {} failed", args.volume.display()))?;
    if args.wipe {
        wipe(&backend, &volume_key, sector_size, data_offset, data_len)?;
    }
    header.write(backend.file()).context("writing the LUKS2 header failed")?;
    Ok((header, data_len, key_id))
}

/// A new volume file under a temporary name in the directory of its final path.
struct Staging {
    temporary: PathBuf,
    path: PathBuf,
}

impl Staging {
    /// Links the finished file at its final path; fails, leaving that path alone, when
    /// anything appeared there meanwhile.
    fn publish(&self) -> Result<()> {
        std::fs::hard_link(&self.temporary, &self.path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} was created by someone else while this volume was being made",
                    self.path.display()
                )
            } else {
                anyhow::Error::new(e)
                    .context(format!("linking the new volume to {} failed", self.path.display()))
            }
        })?;
        // The temporary name is removed on drop; the volume lives on under its final path.
        let directory = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(directory)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing directory {} failed", directory.display()))?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.temporary) {
            tracing::warn!(path = %self.temporary.display(), error = %e, "removing the temporary volume file failed");
        }
    }
}

/// Opens or creates the backing store, checks it is safe to overwrite, and sizes it.
/// Returns the store, the fixed segment size (`None` for "to the end of the device"), and
/// for a new file the temporary name it was created under.
fn prepare_backing_store(
    path: &Path,
    requested: Option<u64>,
    sector_size: SectorSize,
    force: bool,
) -> Result<(FileBackend, Option<u64>, Option<Staging>)> {
    let sector = sector_size.len_u64();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => Some(metadata),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot access {}", path.display())),
    };

    let Some(metadata) = metadata else {
        if std::fs::symlink_metadata(path).is_ok() {
            bail!("{} is a symbolic link to a missing file; remove it or give its target", path.display());
        }
        let size = requested
            .with_context(|| format!("{} does not exist; give --size to create it", path.display()))?;
        let size = size.div_ceil(sector) * sector;
        let staging = new_staging_file(path)?;
        let file = OpenOptions::new().write(true).open(&staging.temporary)?;
        file.set_len(DATA_OFFSET + size).with_context(|| format!("sizing {} failed", path.display()))?;
        drop(file);
        let backend = FileBackend::open_exclusive(&staging.temporary)?;
        return Ok((backend, Some(size), Some(staging)));
    };

    if !metadata.is_file() && !metadata.file_type().is_block_device() {
        bail!("{} is neither a regular file nor a block device", path.display());
    }
    let backend =
        FileBackend::open_exclusive(path).with_context(|| format!("opening {} failed", path.display()))?;
    if let Some(signature) = detect_signature(backend.file())? {
        if !force {
            bail!(
                "{} already contains {signature}; refusing to overwrite it (use --force to destroy its contents)",
                path.display()
            );
        }
        tracing::warn!(path = %path.display(), signature, "overwriting existing contents (--force)");
    }

    if backend.is_block_device() {
        let available = backend.len_bytes().saturating_sub(DATA_OFFSET) / sector * sector;
        if available == 0 {
            bail!("{} is too small: it must hold the 16 MiB header area plus one sector", path.display());
        }
        return match requested.map(|size| size.div_ceil(sector) * sector) {
            Some(size) if size > available => {
                bail!("--size {size} exceeds the {available} bytes the device holds after the header")
            }
            Some(size) => Ok((backend, Some(size), None)),
            None => Ok((backend, None, None)),
        };
    }

    // A regular file gets a fixed segment size, so a file that was later truncated fails to
    // open instead of being served smaller.
    match requested {
        Some(size) => {
            let size = size.div_ceil(sector) * sector;
            if DATA_OFFSET + size < backend.len_bytes() && !force {
                bail!(
                    "--size {size} would truncate {} from {} bytes; use --force to shrink it",
                    path.display(),
                    backend.len_bytes()
                );
            }
            backend.file().set_len(DATA_OFFSET + size)?;
            drop(backend);
            Ok((FileBackend::open_exclusive(path)?, Some(size), None))
        }
        None if backend.len_bytes() >= DATA_OFFSET + sector => {
            let size = (backend.len_bytes() - DATA_OFFSET) / sector * sector;
            Ok((backend, Some(size), None))
        }
        None => bail!(
            "{} holds {} bytes, too small for the 16 MiB header area plus one sector; give --size",
            path.display(),
            backend.len_bytes()
        ),
    }
}

/// Creates an empty file with mode 0600 under a fresh temporary name next to `path`.
fn new_staging_file(path: &Path) -> Result<Staging> {
    let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let temporary = path.with_file_name(format!(".{}.nbdcrypt-{suffix}.tmp", name.to_string_lossy()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("creating {} failed", temporary.display()))?;
    Ok(Staging { temporary, path: path.to_path_buf() })
}

/// Names a known on-disk signature found in the first bytes of `file`, if any.
fn detect_signature(file: &std::fs::File) -> Result<Option<&'static str>> {
    let mut head = vec![0u8; 0x10048];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    let head = &head[..filled];
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);

    let checks: [(bool, &'static str); 14] = [
        (at(0, b"LUKS\xba\xbe"), "a LUKS header"),
        (at(0x4000, b"SKUL\xba\xbe"), "a LUKS2 secondary header"),
        (at(1080, &[0x53, 0xef]), "an ext2/ext3/ext4 file system"),
        (at(0, b"XFSB"), "an XFS file system"),
        (at(0x10040, b"_BHRfS_M"), "a Btrfs file system"),
        (at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE"), "a swap area"),
        (at(512, b"EFI PART"), "a GPT partition table"),
        (at(536, b"LABELONE") || at(512, b"LABELONE"), "an LVM2 physical volume"),
        (at(0x8001, b"CD001"), "an ISO 9660 file system"),
        (at(510, &[0x55, 0xaa]), "a boot sector or MBR partition table"),
        // Virtual disk images, which `create` on an image file would otherwise destroy.
        (at(0, b"QFI\xfb"), "a qcow2 image"),
        (at(0, b"KDMV"), "a VMDK image"),
        (at(0, b"vhdxfile"), "a VHDX image"),
        (at(0x40, &[0x7f, 0x10, 0xda, 0xbe]), "a VirtualBox VDI image"),
    ];
    Ok(checks.into_iter().find(|(found, _)| *found).map(|(_, name)| name))
}

fn wipe(
    backend: &Arc<FileBackend>,
    key: &VolumeKey,
    sector_size: SectorSize,
    offset: u64,
    len: u64,
) -> Result<()> {
    let options =
        ExportOptions { name: String::new(), description: String::new(), discard: false, read_only: false };
    let export = Export::new(options, backend.clone(), SectorCipher::new(key, sector_size), offset, len);
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "wiping {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    export.wipe_blocking(|done| bar.set_position(done)).context("wiping the data area failed")?;
    bar.finish();
    Ok(())
}
