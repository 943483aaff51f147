//! `driveblk rekey`: wraps an encrypted volume's data key under a new key
//! or passphrase (only `volume.json` changes; docs/encryption.md).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::remote::RemoteArgs;
use crate::volume::crypto::{self, KeySource};

#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// The encrypted volume (its current key: --key-file, --key-env or --passphrase).
    pub url: String,
    /// The new key: a file holding it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["new_key_env", "new_passphrase"])]
    pub new_key_file: Option<PathBuf>,
    /// The new key: the environment variable holding it.
    #[arg(long, value_name = "VAR", conflicts_with = "new_passphrase")]
    pub new_key_env: Option<String>,
    /// The new key: a passphrase, asked (twice) on the terminal.
    #[arg(long)]
    pub new_passphrase: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub fn run(a: RekeyArgs) -> anyhow::Result<()> {
    let src = match (&a.new_key_file, &a.new_key_env, a.new_passphrase) {
        (Some(p), _, _) => KeySource::File(p.clone()),
        (_, Some(v), _) => KeySource::Env(v.clone()),
        (_, _, true) => KeySource::Prompt,
        _ => bail!("give the new key with --new-key-file, --new-key-env or --new-passphrase"),
    };
    let new = src.load().map_err(anyhow::Error::msg)?;
    if src == KeySource::Prompt {
        let again = src.load().map_err(anyhow::Error::msg)?;
        if again.secret() != new.secret() {
            bail!("the two passphrases differ; nothing changed");
        }
    }
    let opts = a.remote.options();
    if opts.key.is_none() {
        bail!("give the volume's current key with --key-file, --key-env or --passphrase");
    }
    let id = crypto::rekey(&a.url, &opts, &new).with_context(|| format!("rekey of {}", a.url))?;
    println!(
        "rekeyed {}: its data key (id {id}) is now wrapped by the {}; only volume.json was rewritten. \
         Anyone who already had the old key may still hold the data key: to cut them off, import the data again with --encrypt.",
        a.url, new.source
    );
    Ok(())
}
