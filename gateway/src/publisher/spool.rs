//! The on-disk spool: an append-only FIFO of events in segment files.
//!
//! ```text
//! spool_dir/
//!   lock                               flock'ed while a publisher owns the directory
//!   cursor                             "<segment> <offset>\n": first byte not yet acknowledged
//!   seg-00000000000000000007.jsonl     segments, oldest first; appends go to the newest
//!   seg-00000000000000000008.jsonl
//!   rejected/rejected.jsonl            events the bus refused for good, with the error
//!   rejected/corrupt.jsonl             spool lines that could not be decoded (torn writes)
//! ```
//!
//! A segment is newline-delimited JSON, one record per event:
//!
//! ```text
//! {"subject":"tollgate.events.usage.acme","id":"0197…","headers":[["traceparent","00-…"]],"payload":{…}}
//! ```
//!
//! `payload` is the event's JSON embedded byte for byte (a `RawValue`, so a
//! replayed message is identical to the one first offered). A payload that is
//! not a single-line JSON document is stored as `"payload_hex"` instead.
//! `headers` is omitted when empty. Readers ignore fields they don't know.
//!
//! Durability rules, in the order they are relied on:
//!
//! - An append is one `write(2)` of whole lines from a buffer: once it returns,
//!   the batch is in the kernel and survives the process dying (kill -9, OOM,
//!   panic). A failed write is cut back with `set_len`, and the segment is
//!   sealed, so a torn line is never glued to the next record.
//! - `fsync` happens when a segment is sealed (rotation at `segment_max`), at
//!   the worker's group-commit interval ([`Spool::take_unsynced`] hands it a
//!   handle to fsync *outside* the lock, so publishers never wait on the
//!   disk), and on shutdown ([`Spool::close`]). Only a kernel crash or power
//!   loss can take unsynced appends, and only those.
//! - The cursor is written (temp file + rename) after the bus acknowledged what
//!   it skips: at once *before* any segment it skips is deleted, otherwise at
//!   the worker's interval ([`Spool::flush_cursor`]) and on close. A stale or
//!   lost cursor only makes a restart re-send acknowledged events, which the
//!   bus (by `Nats-Msg-Id`) and the meter (by event id) deduplicate.
//! - On open, appends always go to a *new* segment, so a torn tail left by a
//!   crash stays at the end of a sealed segment; the reader skips a line that
//!   does not decode (with a warning, a metric and a copy in
//!   `rejected/corrupt.jsonl`) and carries on with the next.
//! - Segment ids only grow, and never reuse the cursor's segment id, so a stale
//!   cursor can never point into a newer file.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tollgate_schemas::bus::Outgoing;
use tracing::warn;

/// Subdirectory of the spool directory for events the bus refused and for
/// undecodable spool lines. Never replayed automatically; never deleted.
pub const REJECTED_DIR: &str = "rejected";

const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".jsonl";
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const LOCK_FILE: &str = "lock";
pub(crate) const REJECTED_FILE: &str = "rejected.jsonl";
const CORRUPT_FILE: &str = "corrupt.jsonl";

/// A byte position in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub segment: u64,
    pub offset: u64,
}

/// One event read from the spool, with the position just after it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub msg: Outgoing,
    pub end: Pos,
}

/// Depth and size, readable without the spool's lock.
#[derive(Debug, Default)]
pub(crate) struct SpoolStats {
    events: AtomicU64,
    bytes: AtomicU64,
}

impl SpoolStats {
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    len: u64,
}

struct Reader {
    segment: u64,
    offset: u64,
    inner: BufReader<File>,
}

pub(crate) struct Spool {
    dir: PathBuf,
    segment_max: u64,
    /// Segments still holding unacknowledged bytes, oldest first. When
    /// `writer` is open it writes to the last one.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    next_id: u64,
    /// First byte not yet acknowledged by the bus.
    cursor: Pos,
    reader: Option<Reader>,
    /// Lines after the cursor (events, plus any torn line not yet skipped).
    events: u64,
    dirty: bool,
    /// The cursor moved since it was last written.
    cursor_dirty: bool,
    stats: Arc<SpoolStats>,
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, taking its lock, and
    /// counts what a previous run left behind.
    pub fn open(dir: &Path, segment_max: u64, stats: Arc<SpoolStats>) -> io::Result<Self> {
        fs::create_dir_all(dir.join(REJECTED_DIR))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("spool {} is in use by another publisher", dir.display()),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }

        let mut ids = list_segments(dir)?;
        let stored = read_cursor(dir);
        let mut cursor = stored.unwrap_or(Pos {
            segment: ids.first().copied().unwrap_or(1),
            offset: 0,
        });
        // Never reuse the cursor's id: a stale cursor must not point into a new file.
        let next_id = ids
            .last()
            .map_or(1, |last| last + 1)
            .max(cursor.segment + 1);

        // Fully acknowledged segments a crash left between cursor write and delete.
        for id in ids.iter().filter(|id| **id < cursor.segment) {
            remove_quietly(&segment_path(dir, *id));
        }
        ids.retain(|id| *id >= cursor.segment);
        if ids.first() != Some(&cursor.segment) {
            cursor = Pos {
                segment: ids.first().copied().unwrap_or(next_id),
                offset: 0,
            };
        }

        let mut segments = VecDeque::with_capacity(ids.len());
        let mut events = 0;
        for id in ids {
            let path = segment_path(dir, id);
            let file = File::open(&path)?;
            let len = file.metadata()?.len();
            // What a killed predecessor wrote may still be only in the page cache.
            if let Err(e) = file.sync_all() {
                warn!(segment = id, error = %e, "fsync of a spool segment on open failed");
            }
            let from = if id == cursor.segment {
                cursor.offset.min(len)
            } else {
                0
            };
            if id == cursor.segment {
                cursor.offset = from;
            }
            events += count_lines(file, from)?;
            segments.push_back(Segment { id, len });
        }

        let mut spool = Self {
            dir: dir.to_path_buf(),
            segment_max: segment_max.max(1),
            segments,
            writer: None,
            next_id,
            cursor,
            reader: None,
            events,
            dirty: false,
            cursor_dirty: false,
            stats,
            _lock: lock,
        };
        // Drops segments that hold nothing unacknowledged (and resets an empty spool).
        spool.commit(spool.cursor, 0);
        if stored != Some(spool.cursor) {
            spool.write_cursor();
        }
        Ok(spool)
    }

    /// Events (lines) after the cursor.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Unacknowledged bytes.
    pub fn bytes(&self) -> u64 {
        let total: u64 = self.segments.iter().map(|s| s.len).sum();
        let consumed = match self.segments.front() {
            Some(s) if s.id == self.cursor.segment => self.cursor.offset,
            _ => 0,
        };
        total.saturating_sub(consumed)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    /// Appends `msgs` in order with one write. When it returns `Ok`, every one
    /// of them is in the file (not necessarily fsynced).
    pub fn append(&mut self, msgs: &[Outgoing]) -> io::Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(msgs.len() * 512);
        for msg in msgs {
            encode_into(msg, None, &mut buf)?;
        }
        let add = buf.len() as u64;
        let full = match (&self.writer, self.segments.back()) {
            (Some(_), Some(head)) => head.len > 0 && head.len + add > self.segment_max,
            _ => false,
        };
        if full {
            self.seal()?;
        }
        if self.writer.is_none() {
            self.create_segment()?;
        }
        let (Some(file), Some(head)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(io::Error::other("spool has no open segment"));
        };
        if let Err(e) = file.write_all(&buf) {
            // Cut a partial write back so no torn line is left for the next
            // record to be glued onto; seal the segment either way.
            if let Err(t) = file.set_len(head.len) {
                warn!(segment = head.id, error = %t, "could not truncate a failed spool write; the torn line will be skipped on replay");
                head.len = file.metadata().map_or(head.len, |m| m.len());
            }
            if let Err(t) = file.sync_data() {
                warn!(segment = head.id, error = %t, "fsync of a spool segment failed");
            }
            self.writer = None;
            self.reader = None;
            self.publish_stats();
            return Err(e);
        }
        head.len += add;
        self.events += msgs.len() as u64;
        self.dirty = true;
        self.publish_stats();
        Ok(())
    }

    /// Fsyncs the open segment (and the directory) if anything was appended
    /// since the last fsync.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(file) = &self.writer
            && self.dirty
        {
            file.sync_data()?;
            sync_dir(&self.dir);
        }
        self.dirty = false;
        Ok(())
    }

    /// Anything appended since the last fsync: a handle on the open segment
    /// for the caller to fsync without holding the spool's lock (a segment
    /// sealed meanwhile was fsynced by [`Spool::append`]). The appends count
    /// as synced from here on.
    pub fn take_unsynced(&mut self) -> Option<File> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.writer.as_ref().and_then(|f| f.try_clone().ok())
    }

    /// Writes the cursor if it moved since it was last written.
    pub fn flush_cursor(&mut self) {
        if self.cursor_dirty {
            self.write_cursor();
        }
    }

    /// Shutdown: the cursor and every append are on disk.
    pub fn close(&mut self) -> io::Result<()> {
        self.flush_cursor();
        self.sync()
    }

    /// Up to `max` events from the cursor, oldest first, without consuming
    /// them ([`Spool::commit`] does). Lines that do not decode at the front are
    /// parked in `rejected/corrupt.jsonl` and skipped with a warning; one
    /// after decodable events ends the batch (it is skipped on the next call).
    pub fn peek(&mut self, max: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut pos = self.cursor;
        let mut line = Vec::new();
        while out.len() < max {
            let Some(index) = self.segments.iter().position(|s| s.id == pos.segment) else {
                break;
            };
            let (seg_len, next_seg) = (
                self.segments[index].len,
                self.segments.get(index + 1).map(|s| s.id),
            );
            if pos.offset >= seg_len {
                let Some(next) = next_seg else { break };
                pos = Pos {
                    segment: next,
                    offset: 0,
                };
                if out.is_empty() {
                    // Nothing pending before it: drop the finished segment now.
                    self.commit(pos, 0);
                    pos = self.cursor;
                }
                continue;
            }
            let n = self.read_line(pos, &mut line)?;
            if n == 0 {
                // The file is shorter than we thought (truncated behind our back).
                warn!(
                    segment = pos.segment,
                    offset = pos.offset,
                    "spool segment ended early"
                );
                if let Some(s) = self.segments.get_mut(index) {
                    s.len = pos.offset;
                }
                continue;
            }
            let end = Pos {
                segment: pos.segment,
                offset: pos.offset + n,
            };
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            match decode(body) {
                Ok(msg) => {
                    out.push(Entry { msg, end });
                    pos = end;
                }
                Err(_) if !out.is_empty() => break,
                Err(error) => {
                    warn!(
                        segment = pos.segment,
                        offset = pos.offset,
                        len = n,
                        %error,
                        "skipping a spool line that does not decode (torn write from a crash?); copied to rejected/corrupt.jsonl"
                    );
                    metrics::counter!("tollgate_gateway_spool_corrupt_total").increment(1);
                    if let Err(e) = self.park_corrupt(pos, body) {
                        warn!(error = %e, line = %String::from_utf8_lossy(body), "could not copy the undecodable spool line");
                    }
                    self.commit(end, 1);
                    pos = self.cursor;
                }
            }
        }
        Ok(out)
    }

    /// Calls `f` with every decodable event after the cursor, oldest first,
    /// reading the files on its own (the worker's reader is not moved).
    pub fn scan(&self, mut f: impl FnMut(Outgoing)) -> io::Result<()> {
        let mut line = Vec::new();
        for segment in &self.segments {
            let mut file = File::open(segment_path(&self.dir, segment.id))?;
            if segment.id == self.cursor.segment {
                file.seek(SeekFrom::Start(self.cursor.offset))?;
            }
            let mut reader = BufReader::with_capacity(256 * 1024, file);
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                if let Ok(msg) = decode(line.strip_suffix(b"\n").unwrap_or(&line)) {
                    f(msg);
                }
            }
        }
        Ok(())
    }

    /// Marks everything before `end` acknowledged (`events` lines of it since
    /// the cursor), persists the cursor, then deletes finished segments.
    pub fn commit(&mut self, end: Pos, events: u64) {
        self.cursor = end;
        self.events = self.events.saturating_sub(events);
        let mut finished = Vec::new();
        while let Some(front) = self.segments.front() {
            let done = front.id < self.cursor.segment
                || (front.id == self.cursor.segment && self.cursor.offset >= front.len);
            if !done {
                break;
            }
            let id = front.id;
            if self.segments.len() == 1 {
                // The newest segment, drained: close it so the next append starts afresh.
                self.writer = None;
                self.dirty = false;
            }
            self.segments.pop_front();
            if self.cursor.segment == id {
                self.cursor = Pos {
                    segment: self.segments.front().map_or(self.next_id, |s| s.id),
                    offset: 0,
                };
            }
            finished.push(id);
        }
        if self.segments.is_empty() {
            self.events = 0;
        }
        if !finished.is_empty() {
            // Before the files go: a cursor must never point into a deleted one.
            self.write_cursor();
        } else if events > 0 {
            self.cursor_dirty = true;
        }
        for id in finished {
            if self.reader.as_ref().is_some_and(|r| r.segment == id) {
                self.reader = None;
            }
            remove_quietly(&segment_path(&self.dir, id));
        }
        self.publish_stats();
    }

    /// Appends events the bus refused for good to `rejected/rejected.jsonl`,
    /// each with its error, and fsyncs.
    pub fn park_rejected(&mut self, items: &[(Outgoing, String)]) -> io::Result<()> {
        let mut buf = Vec::new();
        for (msg, error) in items {
            encode_into(msg, Some(error), &mut buf)?;
        }
        append_synced(&self.dir.join(REJECTED_DIR).join(REJECTED_FILE), &buf)
    }

    fn park_corrupt(&mut self, at: Pos, line: &[u8]) -> io::Result<()> {
        #[derive(Serialize)]
        struct Corrupt<'a> {
            segment: u64,
            offset: u64,
            raw_hex: &'a str,
        }
        let raw_hex = hex::encode(line);
        let mut buf = serde_json::to_vec(&Corrupt {
            segment: at.segment,
            offset: at.offset,
            raw_hex: &raw_hex,
        })
        .map_err(io::Error::other)?;
        buf.push(b'\n');
        append_synced(&self.dir.join(REJECTED_DIR).join(CORRUPT_FILE), &buf)
    }

    fn seal(&mut self) -> io::Result<()> {
        if let Some(file) = self.writer.take() {
            file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    fn create_segment(&mut self) -> io::Result<()> {
        let id = self.next_id;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(&self.dir, id))?;
        sync_dir(&self.dir);
        self.next_id += 1;
        if self.segments.is_empty() {
            self.cursor = Pos {
                segment: id,
                offset: 0,
            };
        }
        self.segments.push_back(Segment { id, len: 0 });
        self.writer = Some(file);
        Ok(())
    }

    fn read_line(&mut self, pos: Pos, line: &mut Vec<u8>) -> io::Result<u64> {
        let mut reader = match self.reader.take() {
            Some(r) if r.segment == pos.segment && r.offset == pos.offset => r,
            _ => {
                let mut file = File::open(segment_path(&self.dir, pos.segment))?;
                file.seek(SeekFrom::Start(pos.offset))?;
                Reader {
                    segment: pos.segment,
                    offset: pos.offset,
                    inner: BufReader::with_capacity(256 * 1024, file),
                }
            }
        };
        line.clear();
        let n = reader.inner.read_until(b'\n', line)? as u64;
        reader.offset += n;
        self.reader = Some(reader);
        Ok(n)
    }

    fn write_cursor(&mut self) {
        self.cursor_dirty = false;
        let tmp = self.dir.join(CURSOR_TMP);
        let text = format!("{} {}\n", self.cursor.segment, self.cursor.offset);
        let result =
            fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, self.dir.join(CURSOR_FILE)));
        if let Err(e) = result {
            // Not fatal: a stale cursor only re-sends acknowledged events.
            warn!(error = %e, "could not persist the spool cursor");
            self.cursor_dirty = true;
        }
    }

    fn publish_stats(&self) {
        let bytes = self.bytes();
        self.stats.events.store(self.events, Ordering::Relaxed);
        self.stats.bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("tollgate_gateway_spool_events").set(self.events as f64);
        metrics::gauge!("tollgate_gateway_spool_bytes").set(bytes as f64);
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        ids.extend(id);
    }
    ids.sort_unstable();
    Ok(ids)
}

fn read_cursor(dir: &Path) -> Option<Pos> {
    let text = match fs::read_to_string(dir.join(CURSOR_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(error = %e, "spool cursor unreadable; replaying from the oldest segment");
            return None;
        }
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(segment)), Some(Ok(offset))) => Some(Pos { segment, offset }),
        _ => {
            warn!(cursor = %text.trim(), "spool cursor corrupt; replaying from the oldest segment");
            None
        }
    }
}

/// Lines from `from` to the end: newlines, plus a final unterminated line.
fn count_lines(mut file: File, from: u64) -> io::Result<u64> {
    file.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = file.read(&mut buf)?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            break;
        };
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        last = chunk.last().copied().unwrap_or(last);
    }
    Ok(lines + u64::from(last != b'\n'))
}

fn append_synced(path: &Path, buf: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(buf)?;
    file.sync_data()
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!(error = %e, "fsync of the spool directory failed");
    }
}

fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %path.display(), error = %e, "could not delete a drained spool segment")
        }
    }
}

#[derive(Serialize)]
struct RecordOut<'a> {
    subject: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "no_headers")]
    headers: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn no_headers(headers: &&[(String, String)]) -> bool {
    headers.is_empty()
}

#[derive(Deserialize)]
struct RecordIn<'a> {
    subject: String,
    id: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    payload_hex: Option<String>,
}

/// The payload as an embeddable `RawValue`: exactly the payload's bytes, valid
/// JSON, on one line, and not `null` (which would read back as "absent").
fn embeddable(payload: &[u8]) -> Option<&RawValue> {
    if payload.contains(&b'\n') {
        return None;
    }
    let raw: &RawValue = serde_json::from_slice(payload).ok()?;
    (raw.get().len() == payload.len() && raw.get() != "null").then_some(raw)
}

/// One record and its newline.
pub(crate) fn encode_into(
    msg: &Outgoing,
    error: Option<&str>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let payload = embeddable(&msg.payload);
    let record = RecordOut {
        subject: &msg.subject,
        id: &msg.id,
        headers: &msg.headers,
        payload,
        payload_hex: payload.is_none().then(|| hex::encode(&msg.payload)),
        error,
    };
    serde_json::to_writer(&mut *out, &record).map_err(io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

/// One record (without its newline).
pub(crate) fn decode(line: &[u8]) -> Result<Outgoing, String> {
    let record: RecordIn<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let payload = match (record.payload, record.payload_hex) {
        (Some(raw), _) => Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(h)) => Bytes::from(hex::decode(h).map_err(|e| format!("payload_hex: {e}"))?),
        (None, None) => return Err("record has no payload".to_owned()),
    };
    Ok(Outgoing {
        subject: record.subject,
        id: record.id,
        payload,
        headers: record.headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize, payload: &[u8]) -> Outgoing {
        Outgoing {
            subject: "t.tollgate.events.usage.acme".into(),
            id: format!("id-{i}"),
            payload: Bytes::copy_from_slice(payload),
            headers: vec![("traceparent".into(), format!("tp-{i}"))],
        }
    }

    fn open(dir: &Path, segment_max: u64) -> Spool {
        Spool::open(dir, segment_max, Arc::default()).unwrap()
    }

    #[test]
    fn records_round_trip_byte_for_byte() {
        let payloads: [&[u8]; 7] = [
            br#"{"id":"a","n":1.50,"s":"x\ny"}"#,
            br#"{ "spaced" : [1, 2] }"#,
            b" {\"leading\":1}",
            b"{\"pretty\":\n1}",
            b"not json \xff\x00",
            b"null",
            b"",
        ];
        for (i, p) in payloads.iter().enumerate() {
            let m = msg(i, p);
            let mut line = Vec::new();
            encode_into(&m, None, &mut line).unwrap();
            assert_eq!(
                line.iter().filter(|b| **b == b'\n').count(),
                1,
                "one line: {line:?}"
            );
            assert_eq!(decode(line.strip_suffix(b"\n").unwrap()).unwrap(), m);
        }
        let mut line = Vec::new();
        encode_into(&msg(0, br#"{"a":1}"#), None, &mut line).unwrap();
        assert!(line.starts_with(br#"{"subject":"t.tollgate.events.usage.acme","id":"id-0","headers":[["traceparent","tp-0"]],"payload":{"a":1}}"#));
    }

    #[test]
    fn resumes_at_the_cursor_across_rotation_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = open(tmp.path(), 300);
        for i in 0..10 {
            s.append(&[msg(i, br#"{"k":"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv"}"#)])
                .unwrap();
        }
        assert!(s.segments.len() > 1, "rotated: {:?}", s.segments);
        assert_eq!(s.events(), 10);
        let first = s.peek(4).unwrap();
        assert_eq!(
            first.iter().map(|e| e.msg.id.as_str()).collect::<Vec<_>>(),
            ["id-0", "id-1", "id-2", "id-3"]
        );
        s.commit(first[3].end, 4);
        // Peeked but not committed: replayed again after a restart.
        let _ = s.peek(2).unwrap();
        drop(s);

        let mut s = open(tmp.path(), 300);
        assert_eq!(s.events(), 6);
        let rest = s.peek(100).unwrap();
        assert_eq!(rest.first().map(|e| e.msg.id.as_str()), Some("id-4"));
        assert_eq!(rest.len(), 6);
        let end = rest.last().unwrap().end;
        s.commit(end, 6);
        assert!(s.is_empty());
        assert_eq!((s.events(), s.bytes()), (0, 0));
        assert!(
            list_segments(tmp.path()).unwrap().is_empty(),
            "drained segments are deleted"
        );
        // New appends after draining land in a fresh segment and are read.
        s.append(&[msg(42, b"{}")]).unwrap();
        assert_eq!(s.peek(10).unwrap().len(), 1);
    }

    #[test]
    fn torn_tail_is_skipped_and_parked() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = open(tmp.path(), 1 << 20);
        s.append(&[msg(0, b"{}"), msg(1, b"{}")]).unwrap();
        drop(s);
        let seg = segment_path(tmp.path(), list_segments(tmp.path()).unwrap()[0]);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(br#"{"subject":"x","id":"torn","payl"#).unwrap();
        drop(f);

        let mut s = open(tmp.path(), 1 << 20);
        assert_eq!(s.events(), 3);
        s.append(&[msg(2, b"{}")]).unwrap();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let batch = s.peek(10).unwrap();
            if let Some(last) = batch.last() {
                s.commit(last.end, batch.len() as u64);
            }
            ids.extend(batch.into_iter().map(|e| e.msg.id));
        }
        assert_eq!(ids, ["id-0", "id-1", "id-2"]);
        assert!(s.is_empty());
        let corrupt = fs::read_to_string(tmp.path().join(REJECTED_DIR).join(CORRUPT_FILE)).unwrap();
        assert!(corrupt.contains(&hex::encode("torn")), "{corrupt}");
    }

    #[test]
    fn a_second_publisher_on_the_same_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = open(tmp.path(), 1 << 20);
        let second = Spool::open(tmp.path(), 1 << 20, Arc::default());
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock)
        );
    }
}
