//! The embedded log's storage: one append-only log per topic, in segment files.
//!
//! A record on disk is
//! `len u32 | crc32 u32 | offset u64 | time_ms i64 | partition u16 | key_len u16 | key | payload`
//! (little endian; `len` counts everything after itself, the CRC everything after
//! itself). Offsets are global to the topic and contiguous, so replay by offset is
//! exact and a key's records keep their order. Appends are group-committed: a writer
//! task per topic takes every request waiting and writes them in one `write`. With
//! a zero [`LogConfig::sync_interval`] it acknowledges them after one `fdatasync`,
//! and an acknowledged record survives kill -9 and power loss; with an interval it
//! acknowledges them once written (they survive the death of any process, the
//! kernel holds them) and syncs at most that long after, as Kafka and JetStream do
//! by default: a power loss may take that last stretch. On open, each segment is
//! scanned and a torn tail (short or bad CRC) is cut off. The index lives in
//! memory: per record its segment, position, time and partition; per partition its
//! offsets.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::inbox::now_millis;

const HEADER: usize = 4 + 4 + 8 + 8 + 2 + 2;
/// Largest record accepted (key + payload): far above any event.
pub const MAX_RECORD: usize = 4 << 20;
/// Most appends written in one `write`.
const MAX_BATCH: usize = 4096;

/// How long an acknowledged append may wait for its `fdatasync`, by default: the
/// stretch a power loss may take, like PostgreSQL's `wal_writer_delay` with
/// `synchronous_commit = off`. A sync per append cost the broker most of its CPU
/// (a VM exit per flush on virtual disks) and each saga step its latency.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// Storage settings of every topic.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// A new segment starts past this size.
    pub segment_bytes: u64,
    /// Whole segments are removed, oldest first, past this size per topic...
    pub retention_bytes: u64,
    /// ...or when their newest record is older than this.
    pub retention_age: Duration,
    /// Partitions of a topic: the most members of one group that work at once.
    pub partitions: u32,
    /// Zero: every append is on disk (`fdatasync`) before it is acknowledged.
    /// Otherwise appends are acknowledged once written and synced at most this long
    /// after (and always before a group position that covers them is saved).
    pub sync_interval: Duration,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            retention_bytes: 1 << 30,
            retention_age: Duration::from_secs(7 * 24 * 3600),
            partitions: 8,
            sync_interval: DEFAULT_SYNC_INTERVAL,
        }
    }
}

/// Where one record is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    segment: u64,
    pos: u64,
    time_ms: i64,
    partition: u16,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    last_time_ms: i64,
}

#[derive(Debug, Default)]
struct Index {
    /// Offset of `locs[0]`; `first + locs.len()` is the next offset.
    first: u64,
    locs: VecDeque<Loc>,
    /// By base offset.
    segments: BTreeMap<u64, Segment>,
    /// Offsets of each partition, ascending.
    partitions: Vec<VecDeque<u64>>,
}

impl Index {
    fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }
}

/// One stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub time_ms: i64,
    pub partition: u32,
    pub key: String,
    pub payload: Bytes,
}

struct Append {
    key: String,
    partition: u16,
    payload: Bytes,
    reply: oneshot::Sender<io::Result<u64>>,
}

/// One topic's log.
pub struct TopicLog {
    pub name: String,
    pub partitions: u32,
    index: Arc<RwLock<Index>>,
    appender: mpsc::Sender<Append>,
    /// The next offset, published after each written batch.
    appended: watch::Receiver<u64>,
    /// Segment files written since their last `fdatasync`.
    unsynced: Unsynced,
}

/// Files written and not yet synced, shared by a topic's writer and whoever syncs.
#[derive(Clone, Default)]
struct Unsynced(Arc<std::sync::Mutex<Vec<Arc<File>>>>);

impl Unsynced {
    fn add(&self, file: &Arc<File>) {
        let mut files = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !files.iter().any(|f| Arc::ptr_eq(f, file)) {
            files.push(file.clone());
        }
    }

    /// Syncs every file written so far (blocking).
    fn sync(&self) -> io::Result<()> {
        let files = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (i, file) in files.iter().enumerate() {
            if let Err(e) = file.sync_data() {
                // Still unsynced: tried again next time.
                for file in &files[i..] {
                    self.add(file);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

fn corrupt(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// What recovering a segment found: its records, its valid size, its newest time.
struct Recovered {
    records: Vec<(u64, Loc)>,
    size: u64,
    last_time_ms: i64,
}

/// Scans a segment, cutting a torn tail.
fn recover_segment(path: &Path, base: u64) -> io::Result<Recovered> {
    let data = fs::read(path)?;
    let mut pos = 0usize;
    let mut found = Vec::new();
    let mut last_time = 0;
    let mut expected = base;
    while pos + HEADER <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let end = pos + 4 + len;
        if len < HEADER - 4 || end > data.len() {
            break;
        }
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap_or_default());
        if crc32fast::hash(&data[pos + 8..end]) != crc {
            break;
        }
        let offset = u64::from_le_bytes(data[pos + 8..pos + 16].try_into().unwrap_or_default());
        let time_ms = i64::from_le_bytes(data[pos + 16..pos + 24].try_into().unwrap_or_default());
        let partition = u16::from_le_bytes(data[pos + 24..pos + 26].try_into().unwrap_or_default());
        if offset != expected {
            break;
        }
        found.push((
            offset,
            Loc {
                segment: base,
                pos: pos as u64,
                time_ms,
                partition,
            },
        ));
        last_time = time_ms;
        expected += 1;
        pos = end;
    }
    if pos < data.len() {
        tracing::warn!(segment = %path.display(), kept = pos, dropped = data.len() - pos, "cut a torn tail off the log");
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(pos as u64)?;
        file.sync_all()?;
    }
    Ok(Recovered {
        records: found,
        size: pos as u64,
        last_time_ms: last_time,
    })
}

fn read_record(file: &File, path: &Path, pos: u64) -> io::Result<Record> {
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, pos)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(HEADER - 4..=MAX_RECORD + HEADER).contains(&len) {
        return Err(corrupt(path, "bad record length"));
    }
    let mut rest = vec![0u8; len - 4];
    file.read_exact_at(&mut rest, pos + 8)?;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(&rest) != crc {
        return Err(corrupt(path, "record checksum mismatch"));
    }
    let offset = u64::from_le_bytes(rest[0..8].try_into().unwrap_or_default());
    let time_ms = i64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
    let partition = u16::from_le_bytes([rest[16], rest[17]]);
    let key_len = u16::from_le_bytes([rest[18], rest[19]]) as usize;
    let key_end = 20 + key_len;
    if key_end > rest.len() {
        return Err(corrupt(path, "bad key length"));
    }
    let key = String::from_utf8_lossy(&rest[20..key_end]).into_owned();
    let payload = Bytes::copy_from_slice(&rest[key_end..]);
    Ok(Record {
        offset,
        time_ms,
        partition: u32::from(partition),
        key,
        payload,
    })
}

fn encode(
    buffer: &mut Vec<u8>,
    offset: u64,
    time_ms: i64,
    partition: u16,
    key: &str,
    payload: &[u8],
) {
    let key = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
    let len = (HEADER - 4 + key.len() + payload.len()) as u32;
    let start = buffer.len();
    buffer.extend_from_slice(&len.to_le_bytes());
    buffer.extend_from_slice(&[0; 4]);
    buffer.extend_from_slice(&offset.to_le_bytes());
    buffer.extend_from_slice(&time_ms.to_le_bytes());
    buffer.extend_from_slice(&partition.to_le_bytes());
    buffer.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buffer.extend_from_slice(key);
    buffer.extend_from_slice(payload);
    let crc = crc32fast::hash(&buffer[start + 8..]);
    buffer[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

impl TopicLog {
    /// Opens (recovering) or creates the topic stored in `dir`.
    pub fn open(name: &str, dir: PathBuf, config: &LogConfig) -> io::Result<Arc<TopicLog>> {
        fs::create_dir_all(&dir)?;
        let mut bases: Vec<u64> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        bases.sort_unstable();
        let partitions = config.partitions.clamp(1, u32::from(u16::MAX));
        let mut index = Index {
            partitions: vec![VecDeque::new(); partitions as usize],
            ..Index::default()
        };
        for (i, base) in bases.iter().enumerate() {
            let path = segment_path(&dir, *base);
            let Recovered {
                records: found,
                size,
                last_time_ms,
            } = recover_segment(&path, *base)?;
            if i == 0 {
                index.first = *base;
            }
            if found.first().is_some_and(|(o, _)| *o != index.next()) && !index.locs.is_empty() {
                return Err(corrupt(&path, "offsets do not follow the previous segment"));
            }
            if index.locs.is_empty() {
                index.first = *base;
            }
            for (offset, loc) in found {
                if let Some(list) = index.partitions.get_mut(loc.partition as usize) {
                    list.push_back(offset);
                }
                index.locs.push_back(loc);
            }
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            index.segments.insert(
                *base,
                Segment {
                    file: Arc::new(file),
                    path,
                    size,
                    last_time_ms,
                },
            );
        }
        let next = index.next();
        let index = Arc::new(RwLock::new(index));
        let (appender, requests) = mpsc::channel(MAX_BATCH);
        let (appended_tx, appended) = watch::channel(next);
        let unsynced = Unsynced::default();
        tokio::spawn(write_loop(
            Writer {
                dir,
                config: config.clone(),
                index: index.clone(),
                unsynced: unsynced.clone(),
            },
            requests,
            appended_tx,
        ));
        Ok(Arc::new(TopicLog {
            name: name.to_owned(),
            partitions,
            index,
            appender,
            appended,
            unsynced,
        }))
    }

    /// The partition of `key`.
    pub fn partition_of(&self, key: &str) -> u16 {
        crate::bus::partition(key, self.partitions) as u16
    }

    /// Puts every record acknowledged so far on disk (blocking): before a group
    /// position covering them is saved, so a power loss never leaves a position
    /// past the log's end.
    pub fn sync(&self) -> io::Result<()> {
        self.unsynced.sync()
    }

    /// Appends; returns the record's offset once it is written (and on disk, with a
    /// zero sync interval).
    pub async fn append(&self, key: &str, payload: Bytes) -> io::Result<u64> {
        if key.len() + payload.len() > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("record over {MAX_RECORD} bytes"),
            ));
        }
        let (reply, answer) = oneshot::channel();
        let request = Append {
            key: key.to_owned(),
            partition: self.partition_of(key),
            payload,
            reply,
        };
        let closed = || io::Error::other("the log writer stopped");
        self.appender.send(request).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// First retained offset and the next offset.
    pub fn bounds(&self) -> (u64, u64) {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        (index.first, index.next())
    }

    /// Bytes on disk.
    pub fn size(&self) -> u64 {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.segments.values().map(|s| s.size).sum()
    }

    /// Ticks when records were appended (the value is the next offset).
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.clone()
    }

    /// The first offset of `partition` at or after `from`.
    pub fn next_in_partition(&self, partition: u32, from: u64) -> Option<u64> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let list = index.partitions.get(partition as usize)?;
        let at = list.partition_point(|o| *o < from);
        list.get(at).copied()
    }

    /// How many records of `partition` are at or after `from` (a binary search).
    pub fn count_in_partition_from(&self, partition: u32, from: u64) -> u64 {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.partitions.get(partition as usize).map_or(0, |list| {
            (list.len() - list.partition_point(|o| *o < from)) as u64
        })
    }

    /// The first offset whose record was appended at or after `time_ms`.
    pub fn offset_at_time(&self, time_ms: i64) -> u64 {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.first + index.locs.partition_point(|l| l.time_ms < time_ms) as u64
    }

    /// Reads one record.
    pub fn read(&self, offset: u64) -> io::Result<Option<Record>> {
        let (file, path, pos) = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            if offset < index.first || offset >= index.next() {
                return Ok(None);
            }
            let Some(loc) = index.locs.get((offset - index.first) as usize).copied() else {
                return Ok(None);
            };
            let Some(segment) = index.segments.get(&loc.segment) else {
                return Ok(None);
            };
            (segment.file.clone(), segment.path.clone(), loc.pos)
        };
        read_record(&file, &path, pos).map(Some)
    }

    /// Reads up to `max` records from `from` on.
    pub fn read_from(&self, from: u64, max: usize) -> io::Result<Vec<Record>> {
        let (first, next) = self.bounds();
        let mut out = Vec::new();
        let mut offset = from.max(first);
        while offset < next && out.len() < max {
            if let Some(r) = self.read(offset)? {
                out.push(r);
            }
            offset += 1;
        }
        Ok(out)
    }
}

/// What a topic's writer task works with.
struct Writer {
    dir: PathBuf,
    config: LogConfig,
    index: Arc<RwLock<Index>>,
    unsynced: Unsynced,
}

impl Writer {
    /// Syncs what was written, off the runtime's threads.
    async fn sync(&self) {
        let unsynced = self.unsynced.clone();
        let synced = tokio::task::spawn_blocking(move || unsynced.sync())
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        if let Err(e) = synced {
            tracing::error!(topic = %self.dir.display(), error = %e, "log sync failed; retrying");
        }
    }
}

/// The writer task: group commit, segment roll, retention, and with a sync interval
/// the deferred `fdatasync`.
async fn write_loop(
    writer: Writer,
    mut requests: mpsc::Receiver<Append>,
    appended: watch::Sender<u64>,
) {
    let interval = writer.config.sync_interval;
    // When the oldest write not yet synced must be.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            request = requests.recv() => match request {
                Some(r) => r,
                None => break,
            },
            () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                due = None;
                writer.sync().await;
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = write_batch(&writer, &batch).await;
        match result {
            Ok(first_offset) => {
                if !interval.is_zero() && due.is_none() {
                    due = Some(tokio::time::Instant::now() + interval);
                }
                for (i, request) in batch.into_iter().enumerate() {
                    let _ = request.reply.send(Ok(first_offset + i as u64));
                }
                let next = writer
                    .index
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .next();
                appended.send_replace(next);
            }
            Err(e) => {
                tracing::error!(topic = %writer.dir.display(), error = %e, "log append failed");
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
    // The log is closing: what was acknowledged goes to disk first.
    writer.sync().await;
}

async fn write_batch(writer: &Writer, batch: &[Append]) -> io::Result<u64> {
    let Writer {
        dir,
        config,
        index,
        unsynced,
    } = writer;
    // Timestamps never go backwards, so replay by time can binary-search.
    let (first_offset, time_ms, active) = {
        let index = index.read().unwrap_or_else(|e| e.into_inner());
        let last_time = index.locs.back().map(|l| l.time_ms).unwrap_or(0);
        let active = index
            .segments
            .iter()
            .next_back()
            .map(|(base, s)| (*base, s.size));
        (index.next(), now_millis().max(last_time), active)
    };
    let mut buffer = Vec::new();
    let mut positions = Vec::with_capacity(batch.len());
    for (i, a) in batch.iter().enumerate() {
        positions.push(buffer.len() as u64);
        encode(
            &mut buffer,
            first_offset + i as u64,
            time_ms,
            a.partition,
            &a.key,
            &a.payload,
        );
    }
    let (base, start, file, path) = match active {
        Some((base, size)) if size + buffer.len() as u64 <= config.segment_bytes || size == 0 => {
            let index = index.read().unwrap_or_else(|e| e.into_inner());
            let segment = index
                .segments
                .get(&base)
                .ok_or_else(|| io::Error::other("segment vanished"))?;
            (base, size, segment.file.clone(), segment.path.clone())
        }
        _ => {
            let path = segment_path(dir, first_offset);
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)?;
            // The new file's name must survive a crash too.
            File::open(dir)?.sync_all()?;
            let file = Arc::new(file);
            index
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .segments
                .insert(
                    first_offset,
                    Segment {
                        file: file.clone(),
                        path: path.clone(),
                        size: 0,
                        last_time_ms: time_ms,
                    },
                );
            (first_offset, 0, file, path)
        }
    };
    let written = buffer.len() as u64;
    let written_file = file.clone();
    let sync_now = config.sync_interval.is_zero();
    tokio::task::spawn_blocking(move || {
        (&*written_file).write_all(&buffer)?;
        match sync_now {
            true => written_file.sync_data(),
            false => Ok(()),
        }
    })
    .await
    .map_err(io::Error::other)??;
    if !sync_now {
        unsynced.add(&file);
    }
    let mut guard = index.write().unwrap_or_else(|e| e.into_inner());
    let state = &mut *guard;
    for (i, a) in batch.iter().enumerate() {
        state.locs.push_back(Loc {
            segment: base,
            pos: start + positions[i],
            time_ms,
            partition: a.partition,
        });
        if let Some(list) = state.partitions.get_mut(a.partition as usize) {
            list.push_back(first_offset + i as u64);
        }
    }
    if let Some(segment) = state.segments.get_mut(&base) {
        segment.size += written;
        segment.last_time_ms = time_ms;
    }
    let _ = path;
    retain(state, config, time_ms);
    Ok(first_offset)
}

/// Drops whole segments, oldest first, past the size or age limit (never the
/// active one).
fn retain(index: &mut Index, config: &LogConfig, now_ms: i64) {
    let max_age = i64::try_from(config.retention_age.as_millis()).unwrap_or(i64::MAX);
    loop {
        let total: u64 = index.segments.values().map(|s| s.size).sum();
        if index.segments.len() < 2 {
            return;
        }
        let Some((&base, oldest)) = index.segments.iter().next() else {
            return;
        };
        let too_big = total > config.retention_bytes;
        let too_old = now_ms.saturating_sub(oldest.last_time_ms) > max_age;
        if !too_big && !too_old {
            return;
        }
        let next_base = index.segments.keys().nth(1).copied().unwrap_or(base);
        let dropped = next_base.saturating_sub(index.first);
        for _ in 0..dropped {
            index.locs.pop_front();
        }
        index.first = next_base;
        for list in &mut index.partitions {
            while list.front().is_some_and(|o| *o < next_base) {
                list.pop_front();
            }
        }
        if let Some(segment) = index.segments.remove(&base) {
            tracing::info!(segment = %segment.path.display(), too_big, too_old, "retention removed a segment");
            let _ = fs::remove_file(&segment.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> LogConfig {
        let mut c = LogConfig::new(dir);
        c.partitions = 4;
        c
    }

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!("bazaar-store-{}", uuid::Uuid::new_v4().simple()))
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = temp();
        let log = TopicLog::open("t", dir.clone(), &config(&dir)).unwrap();
        for n in 0..10u8 {
            assert_eq!(
                log.append(&format!("k{n}"), Bytes::from(vec![n; 100]))
                    .await
                    .unwrap(),
                u64::from(n)
            );
        }
        drop(log);
        // A crash mid-write: half a record at the end of the segment.
        let segment = segment_path(&dir, 0);
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        let mut torn = Vec::new();
        encode(&mut torn, 10, 0, 0, "k", b"lost");
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);
        let before = fs::metadata(&segment).unwrap().len();

        let log = TopicLog::open("t", dir.clone(), &config(&dir)).unwrap();
        assert_eq!(log.bounds(), (0, 10));
        assert!(fs::metadata(&segment).unwrap().len() < before);
        let r = log.read(7).unwrap().unwrap();
        assert_eq!((r.offset, r.key.as_str(), r.payload.len()), (7, "k7", 100));
        assert_eq!(r.partition, u32::from(log.partition_of("k7")));
        // Appends continue after the cut, with the next offset.
        assert_eq!(log.append("k", Bytes::from_static(b"x")).await.unwrap(), 10);
        let _ = fs::remove_dir_all(&dir);
    }

    fn unsynced(log: &TopicLog) -> usize {
        log.unsynced.0.lock().unwrap().len()
    }

    /// With a sync interval an append is answered once written, and readable at
    /// once; its file is synced when the interval has passed or when asked (before
    /// group positions are saved). With none, it is synced before the answer.
    #[tokio::test]
    async fn appends_are_synced_within_the_interval_or_when_asked() {
        let dir = temp();
        let mut c = config(&dir);
        c.sync_interval = Duration::from_secs(3600);
        let log = TopicLog::open("t", dir.clone(), &c).unwrap();
        assert_eq!(log.append("k", Bytes::from_static(b"a")).await.unwrap(), 0);
        assert_eq!(log.read(0).unwrap().unwrap().payload, "a");
        assert_eq!(unsynced(&log), 1);
        log.sync().unwrap();
        assert_eq!(unsynced(&log), 0);
        drop(log);

        c.sync_interval = Duration::from_millis(20);
        let log = TopicLog::open("t", dir.clone(), &c).unwrap();
        assert_eq!(log.append("k", Bytes::from_static(b"b")).await.unwrap(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while unsynced(&log) > 0 {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(log);

        c.sync_interval = Duration::ZERO;
        let log = TopicLog::open("t", dir.clone(), &c).unwrap();
        assert_eq!(log.bounds(), (0, 2));
        log.append("k", Bytes::from_static(b"c")).await.unwrap();
        assert_eq!(unsynced(&log), 0, "synced before it was answered");
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_corrupted_record_ends_the_log_there() {
        let dir = temp();
        let log = TopicLog::open("t", dir.clone(), &config(&dir)).unwrap();
        for n in 0..5u8 {
            log.append("k", Bytes::from(vec![n; 10])).await.unwrap();
        }
        drop(log);
        let segment = segment_path(&dir, 0);
        let mut bytes = fs::read(&segment).unwrap();
        let record = bytes.len() / 5;
        bytes[record * 3 + HEADER + 2] ^= 0xff; // a flipped bit in the fourth payload
        fs::write(&segment, bytes).unwrap();
        let log = TopicLog::open("t", dir.clone(), &config(&dir)).unwrap();
        assert_eq!(log.bounds(), (0, 3));
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn segments_roll_and_retention_drops_the_oldest_whole() {
        let dir = temp();
        let mut c = config(&dir);
        c.segment_bytes = 1000;
        c.retention_bytes = 3000;
        let log = TopicLog::open("t", dir.clone(), &c).unwrap();
        for n in 0..100u64 {
            log.append(&format!("k{}", n % 7), Bytes::from(vec![1u8; 60]))
                .await
                .unwrap();
        }
        let (first, next) = log.bounds();
        assert_eq!(next, 100);
        assert!(first > 0, "old segments were removed");
        assert!(log.size() <= 3000 + 1000, "{}", log.size());
        assert!(log.read(first - 1).unwrap().is_none());
        assert_eq!(log.read(first).unwrap().unwrap().offset, first);
        let segments = fs::read_dir(&dir).unwrap().count();
        assert!((3..=5).contains(&segments), "{segments} segment files");
        // Partition indexes dropped the removed offsets too.
        for p in 0..4 {
            assert!(log.next_in_partition(p, 0).is_none_or(|o| o >= first));
        }
        drop(log);
        let log = TopicLog::open("t", dir.clone(), &c).unwrap();
        assert_eq!(log.bounds(), (first, 100));
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed_in_one_order() {
        let dir = temp();
        let log = TopicLog::open("t", dir.clone(), &config(&dir)).unwrap();
        let mut tasks = Vec::new();
        for n in 0..200u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(&format!("k{n}"), Bytes::from(n.to_le_bytes().to_vec()))
                    .await
                    .unwrap()
            }));
        }
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.push(t.await.unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
        for r in log.read_from(0, 1000).unwrap() {
            let n = u32::from_le_bytes(r.payload[..4].try_into().unwrap());
            assert_eq!(r.key, format!("k{n}"));
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
