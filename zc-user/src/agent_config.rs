//! `zc agent --config PATH`: the agent's flags from a TOML file.
//!
//! Each key is a flag's long name as written on the command line, dashes
//! and all (`pin-dir = "/sys/fs/bpf/zc"`); a flag given on the command
//! line beats the file, which beats the default. The file's values are
//! turned into the flags they stand for and handed to clap with the
//! command line, so they meet the same checks (ranges, address syntax,
//! `--short-circuit` needing `--cgroup`). A key the agent does not know, a
//! value of the wrong type or one its flag refuses is a usage error
//! (exit status 2) naming the file, the line and the key, before anything
//! is touched.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
use serde::Deserialize;

use crate::{Cli, agent_cmd::DataPathArg};

/// Where `zc agent` looks for its file when --config is not given; used
/// only if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/zc/agent.toml";

/// The file's keys: every flag of `zc agent` but --config itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AgentFile {
    socket: Option<PathBuf>,
    group: Option<String>,
    pin_dir: Option<PathBuf>,
    unpin_on_exit: Option<bool>,
    cleanup: Option<bool>,
    data_path: Option<DataPathArg>,
    cgroup: Option<PathBuf>,
    short_circuit: Option<bool>,
    max_stop: Option<u64>,
    metrics: Option<String>,
}

/// One key of the file as the flag it stands for: its clap id and the
/// arguments that give it.
struct Setting {
    id: &'static str,
    args: Vec<OsString>,
}

impl AgentFile {
    fn settings(self) -> Vec<Setting> {
        let mut out = Vec::new();
        let mut value = |id: &'static str, v: Option<OsString>| {
            if let Some(v) = v {
                out.push(Setting {
                    id,
                    args: vec![format!("--{}", id.replace('_', "-")).into(), v],
                });
            }
        };
        value("socket", self.socket.map(Into::into));
        value("group", self.group.map(Into::into));
        value("pin_dir", self.pin_dir.map(Into::into));
        value(
            "data_path",
            self.data_path
                .and_then(|d| clap::ValueEnum::to_possible_value(&d))
                .map(|v| v.get_name().into()),
        );
        value("cgroup", self.cgroup.map(Into::into));
        value("max_stop", self.max_stop.map(|n| n.to_string().into()));
        value("metrics", self.metrics.map(Into::into));
        // A flag set false in the file is simply not given.
        for (id, on) in [
            ("unpin_on_exit", self.unpin_on_exit),
            ("cleanup", self.cleanup),
            ("short_circuit", self.short_circuit),
        ] {
            if on == Some(true) {
                out.push(Setting {
                    id,
                    args: vec![format!("--{}", id.replace('_', "-")).into()],
                });
            }
        }
        out
    }
}

/// Parses the command line, with `zc agent`'s file applied under it.
/// Exits as clap does (status 2) on a usage error, the file's included.
pub fn parse() -> Cli {
    parse_from(std::env::args_os().collect())
}

fn parse_from(argv: Vec<OsString>) -> Cli {
    let cmd = Cli::command();
    let matches = cmd.clone().get_matches_from(argv.clone());
    let Some(("agent", agent)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    };
    let explicit = agent.value_source("config") == Some(ValueSource::CommandLine);
    let path = agent
        .get_one::<PathBuf>("config")
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let settings = match read(&path, explicit) {
        Ok(s) => s,
        Err(msg) => usage_error(msg),
    };
    let mut full = argv;
    for s in settings {
        if agent.value_source(s.id) != Some(ValueSource::CommandLine) {
            full.extend(s.args);
        }
    }
    let matches = cmd.get_matches_from(full);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn usage_error(msg: String) -> ! {
    let mut cmd = Cli::command();
    cmd.build();
    match cmd.find_subcommand_mut("agent") {
        Some(agent) => agent.error(clap::error::ErrorKind::InvalidValue, msg),
        None => cmd.error(clap::error::ErrorKind::InvalidValue, msg),
    }
    .exit()
}

/// The file's settings, each checked by its flag's own parser; none when
/// the default file does not exist.
fn read(path: &Path, explicit: bool) -> Result<Vec<Setting>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("--config {}: {e}", path.display())),
    };
    let file: AgentFile = toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let line = text.get(..at).map_or(1, |t| t.matches('\n').count() + 1);
        let key = key_at(&text, line).unwrap_or("?");
        format!(
            "{}:{line}: key `{key}`: {}",
            path.display(),
            e.message().trim()
        )
    })?;
    let settings = file.settings();
    for s in &settings {
        let mut alone: Vec<OsString> = vec!["zc".into(), "agent".into()];
        alone.extend(s.args.iter().cloned());
        // Only the value itself is judged here; what it needs of other
        // flags (short-circuit needs cgroup) is judged with the command
        // line, which may give them.
        if let Err(e) = Cli::command().try_get_matches_from(alone)
            && matches!(
                e.kind(),
                clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
            )
        {
            let key = s.id.replace('_', "-");
            let why = first_line(&e.to_string()).to_string();
            return Err(format!(
                "{}:{}: key `{key}`: {why}",
                path.display(),
                line_of(&text, &key).map_or("?".into(), |l| l.to_string()),
            ));
        }
    }
    Ok(settings)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim_start_matches("error: ")
}

/// The key set on `line` (from 1), if one is.
fn key_at(text: &str, line: usize) -> Option<&str> {
    let l = text.lines().nth(line.checked_sub(1)?)?.trim();
    let key = match l.strip_prefix('[') {
        // A table: the file has none.
        Some(table) => table.trim_end_matches(']'),
        None => l.split_once('=')?.0,
    };
    Some(key.trim().trim_matches('"')).filter(|k| !k.is_empty())
}

/// The line (from 1) where `key` is set.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of `zc agent` but --config (and help) has a key.
    #[test]
    fn every_agent_flag_has_a_key() {
        let cmd = Cli::command();
        let agent = cmd.find_subcommand("agent").expect("zc agent");
        for arg in agent.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "config" | "help") {
                continue;
            }
            let key = id.replace('_', "-");
            let file = format!("{key} = {}", sample(id));
            let parsed: Result<AgentFile, _> = toml::from_str(&file);
            let settings = parsed
                .unwrap_or_else(|e| panic!("`zc agent --{key}` has no key in the file: {e}"))
                .settings();
            assert!(
                settings.iter().any(|s| s.id == id),
                "the key `{key}` sets no flag"
            );
        }
    }

    fn sample(id: &str) -> &'static str {
        match id {
            "unpin_on_exit" | "cleanup" | "short_circuit" => "true",
            "max_stop" => "20",
            "data_path" => "\"splice\"",
            _ => "\"x\"",
        }
    }

    /// deploy/agent.toml names every key, each commented out with its
    /// default, and parses once uncommented.
    #[test]
    fn the_example_file_documents_every_key() {
        let text = include_str!("../../deploy/agent.toml");
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# ").filter(|r| r.contains(" = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        toml::from_str::<AgentFile>(&uncommented)
            .unwrap_or_else(|e| panic!("deploy/agent.toml, uncommented: {e}\n{uncommented}"));
        let cmd = Cli::command();
        let agent = cmd.find_subcommand("agent").expect("zc agent");
        for arg in agent.get_arguments() {
            let key = arg.get_id().as_str().replace('_', "-");
            if matches!(key.as_str(), "config" | "help") {
                continue;
            }
            assert!(
                line_of(&uncommented, &key).is_some(),
                "deploy/agent.toml does not show `{key}`"
            );
        }
    }

    #[test]
    fn line_of_finds_the_key_not_a_longer_one() {
        let text = "# socket = 1\nsocket-x = 2\n  socket = \"/a\"\n";
        assert_eq!(line_of(text, "socket"), Some(3));
    }
}
