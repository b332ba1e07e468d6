//! `zc agent`, `zc pair`, `zc unpair`, `zc list`: the command-line side
//! of the agent.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use log::info;
use zc_user::{
    agent::{
        Agent,
        control::{self, DEFAULT_SOCKET},
        proto::{Request, Response},
    },
    engine::bpf::BpfEngine,
    watch::Watcher,
};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Control socket to serve.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Let members of this group (name or gid) use the control socket
    /// (it becomes 0660 and group-owned); without it only root can.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

#[derive(clap::Args)]
pub struct PairArgs {
    /// The process that owns both sockets (a proxy).
    #[arg(long, value_name = "PID")]
    pid: i32,
    /// The two sockets, as fd numbers in that process (see `ls -l
    /// /proc/PID/fd` or `ss -tnp`); give --fd twice.
    #[arg(long = "fd", value_name = "FD", num_args = 1, required = true)]
    fds: Vec<i32>,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct UnpairArgs {
    /// The pair's id, as `zc pair` and `zc list` print it.
    id: u64,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    json: bool,
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    crate::raise_fd_limit();
    let group = match &args.group {
        None => None,
        Some(g) => Some(resolve_group(g)?),
    };
    let progs = zc_user::probe::bpf_ready()
        .await
        .map_err(anyhow::Error::msg)
        .context("zc agent needs BPF")?;
    let watcher = Watcher::start().context("starting the socket watcher")?;
    let agent = Agent::new(BpfEngine::new(progs, watcher));
    let listener = control::bind_control(&args.socket, group)?;
    info!(
        "zc agent: serving {} ({})",
        args.socket.display(),
        match group {
            Some(g) => format!("root and group {g}"),
            None => "root only".into(),
        }
    );
    agent.serve(listener, crate::stop_signal()).await;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

fn resolve_group(g: &str) -> Result<u32> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(g).context("looking up the group")? {
        Some(gr) => Ok(gr.gid.as_raw()),
        None => bail!("no group named `{g}`"),
    }
}

fn answer(resp: Response) -> Result<Response> {
    if let Response::Error { kind, message } = resp {
        bail!("the agent refused ({kind:?}): {message}");
    }
    Ok(resp)
}

pub async fn pair(args: PairArgs) -> Result<()> {
    let [a, b] = args.fds[..] else {
        bail!("give exactly two sockets: --fd A --fd B");
    };
    let req = Request::PairPid {
        pid: args.pid,
        fds: [a, b],
    };
    if let Response::Paired { id, pair } = answer(control::call(&args.socket, &req)?)? {
        println!("pair {id}: {} <-> {}", pair.sockets[0], pair.sockets[1]);
    }
    Ok(())
}

pub async fn unpair(args: UnpairArgs) -> Result<()> {
    answer(control::call(
        &args.socket,
        &Request::Unpair { id: args.id },
    )?)?;
    println!("pair {} unpaired", args.id);
    Ok(())
}

pub async fn list(args: ListArgs) -> Result<()> {
    if let Response::Pairs { pairs } = answer(control::call(&args.socket, &Request::List)?)? {
        if args.json {
            println!("{}", serde_json::to_string(&pairs)?);
        } else if pairs.is_empty() {
            println!("no pairs");
        } else {
            println!("{:<5} {:<22} sockets", "id", "source");
            for p in pairs {
                println!(
                    "{:<5} {:<22} {} <-> {}",
                    p.id, p.source, p.sockets[0], p.sockets[1]
                );
            }
        }
    }
    Ok(())
}
