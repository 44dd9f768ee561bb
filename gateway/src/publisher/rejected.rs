//! Events the bus refused for their content, and the way back for them.
//!
//! The worker parks such an event in `rejected/rejected.jsonl` (one spool
//! record per line, with an `error` field) and never replays it by itself:
//! the same bytes would be refused again. Once the cause is fixed (say, the
//! server's `max_payload` raised), an operator runs
//! `tollgate-gateway spool replay-rejected --config F`, which renames the
//! file to `rejected/replay-<unix ms>.jsonl` ([`queue_rejected_for_replay`]).
//! A rename is atomic and needs no lock, so it works whether or not a
//! gateway is running on the spool. The worker picks such files up at start
//! and every [`REPLAY_SCAN`]: their events are appended to the spool's tail
//! (and fsynced) before the file is deleted, so a crash in between only
//! re-sends them (duplicates, dropped by id downstream).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_schemas::bus::Outgoing;
use tracing::{info, warn};

use super::spool::{self, REJECTED_DIR, REJECTED_FILE, Spool};

/// How often a running worker looks for files queued for replay.
pub const REPLAY_SCAN: Duration = Duration::from_secs(2);

const REPLAY_PREFIX: &str = "replay-";

/// Events waiting in `rejected/rejected.jsonl` (0 when there is none).
pub(crate) fn count(spool_dir: &Path) -> u64 {
    let path = spool_dir.join(REJECTED_DIR).join(REJECTED_FILE);
    match File::open(&path) {
        Ok(f) => BufReader::new(f)
            .split(b'\n')
            .filter(|l| l.as_ref().is_ok_and(|l| !l.is_empty()))
            .count() as u64,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "could not read the rejected events file");
            0
        }
    }
}

/// Queues the rejected events of the spool in `spool_dir` for replay: renames
/// `rejected/rejected.jsonl` aside for the worker. Returns the new file and
/// how many events it holds, or `None` when nothing was rejected.
pub fn queue_rejected_for_replay(spool_dir: &Path) -> io::Result<Option<(PathBuf, u64)>> {
    let events = count(spool_dir);
    let dir = spool_dir.join(REJECTED_DIR);
    let from = dir.join(REJECTED_FILE);
    if !from.exists() {
        return Ok(None);
    }
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let to = dir.join(format!("{REPLAY_PREFIX}{millis}.jsonl"));
    fs::rename(&from, &to)?;
    Ok(Some((to, events)))
}

/// Moves the events of every queued replay file to the spool's tail, then
/// deletes the file. Returns how many events went back. A line that does not
/// decode is kept in `rejected/corrupt.jsonl` by the reader later, never here:
/// it is skipped with a warning.
pub(crate) fn requeue(spool: &mut Spool, spool_dir: &Path) -> io::Result<u64> {
    let dir = spool_dir.join(REJECTED_DIR);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(REPLAY_PREFIX) && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    let mut total = 0;
    for path in files {
        let mut msgs: Vec<Outgoing> = Vec::new();
        for line in BufReader::new(File::open(&path)?).split(b'\n') {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match spool::decode(&line) {
                Ok(msg) => msgs.push(msg),
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "skipping an undecodable line of a replay file")
                }
            }
        }
        spool.append(&msgs)?;
        spool.sync()?;
        fs::remove_file(&path)?;
        info!(file = %path.display(), events = msgs.len(), "rejected events queued for replay are back in the spool");
        total += msgs.len() as u64;
    }
    Ok(total)
}
