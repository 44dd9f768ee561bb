//! Child processes under a supervisor that dies with the test process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        pause(Duration::from_millis(50));
    }
    bail!("nothing listened on 127.0.0.1:{port} within {timeout:?}")
}

/// A blocking sleep for the harness's synchronous start-up (never on a
/// runtime's hot path).
#[allow(clippy::disallowed_methods)]
pub fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Fails with the install command when `binary` is not on this machine.
pub fn require_binary(binary: &str, package: &str) -> anyhow::Result<String> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return Ok(p.display().to_string());
        }
    }
    bail!(
        "`{binary}` is not installed: run `apt-get install {package}` (or ./deploy/local.sh test, which installs it)"
    )
}

/// A server process under an `sh` supervisor: closing the supervisor's stdin
/// (explicitly, or because this process died) makes it stop the server, wait
/// for it, and remove `cleanup_dir` if one was given.
pub struct Supervised {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Supervised {
    pub fn spawn(
        program: &str,
        args: &[String],
        cleanup_dir: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        const SCRIPT: &str = r#"dir="$1"; shift; "$@" & pid=$!; cat >/dev/null; kill "$pid" 2>/dev/null; wait "$pid"; [ -n "$dir" ] && rm -rf "$dir"; exit 0"#;
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("sh")
            .arg(
                cleanup_dir
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            )
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawn {program}"))?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Stops the server and waits until it has exited.
    pub fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The pid of the server itself (the supervisor's child), if running.
    pub fn server_pid(&self) -> Option<u32> {
        let sh = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).ok()?;
        // Its children are the server and the `cat` that waits on stdin.
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|comm| comm.trim() != "cat")
            })
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal blocking HTTP/1.0 request, for the harness's synchronous paths
/// (readiness probes, Drop). Returns (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
