//! A real `clickhouse-server` on free ports with everything in a temp dir.
//!
//! Debian's 18.16 starts as root from a config file whose paths and ports
//! point into the temp dir; users come from our own users.xml (the same one
//! the local stack uses), so the harness does not depend on /etc.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::process::{Supervised, free_port, http_request, pause, require_binary};

pub struct ClickHouseServer {
    http_port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    process: Supervised,
}

impl ClickHouseServer {
    /// A server a test owns (restartable; data kept across restarts).
    pub fn start() -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("tollgate-ch-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let (http_port, process) = start_in(&dir, false)?;
        Ok(Self {
            http_port,
            dir,
            _tmp: Some(tmp),
            process,
        })
    }

    pub(super) fn start_for_process() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-ch-")
            .tempdir()?
            .keep();
        let (http_port, process) = start_in(&dir, true)?;
        Ok(Self {
            http_port,
            dir,
            _tmp: None,
            process,
        })
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Runs one statement over HTTP, synchronously. Returns the body.
    pub fn exec(&self, sql: &str) -> anyhow::Result<String> {
        let (status, body) = http_request(self.http_port, "POST", "/", sql)?;
        if status != 200 {
            bail!("clickhouse answered {status} to {sql:?}: {body}");
        }
        Ok(body)
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// `kill -9` of the server itself (no shutdown), then the supervisor.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.process.server_pid() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
        self.process.stop();
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.stop();
        self.process = spawn(&self.dir, self._tmp.is_none())?;
        wait_ready(self.http_port, &mut self.process, &self.dir)
    }
}

fn start_in(dir: &Path, cleanup: bool) -> anyhow::Result<(u16, Supervised)> {
    let http_port = free_port()?;
    let tcp_port = free_port()?;
    write_config(dir, http_port, tcp_port)?;
    let mut process = spawn(dir, cleanup)?;
    wait_ready(http_port, &mut process, dir)?;
    Ok((http_port, process))
}

fn spawn(dir: &Path, cleanup: bool) -> anyhow::Result<Supervised> {
    let bin = require_binary("clickhouse-server", "clickhouse-server")?;
    let args = vec![format!(
        "--config-file={}",
        dir.join("config.xml").display()
    )];
    Supervised::spawn(&bin, &args, cleanup.then_some(dir), &dir.join("stdout.log"))
}

fn wait_ready(http_port: u16, process: &mut Supervised, dir: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok((200, body)) = http_request(http_port, "GET", "/ping", "")
            && body.starts_with("Ok")
        {
            return Ok(());
        }
        if !process.is_running() {
            break;
        }
        pause(Duration::from_millis(100));
    }
    let log =
        std::fs::read_to_string(dir.join("log/clickhouse-server.err.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
    bail!(
        "clickhouse-server did not become ready on port {http_port}; last error log lines:\n{tail}"
    )
}

/// Writes `config.xml` and `users.xml` for a server rooted at `dir`.
pub fn write_config(dir: &Path, http_port: u16, tcp_port: u16) -> anyhow::Result<()> {
    for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("mkdir {sub}"))?;
    }
    let config = CONFIG_XML
        .replace("@DIR@", &dir.display().to_string())
        .replace("@HTTP_PORT@", &http_port.to_string())
        .replace("@TCP_PORT@", &tcp_port.to_string());
    std::fs::write(dir.join("config.xml"), config)?;
    std::fs::write(dir.join("users.xml"), USERS_XML)?;
    Ok(())
}

/// The same server config the local stack uses (deploy/clickhouse/).
pub const CONFIG_XML: &str = include_str!("../../../deploy/clickhouse/config.xml.in");
/// `default` (no password, loopback only) and `finance` (read-only).
pub const USERS_XML: &str = include_str!("../../../deploy/clickhouse/users.xml");
