//! `nbdcrypt kms`: inspect the configured KMIP key providers.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use super::config::{Config, Providers};
use super::Cli;

#[derive(Debug, Args)]
pub struct KmsArgs {
    #[command(subcommand)]
    pub command: KmsCommand,
}

#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// Connect to each server of a KMIP provider (all KMIP providers without PROVIDER), run
    /// Discover Versions and Query, and print reachability, protocol version and latency.
    Check {
        /// Key provider name from the configuration file.
        provider: Option<String>,
    },
}

pub async fn run(cli: &Cli, args: &KmsArgs) -> Result<()> {
    let KmsCommand::Check { provider } = &args.command;
    let config = Config::load(cli.config.as_deref())?;
    let providers = Providers::from_config(&config, cli.keystore.as_deref())?;
    let selected: Vec<_> = match provider {
        Some(name) => match providers.kmip().get(name) {
            Some(found) => vec![(name.clone(), found.clone())],
            None => bail!("{name:?} is not a KMIP key provider in the configuration"),
        },
        None => providers.kmip().iter().map(|(name, p)| (name.clone(), p.clone())).collect(),
    };
    if selected.is_empty() {
        bail!("the configuration defines no KMIP key provider (type = \"kmip\")");
    }

    let mut unreachable = 0;
    for (name, provider) in selected {
        outln!("key provider {name}:");
        for report in provider.check().await {
            match report.result {
                Ok(info) => outln!(
                    "  {}  reachable  KMIP {}  {} ms  {} operations  {}",
                    report.address,
                    info.version,
                    info.latency.as_millis(),
                    info.operations,
                    info.vendor.as_deref().unwrap_or("(no vendor identification)")
                ),
                Err(error) => {
                    unreachable += 1;
                    outln!("  {}  unreachable  {error}", report.address);
                }
            }
        }
    }
    if unreachable > 0 {
        bail!("{unreachable} KMIP server(s) failed the check");
    }
    Ok(())
}
