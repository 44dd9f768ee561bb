//! A real `nats-server -js` on a free port with its store in a temp dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::{Supervised, free_port, require_binary, wait_for_port};

pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    process: Supervised,
}

impl NatsServer {
    /// Starts a server a test owns: it can be stopped and restarted with its
    /// store intact; the temp dir goes when the value drops.
    pub fn start() -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("tollgate-nats-")
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        let port = free_port()?;
        let process = spawn(port, &dir, false)?;
        Ok(Self {
            port,
            dir,
            _tmp: Some(tmp),
            process,
        })
    }

    /// Starts a server for the whole test process: statics never drop, so the
    /// supervisor removes the temp dir when the process exits.
    pub(super) fn start_for_process() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-nats-")
            .tempdir()?
            .keep();
        let port = free_port()?;
        let process = spawn(port, &dir, true)?;
        Ok(Self {
            port,
            dir,
            _tmp: None,
            process,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM), keeping its store.
    pub fn stop(&mut self) {
        // A frozen server would never act on the SIGTERM.
        let _ = self.thaw();
        self.process.stop();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self
            .process
            .server_pid()
            .ok_or_else(|| anyhow::anyhow!("nats-server is not running"))?;
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
        Ok(())
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.process = spawn(self.port, &self.dir, self._tmp.is_none())?;
        Ok(())
    }
}

fn spawn(port: u16, dir: &Path, cleanup: bool) -> anyhow::Result<Supervised> {
    let bin = require_binary("nats-server", "nats-server")?;
    let args = vec![
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-sd".into(),
        dir.join("store").display().to_string(),
    ];
    let process = Supervised::spawn(&bin, &args, cleanup.then_some(dir), &dir.join("nats.log"))?;
    wait_for_port(port, Duration::from_secs(20))?;
    Ok(process)
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // A test that failed while the server was frozen must not hang on it.
        let _ = self.thaw();
    }
}
