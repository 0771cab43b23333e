//! A line-oriented log file with size- and time-based rotation, a retention count and reopening
//! (logrotate's rename-then-SIGHUP).
//!
//! Lines are collected into a batch and written with as few `write` calls as the kernel allows. What
//! it guarantees, and how:
//! - **No lost or duplicated line on rotation**: the batch is written before the file is renamed, and
//!   every line after the rename goes to the new file; a line is never split across files.
//! - **Only whole lines on disk**: when a write fails part-way (disk full), the file is cut back to
//!   the last complete line; the lines that did not fit are counted as dropped, never half-written.
//! - **Survives errors**: a failed write, rename or open is counted and logged once per streak of
//!   failures; writing resumes by itself when the cause goes away (space freed, directory back).

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::sink::Tally;

/// Batches are written once they reach this size, so memory stays bounded under load.
const BATCH_BYTES: usize = 64 * 1024;
/// After a failed open, how long to wait before trying again (lines meanwhile are dropped, counted).
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);
/// Request logs name clients: readable by the owner and the group only.
const FILE_MODE: u32 = 0o640;

/// When a file is rotated and how many rotated files are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a line would take the file past this many bytes; `None`: never by size.
    pub max_bytes: Option<u64>,
    /// Rotate at every multiple of this interval since the Unix epoch (so `3600` rotates on the hour,
    /// UTC); `None`: never by time. An empty file is not rotated.
    pub interval: Option<Duration>,
    /// Rotated files kept: `PATH.1` (newest) to `PATH.<retain>`; `0` deletes the file on rotation.
    pub retain: u32,
}

/// The rotated file number `n` of `path`: `PATH.n`.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// A log file that rotates itself. Not thread-safe: one sink thread owns it.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    rotation: Rotation,
    /// Written first in every new file (the CSV header).
    header: Option<Vec<u8>>,
    file: Option<File>,
    /// Bytes in the file as far as this writer knows (re-read whenever the file is opened).
    len: u64,
    /// The file holds a line besides the header.
    has_lines: bool,
    next_rotation: Option<SystemTime>,
    /// Lines not yet written; `batch[..header_end]` is the header when the file is still empty.
    batch: Vec<u8>,
    header_end: usize,
    /// End offset in `batch` of each line.
    line_ends: Vec<usize>,
    tally: Tally,
    /// In a streak of failures (logged once at its start and once at its end).
    failing: bool,
    dropped_in_streak: u64,
    last_open_attempt: Option<Instant>,
}

impl RotatingFile {
    /// Opens (creating, appending) `path`. An error here is a configuration problem to report at
    /// start-up; later errors are counted and survived.
    pub fn open(path: &Path, rotation: Rotation, header: Option<&[u8]>) -> io::Result<Self> {
        let mut f = RotatingFile {
            path: path.to_owned(),
            rotation,
            header: header.map(<[u8]>::to_vec),
            file: None,
            len: 0,
            has_lines: false,
            next_rotation: None,
            batch: Vec::new(),
            header_end: 0,
            line_ends: Vec::new(),
            tally: Tally::default(),
            failing: false,
            dropped_in_streak: 0,
            last_open_attempt: None,
        };
        let file = f.open_file()?;
        f.adopt(file, SystemTime::now());
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was written, dropped and failed so far.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Adds one line (which must end with `\n`), rotating first when the line would not fit or the
    /// rotation time has come.
    pub fn push(&mut self, line: &[u8], now: SystemTime) {
        self.rotate_if_due(now);
        if let Some(max) = self.rotation.max_bytes {
            let pending = self.batch.len() as u64;
            // Without an open file (opening failed) there is nothing to rotate yet.
            if self.file.is_some()
                && (self.has_lines || !self.line_ends.is_empty())
                && self.len + pending + self.pending_header() + line.len() as u64 > max
                && self.confirm_len() + pending + line.len() as u64 > max
            {
                self.flush();
                self.rotate(now);
            }
        }
        if self.len == 0 {
            // The header goes first in the same write as the file's first lines.
            self.prepend_header();
        }
        self.batch.extend_from_slice(line);
        self.line_ends.push(self.batch.len());
        if self.batch.len() >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Time-based rotation when due, then writes what is batched. Called when the sink is idle.
    pub fn tick(&mut self, now: SystemTime) {
        self.rotate_if_due(now);
        self.flush();
    }

    /// Closes the file and opens `path` again: after logrotate renamed it, a new file is created.
    pub fn reopen(&mut self, now: SystemTime) {
        self.flush();
        self.file = None;
        self.open_or_note(now);
    }

    /// Writes the batch. On a partial failure the file is cut back to the last whole line.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let lines = self.line_ends.len() as u64;
        if self.file.is_none() && self.open_retry_due() {
            self.open_or_note(SystemTime::now());
        }
        let result = match self.file.as_mut() {
            None => None,
            Some(file) => Some(write_all_counted(file, &self.batch)),
        };
        match result {
            None => {
                // No file (open failing): the lines are lost, and counted.
                self.tally.dropped += lines;
                self.dropped_in_streak += lines;
            }
            Some((written, Ok(()))) => {
                self.len += written as u64;
                self.tally.written += lines;
                self.has_lines |= lines > 0;
                self.recovered();
            }
            Some((written, Err(e))) => {
                let kept = self
                    .line_ends
                    .iter()
                    .take_while(|&&end| end <= written)
                    .count();
                let keep = match kept {
                    0 if written >= self.header_end => self.header_end,
                    0 => 0,
                    n => self.line_ends[n - 1],
                };
                if keep < written {
                    self.cut_partial_line(written - keep);
                } else {
                    self.len += written as u64;
                }
                let kept = kept as u64;
                self.tally.written += kept;
                self.has_lines |= kept > 0;
                self.failed("writing", &e, lines - kept);
            }
        }
        self.batch.clear();
        self.line_ends.clear();
        self.header_end = 0;
    }

    /// Header bytes that the next write adds and the batch does not hold yet.
    fn pending_header(&self) -> u64 {
        match &self.header {
            Some(h) if self.len == 0 && self.header_end == 0 => h.len() as u64,
            _ => 0,
        }
    }

    /// Puts the header at the front of the batch (once).
    fn prepend_header(&mut self) {
        let Some(h) = &self.header else { return };
        if self.header_end > 0 {
            return;
        }
        self.batch.splice(0..0, h.iter().copied());
        for end in &mut self.line_ends {
            *end += h.len();
        }
        self.header_end = h.len();
    }

    /// Takes the header out of the batch again (the file turned out not to be empty).
    fn strip_header(&mut self) {
        if self.header_end == 0 {
            return;
        }
        self.batch.drain(..self.header_end);
        for end in &mut self.line_ends {
            *end -= self.header_end;
        }
        self.header_end = 0;
    }

    /// The file's real size (someone may have truncated it, e.g. logrotate's copytruncate).
    fn confirm_len(&mut self) -> u64 {
        if let Some(Ok(m)) = self.file.as_ref().map(File::metadata) {
            self.len = m.len();
        }
        self.len
    }

    /// Removes the `extra` bytes of an incomplete line that a failed write left at the file's end.
    fn cut_partial_line(&mut self, extra: usize) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        // The real end, not `self.len`: with O_APPEND the write went to wherever the end was.
        let cut = file.metadata().and_then(|m| {
            let to = m.len().saturating_sub(extra as u64);
            file.set_len(to).map(|()| to)
        });
        match cut {
            Ok(to) => self.len = to,
            Err(e) => {
                self.tally.errors += 1;
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "could not cut an incomplete line from the end of the file"
                );
                self.confirm_len();
            }
        }
    }

    fn rotate_if_due(&mut self, now: SystemTime) {
        let Some(at) = self.next_rotation else { return };
        if now < at {
            return;
        }
        if self.file.is_some() && (self.has_lines || !self.line_ends.is_empty()) {
            self.flush();
            self.rotate(now);
        } else {
            self.next_rotation = next_boundary(now, self.rotation.interval);
        }
    }

    /// Renames `PATH` → `PATH.1` (shifting older ones, the oldest falling off) and opens a new `PATH`.
    /// The batch must be empty.
    fn rotate(&mut self, now: SystemTime) {
        debug_assert!(self.batch.is_empty(), "rotate with unwritten lines");
        self.file = None;
        if let Err(e) = shift(&self.path, self.rotation.retain) {
            // Keep appending to the same file rather than lose lines; the next rotation tries again.
            self.tally.errors += 1;
            tracing::warn!(path = %self.path.display(), error = %e, "could not rotate the log file");
        }
        self.open_or_note(now);
    }

    fn open_file(&self) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(FILE_MODE)
            .open(&self.path)
    }

    /// Takes `file` as the current file.
    fn adopt(&mut self, file: File, now: SystemTime) {
        self.len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let header_len = self.header.as_ref().map_or(0, Vec::len) as u64;
        self.has_lines = self.len > header_len;
        self.file = Some(file);
        self.next_rotation = next_boundary(now, self.rotation.interval);
        if self.len > 0 {
            self.strip_header();
        } else if self.header.is_some() {
            self.prepend_header();
            // A new CSV shows its header at once, not only with its first row. (When lines are
            // batched, this runs inside `flush`, which writes them right after.)
            if self.line_ends.is_empty() {
                self.flush();
            }
        }
    }

    fn open_or_note(&mut self, now: SystemTime) {
        self.last_open_attempt = Some(Instant::now());
        match self.open_file() {
            Ok(file) => self.adopt(file, now),
            Err(e) => self.failed("opening", &e, 0),
        }
    }

    fn open_retry_due(&self) -> bool {
        self.last_open_attempt
            .is_none_or(|t| t.elapsed() >= REOPEN_BACKOFF)
    }

    fn failed(&mut self, what: &str, e: &io::Error, dropped: u64) {
        self.tally.errors += 1;
        self.tally.dropped += dropped;
        self.dropped_in_streak += dropped;
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "{what} the log file failed; dropping lines until it works again \
                 (counted in servescope_log_dropped_total)"
            );
        }
    }

    fn recovered(&mut self) {
        if self.failing {
            self.failing = false;
            tracing::info!(
                path = %self.path.display(),
                dropped = self.dropped_in_streak,
                "writing the log file again"
            );
            self.dropped_in_streak = 0;
        }
    }
}

/// Writes `buf` to the end of `file`; returns how many bytes went out, and the error if not all did.
fn write_all_counted(file: &mut File, buf: &[u8]) -> (usize, io::Result<()>) {
    let mut written = 0;
    while written < buf.len() {
        match file.write(&buf[written..]) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

/// `PATH.(n-1)` → `PATH.n` down to `PATH` → `PATH.1`. Shifting stops at the first free number
/// (nothing above it needs to move); when all `retain` exist, rename replaces `PATH.<retain>`, the
/// oldest.
fn shift(path: &Path, retain: u32) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if retain == 0 {
        return ignore_missing(std::fs::remove_file(path));
    }
    let free = (1..=retain)
        .find(|&n| !numbered(path, n).exists())
        .unwrap_or(retain);
    for n in (1..free).rev() {
        ignore_missing(std::fs::rename(numbered(path, n), numbered(path, n + 1)))?;
    }
    ignore_missing(std::fs::rename(path, numbered(path, 1)))
}

/// The first multiple of `interval` since the epoch after `now`.
fn next_boundary(now: SystemTime, interval: Option<Duration>) -> Option<SystemTime> {
    let step = interval?.as_secs().max(1);
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Some(UNIX_EPOCH + Duration::from_secs((secs / step + 1) * step))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;

    use super::*;

    fn rotation(max_bytes: Option<u64>, interval: Option<u64>, retain: u32) -> Rotation {
        Rotation {
            max_bytes,
            interval: interval.map(Duration::from_secs),
            retain,
        }
    }

    /// Every line of `path.<retain>` … `path.1`, `path`, oldest first (also used by file.rs's tests).
    pub(crate) fn read_all(path: &Path, retain: u32) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for n in (1..=retain).rev() {
            if let Ok(text) = fs::read_to_string(numbered(path, n)) {
                lines.extend(text.lines().map(str::to_owned));
            }
        }
        lines.extend(fs::read_to_string(path)?.lines().map(str::to_owned));
        Ok(lines)
    }

    #[test]
    fn size_rotation_keeps_every_line_once_in_order() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.jsonl");
        let mut f = RotatingFile::open(&path, rotation(Some(1000), None, 1000), None)?;
        let now = SystemTime::now();
        const N: usize = 20_000;
        for i in 0..N {
            f.push(format!("{{\"seq\":{i}}}\n").as_bytes(), now);
            if i % 97 == 0 {
                f.flush();
            }
        }
        f.flush();
        let lines = read_all(&path, 1000)?;
        let want: Vec<String> = (0..N).map(|i| format!("{{\"seq\":{i}}}")).collect();
        assert_eq!(lines.len(), N);
        assert_eq!(lines, want);
        // Every rotated file is within the limit and ends with a whole line.
        let mut files = 0;
        for n in 1..=1000 {
            let Ok(bytes) = fs::read(numbered(&path, n)) else {
                break;
            };
            assert!(bytes.len() <= 1000, "{} bytes", bytes.len());
            assert_eq!(bytes.last(), Some(&b'\n'));
            files += 1;
        }
        assert!(files > 100, "only {files} rotations");
        assert_eq!(
            f.tally(),
            Tally {
                written: N as u64,
                dropped: 0,
                errors: 0
            }
        );
        Ok(())
    }

    #[test]
    fn retention_drops_the_oldest() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.log");
        let mut f = RotatingFile::open(&path, rotation(Some(10), None, 2), None)?;
        let now = SystemTime::now();
        for i in 0..5 {
            f.push(format!("line{i:04}\n").as_bytes(), now);
        }
        f.flush();
        assert_eq!(fs::read_to_string(&path)?, "line0004\n");
        assert_eq!(fs::read_to_string(numbered(&path, 1))?, "line0003\n");
        assert_eq!(fs::read_to_string(numbered(&path, 2))?, "line0002\n");
        assert!(!numbered(&path, 3).exists());
        Ok(())
    }

    #[test]
    fn retain_zero_deletes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.log");
        let mut f = RotatingFile::open(&path, rotation(Some(10), None, 0), None)?;
        let now = SystemTime::now();
        for i in 0..3 {
            f.push(format!("line{i:04}\n").as_bytes(), now);
        }
        f.flush();
        assert_eq!(fs::read_to_string(&path)?, "line0002\n");
        assert!(!numbered(&path, 1).exists());
        Ok(())
    }

    #[test]
    fn time_rotation_on_the_boundary_and_never_empty() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.csv");
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut f = RotatingFile::open(&path, rotation(None, Some(60), 5), Some(b"h\n"))?;
        f.next_rotation = next_boundary(t0, Some(Duration::from_secs(60)));
        f.push(b"a\n", t0);
        f.push(b"b\n", t0 + Duration::from_secs(39));
        // 1_700_000_040 is the first multiple of 60 after t0.
        f.push(b"c\n", t0 + Duration::from_secs(40));
        f.tick(t0 + Duration::from_secs(100));
        // Nothing was written in that period: no empty rotation.
        f.tick(t0 + Duration::from_secs(160));
        f.push(b"d\n", t0 + Duration::from_secs(161));
        f.flush();
        assert_eq!(fs::read_to_string(numbered(&path, 2))?, "h\na\nb\n");
        assert_eq!(fs::read_to_string(numbered(&path, 1))?, "h\nc\n");
        assert_eq!(fs::read_to_string(&path)?, "h\nd\n");
        assert!(!numbered(&path, 3).exists());
        Ok(())
    }

    #[test]
    fn header_once_per_file_also_when_appending() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("l.csv");
        {
            let f = RotatingFile::open(&path, rotation(None, None, 1), Some(b"x,y\n"))?;
            assert_eq!(f.tally().written, 0);
        }
        assert_eq!(fs::read_to_string(&path)?, "x,y\n");
        let mut f = RotatingFile::open(&path, rotation(None, None, 1), Some(b"x,y\n"))?;
        f.push(b"1,2\n", SystemTime::now());
        f.flush();
        assert_eq!(fs::read_to_string(&path)?, "x,y\n1,2\n");
        Ok(())
    }

    #[test]
    fn reopen_after_external_rename() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.log");
        let moved = dir.path().join("r.log.old");
        let mut f = RotatingFile::open(&path, rotation(None, None, 1), None)?;
        let now = SystemTime::now();
        f.push(b"1\n", now);
        f.flush();
        fs::rename(&path, &moved)?;
        // Until the reopen, lines follow the renamed file (as logrotate expects)...
        f.push(b"2\n", now);
        f.reopen(now);
        // ...and after it they go to a new file.
        f.push(b"3\n", now);
        f.flush();
        assert_eq!(fs::read_to_string(&moved)?, "1\n2\n");
        assert_eq!(fs::read_to_string(&path)?, "3\n");
        Ok(())
    }

    #[test]
    fn vanished_directory_is_counted_and_survived() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("logs");
        fs::create_dir(&sub)?;
        let path = sub.join("r.log");
        let mut f = RotatingFile::open(&path, rotation(Some(4), None, 1), None)?;
        let now = SystemTime::now();
        f.push(b"a\n", now);
        f.flush();
        fs::remove_dir_all(&sub)?;
        // Rotation cannot rename or open: the line is dropped and counted, nothing panics.
        f.push(b"bbbb\n", now);
        f.flush();
        let t = f.tally();
        assert_eq!((t.written, t.dropped), (1, 1));
        assert!(t.errors >= 1);
        fs::create_dir(&sub)?;
        f.last_open_attempt = None;
        f.push(b"c\n", now);
        f.flush();
        assert_eq!(fs::read_to_string(&path)?, "c\n");
        assert_eq!(f.tally().written, 2);
        Ok(())
    }
}
