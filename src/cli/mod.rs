//! The `nbdcrypt` command line.

/// Writes a formatted line to standard output like `println!`, but returns an error instead
/// of panicking when the write fails, and succeeds quietly when the reader closed the pipe
/// (`nbdcrypt info vol.img | head -1`).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(&format!("{}\n", format_args!($($arg)*)))?
    };
}

pub mod config;
mod create;
mod info;
mod kms;
mod repair;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Serve LUKS2-encrypted block devices over NBD.
#[derive(Debug, Parser)]
#[command(name = "nbdcrypt", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); command-line flags override its values.
    #[arg(long, global = true, value_name = "FILE", env = "NBDCRYPT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Local keystore directory, overriding the configured path [default:
    /// /var/lib/nbdcrypt/keys for root, else $XDG_DATA_HOME/nbdcrypt/keys, else
    /// ~/.local/share/nbdcrypt/keys].
    #[arg(long, global = true, value_name = "DIR", env = "NBDCRYPT_KEYSTORE")]
    pub keystore: Option<PathBuf>,

    /// Log filter, for example "info" or "nbdcrypt=debug" [default: info, or $RUST_LOG].
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an encrypted LUKS2 volume on a file or block device.
    Create(create::CreateArgs),
    /// Serve volumes over NBD until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Print a volume's header: format, UUID, sizes, cipher, key provider and key id.
    Info(info::InfoArgs),
    /// Check the KMIP key providers: reachability, protocol version and latency per server.
    Kms(kms::KmsArgs),
    /// Rewrite a damaged or stale LUKS2 header copy from the valid one.
    Repair(repair::RepairArgs),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());

    if let Err(e) = crate::daemon::disable_core_dumps() {
        tracing::warn!(error = %e, "could not mark the process non-dumpable; keys could appear in core dumps");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Create(ref args) => create::run(&cli, args).await,
            Command::Serve(ref args) => serve::run(&cli, args).await,
            Command::Info(ref args) => info::run(&cli, args).await,
            Command::Kms(ref args) => kms::run(&cli, args).await,
            Command::Repair(ref args) => repair::run(&cli, args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: Option<&str>) {
    let filter = match filter {
        Some(text) => EnvFilter::new(text),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Writes `text` to standard output; a closed pipe counts as success.
pub(crate) fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}
