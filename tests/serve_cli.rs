//! The `flashcall` binary on bad input: one clear error line naming the
//! file, key or port, a non-zero exit, never a panic. And the shipped
//! defaults: `check-config` and `serve --help` from the repository root.

mod support;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{config, test_dir, SANDBOX};

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = pipe {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `flashcall ARGS` in `cwd`, killing it after 20 s.
fn flashcall(args: &[&str], cwd: &Path) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashcall"))
        .args(args)
        .current_dir(cwd)
        .env_remove("FLASHCALL_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flashcall");
    // Both pipes are drained while we wait: a child writing more than a
    // pipe holds (a long backtrace) would otherwise block until the kill.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "flashcall {args:?} still running after 20 s; stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

impl Out {
    /// A failure: non-zero exit, no panic, and exactly one `error:` line
    /// that contains every one of `names`. `only_line`: nothing else on
    /// stderr (serve also logs its start-up before it fails).
    fn assert_error(&self, names: &[&str], only_line: bool) -> String {
        assert!(!self.stderr.contains("panicked"), "panic:\n{}", self.stderr);
        assert!(!self.stderr.contains("stack backtrace"), "{}", self.stderr);
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "exit {:?}; stderr:\n{}",
            self.code,
            self.stderr
        );
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line:\n{}", self.stderr);
        if only_line {
            assert_eq!(
                self.stderr.trim_end().lines().count(),
                1,
                "only the error line on stderr:\n{}",
                self.stderr
            );
        }
        let line = errors[0];
        for n in names {
            assert!(line.contains(n), "{n:?} not named in: {line}");
        }
        line.to_string()
    }
}

fn check_config(path: &Path) -> Out {
    flashcall(
        &["check-config", "--config", path.to_str().unwrap()],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
}

/// A sandbox config (support::config) with `extra` appended.
fn cfg(name: &str, extra: &str) -> std::path::PathBuf {
    config(&test_dir(name), "+44770090XXXX\n", SANDBOX, extra)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_on_the_shipped_config() {
    // The default path, from the repository root, as `cargo run` would.
    for args in [
        &["check-config"][..],
        &["check-config", "--config", "config/flashcall.toml"][..],
    ] {
        let o = flashcall(args, repo());
        assert_eq!(o.code, Some(0), "{args:?}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.contains("(100.0%)"), "{}", o.stdout);
        assert!(o.stdout.contains("10000 of 10000"), "{}", o.stdout);
        assert!(o.stdout.contains("sandbox: ON"), "{}", o.stdout);
        assert!(o.stderr.trim().is_empty(), "{}", o.stderr);
    }
}

#[test]
fn serve_help_documents_the_default_config() {
    let o = flashcall(&["serve", "--help"], repo());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("--config"), "{}", o.stdout);
    assert!(o.stdout.contains("config/flashcall.toml"), "{}", o.stdout);
    // With no subcommand the binary serves; its help says so.
    let o = flashcall(&["--help"], repo());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("default command"), "{}", o.stdout);
}

#[test]
fn unknown_key_is_named() {
    let path = cfg("cli-unknown-key", "[call]\nring_mss = 3\n");
    let line = check_config(&path).assert_error(&["ring_mss", "flashcall.toml"], true);
    assert!(line.contains("call.ring_mss"), "{line}");
}

#[test]
fn bad_values_are_named() {
    // support::config has a [pool] table already: add the key to it.
    let set = |name: &str, line: &str| {
        let path = cfg(name, "");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("[pool]\n", &format!("[pool]\n{line}\n"), 1),
        )
        .unwrap();
        path
    };
    let path = set("cli-bad-value", "code_length = 0");
    check_config(&path).assert_error(&["pool.code_length", "flashcall.toml"], true);
    let path = set("cli-bad-type", "code_length = \"four\"");
    check_config(&path).assert_error(&["pool.code_length", "line "], true);
    let path = cfg("cli-bad-timeout", "[call]\nring_timeout_ms = 0\n");
    check_config(&path).assert_error(&["call.ring_timeout_ms"], true);
    // A table given twice names the table.
    let path = cfg("cli-dup-table", "[pool]\ncode_length = 4\n");
    check_config(&path).assert_error(&["[pool]", "duplicate"], true);
    // A listen address without a port.
    let path = cfg("cli-bad-listen", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1\"", 1);
    std::fs::write(&path, text).unwrap();
    check_config(&path).assert_error(&["http.listen"], true);
}

#[test]
fn missing_config_file_is_named() {
    let path = test_dir("cli-missing").join("nope.toml");
    check_config(&path).assert_error(&["nope.toml", "cannot read config"], true);
}

#[test]
fn broken_pool_file_is_named_with_its_line() {
    let dir = test_dir("cli-pool");
    let path = config(&dir, "# pool\n+447700900123\nnot-a-number\n", SANDBOX, "");
    let pool = dir.join("numbers.txt");
    check_config(&path).assert_error(&[&format!("{}:3", pool.display())], true);
    // A pool file that is not there.
    std::fs::remove_file(&pool).unwrap();
    check_config(&path).assert_error(&[&pool.display().to_string()], true);
}

#[test]
fn sandbox_beside_a_real_trunk_is_refused() {
    let dir = test_dir("cli-sandbox-trunk");
    let trunks = format!("{SANDBOX}[[trunks]]\nname = \"main\"\naddress = \"127.0.0.1:5070\"\n");
    let path = config(&dir, "+44770090XXXX\n", &trunks, "");
    check_config(&path).assert_error(&["sandbox.enabled", "trunks"], true);
    // serve refuses it the same way, before binding anything.
    let o = flashcall(&["serve", "--config", path.to_str().unwrap()], repo());
    o.assert_error(&["sandbox.enabled"], true);
}

/// Rewrites `[section]\nlisten = "127.0.0.1:0"` of a support config.
fn with_listen(path: &Path, section: &str, port: u16) {
    let text = std::fs::read_to_string(path).unwrap();
    let from = format!("[{section}]\nlisten = \"127.0.0.1:0\"");
    assert!(text.contains(&from), "{text}");
    let to = format!("[{section}]\nlisten = \"127.0.0.1:{port}\"");
    std::fs::write(path, text.replace(&from, &to)).unwrap();
}

#[test]
fn serve_with_the_http_port_taken_names_it() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = cfg("cli-http-taken", "");
    with_listen(&path, "http", port);
    let o = flashcall(&["serve", "--config", path.to_str().unwrap()], repo());
    o.assert_error(&["http.listen", &format!("127.0.0.1:{port}")], false);
    drop(taken);
}

#[test]
fn serve_with_the_sip_port_taken_names_it() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = cfg("cli-sip-taken", "");
    with_listen(&path, "sip", port);
    let o = flashcall(&["serve", "--config", path.to_str().unwrap()], repo());
    o.assert_error(&["sip.listen", &format!("127.0.0.1:{port}")], false);
    drop(taken);
}

#[test]
fn bad_arguments_are_a_usage_error_not_a_panic() {
    let o = flashcall(&["serve", "--no-such-flag"], repo());
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("--no-such-flag"), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}
