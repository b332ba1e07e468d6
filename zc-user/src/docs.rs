//! Shell completions and man pages, generated from the same clap
//! definitions that parse the command line, so they cannot drift.
use std::{io::Write, path::Path};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

use crate::Cli;

pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "zc", out);
}

/// zc.1, and zc-COMMAND.1 for each command.
pub fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command().name("zc");
    let write = |name: String, page: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut buf)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))
    };
    for sub in cmd.get_subcommands() {
        let name = format!("zc-{}", sub.get_name());
        write(
            name.clone(),
            sub.clone()
                .display_name(name.clone())
                .bin_name(format!("zc {}", sub.get_name())),
        )?;
    }
    write("zc".into(), cmd.clone())?;
    println!("man pages written to {}", dir.display());
    Ok(())
}
