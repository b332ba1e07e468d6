//! Completions and man pages, read by the programs that consume them:
//! bash completes zc's commands and options, man renders every page
//! without a warning.
mod common;

use std::process::Command;

use common::process::zc_command;

#[test]
fn bash_completes_commands_and_options_from_the_script() {
    let script = zc_command(false)
        .args(["completions", "bash"])
        .output()
        .expect("running zc completions");
    assert!(script.status.success(), "zc completions bash failed");
    let script = String::from_utf8(script.stdout).expect("utf-8");
    let complete = |words: &str, cword: usize| -> String {
        // What bash does on TAB: the words so far, then the function.
        let program = format!(
            "{script}\nCOMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
             COMP_POINT=${{#COMP_LINE}}; _zc zc \"${{COMP_WORDS[$COMP_CWORD]}}\" \
             \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\""
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &program])
            .output()
            .expect("running bash");
        assert!(
            out.status.success(),
            "bash: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let commands = complete("zc rel", 1);
    assert!(
        commands.contains("relay"),
        "`zc rel<TAB>` offered: {commands}"
    );
    let options = complete("zc relay --win", 2);
    assert!(
        options.contains("--window"),
        "`zc relay --win<TAB>` offered: {options}"
    );
}

#[test]
fn man_renders_every_page_without_a_warning() {
    let dir = std::env::temp_dir().join(format!("zc-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = zc_command(false)
        .arg("man")
        .arg(&dir)
        .output()
        .expect("running zc man");
    assert!(
        out.status.success(),
        "zc man failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages: Vec<_> = std::fs::read_dir(&dir)
        .expect("the man directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    pages.sort();
    for cmd in ["zc", "zc-relay", "zc-agent", "zc-pair", "zc-bench"] {
        assert!(
            pages.iter().any(|p| p.ends_with(format!("{cmd}.1"))),
            "no {cmd}.1 among {pages:?}"
        );
    }
    for page in &pages {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            // Plain text: no bold overstrikes to search through.
            .env_remove("MAN_KEEP_FORMATTING")
            .output()
            .expect("running man (man-db)");
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "man {page:?} failed: {warnings}");
        assert!(
            warnings.trim().is_empty(),
            "man warns on {page:?}: {warnings}"
        );
        assert!(text.contains("NAME"), "{page:?} rendered no NAME section");
    }
    let relay = Command::new("man")
        .arg("-l")
        .arg(dir.join("zc-relay.1"))
        .env("MANWIDTH", "200")
        .output()
        .expect("man");
    let relay = String::from_utf8_lossy(&relay.stdout);
    assert!(
        relay.contains("--window") && relay.contains("--upstream"),
        "zc-relay.1 lacks its options:\n{relay}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
