//! eBPF-side logging reaches the `log` crate through aya-log.
//!
//! Its own test binary: it installs a capturing logger, and a process has
//! only one.
use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LINES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{} {}", record.target(), record.args()));
    }
    fn flush(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_program_log_lines_reach_user_space() {
    log::set_logger(&Capture).expect("logger");
    log::set_max_level(log::LevelFilter::Debug);
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs and needs root; run `cargo xtask test` as root"
    );
    let progs = zc_user::ebpf::Programs::load()
        .unwrap_or_else(|e| panic!("loading zc's BPF programs failed: {e}"));
    // A socket in the verdict map without a peer makes the program log
    // (at debug level) that it passes the bytes through.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    let key = progs.insert_unpaired_relay(&s).expect("insert");
    c.write_all(b"x").expect("write");
    let cookie = zc_user::sys::socket_cookie(std::os::fd::AsFd::as_fd(&s)).expect("SO_COOKIE");
    let want = format!("zc_verdict: unpaired socket {cookie}, passing");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if LINES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.contains(&want))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the eBPF log line `{want}` never arrived; got: {:?}",
            LINES.lock().unwrap_or_else(|p| p.into_inner())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    progs.unpair(&[key]);
}
