//! A real Kafka-compatible broker: tansu, on a free port, in-memory storage.
//!
//! tansu is built from crates.io once per machine (about 11 minutes):
//! `cargo install tansu --locked --features dynostore --root /var/tmp/tollgate-tools`
//! (`./deploy/local.sh test` does it). Tests find it at `$TOLLGATE_TANSU`, else
//! `/var/tmp/tollgate-tools/bin/tansu`; a missing binary fails the test with
//! that command, never a silent skip.
//!
//! The `dynostore` build stores in memory (`memory://`) or S3, so a restart
//! loses the log. Fault tests that need the broker "gone" and "back" with its
//! data intact [`pause`](TansuServer::pause) it (SIGSTOP: connections hang,
//! requests time out, exactly what clients see of an unreachable broker) and
//! [`resume`](TansuServer::resume) it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::process::{Supervised, free_port, wait_for_port};

/// Where `deploy/local.sh` installs tansu.
pub const DEFAULT_TANSU: &str = "/var/tmp/tollgate-tools/bin/tansu";

pub struct TansuServer {
    port: u16,
    _tmp: Option<tempfile::TempDir>,
    process: Supervised,
    paused: bool,
}

/// The tansu binary, or an error saying how to install it.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("TOLLGATE_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TANSU));
    if path.exists() {
        return Ok(path);
    }
    bail!(
        "tansu (the Kafka-compatible broker the Kafka tests use) is not at {}: build it once with \
         `cargo install tansu --locked --features dynostore --root /var/tmp/tollgate-tools` \
         (about 11 minutes; ./deploy/local.sh test does it), or set TOLLGATE_TANSU to its path",
        path.display()
    )
}

/// librdkafka properties every client of tansu needs: one message per
/// record batch. tansu 0.6 answers a fetch from an offset inside a
/// multi-message batch wrongly (it skips to the next batch), which would
/// break a restart from a committed offset; real Kafka needs no such thing.
pub fn tansu_client_properties() -> std::collections::BTreeMap<String, String> {
    [("batch.num.messages".to_owned(), "1".to_owned())].into()
}

impl TansuServer {
    /// Starts a broker a test owns; it stops when the value drops.
    pub fn start() -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-tansu-")
            .tempdir()?;
        let port = free_port()?;
        let process = spawn(port, tmp.path(), false)?;
        Ok(Self {
            port,
            _tmp: Some(tmp),
            process,
            paused: false,
        })
    }

    /// Starts a broker for the whole test process (never dropped).
    pub(super) fn start_for_process() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-tansu-")
            .tempdir()?
            .keep();
        let port = free_port()?;
        let process = spawn(port, &dir, true)?;
        Ok(Self {
            port,
            _tmp: None,
            process,
            paused: false,
        })
    }

    /// `bootstrap.servers` for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes the broker (SIGSTOP): it keeps its data but answers nothing.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self
            .process
            .server_pid()
            .context("the tansu process is not running")?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }
}

impl Drop for TansuServer {
    fn drop(&mut self) {
        // A stopped process ignores SIGTERM until continued.
        if self.paused {
            let _ = self.signal("CONT");
        }
    }
}

fn spawn(port: u16, dir: &Path, cleanup: bool) -> anyhow::Result<Supervised> {
    let bin = tansu_binary()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let args = vec![
        "broker".into(),
        "--listener-url".into(),
        url.clone(),
        "--advertised-listener-url".into(),
        url,
        "--storage-engine".into(),
        "memory://tansu/".into(),
    ];
    let process = Supervised::spawn(
        &bin.display().to_string(),
        &args,
        cleanup.then_some(dir),
        &dir.join("tansu.log"),
    )?;
    wait_for_port(port, Duration::from_secs(20))?;
    Ok(process)
}
