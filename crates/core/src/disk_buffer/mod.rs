//! Disk buffers: `buffer = { type = "disk", max_size = "2GiB" }` on a transform or sink input.
//!
//! A disk buffer decouples a consumer that holds records for long (an hour-long window, a
//! parquet file open for minutes, a sink whose server is down) from the source's
//! acknowledgement window. Upstream, a batch is **acknowledged once durably appended**: the
//! writer thread appends every batch waiting (group commit), calls `fdatasync` once
//! (`fsync = true`, the default) and only then finishes the batches' finalizers. Downstream,
//! the reader thread reads frames back, gives each read batch a finalizer of its own and
//! keeps the byte range until that finalizer resolves: Delivered or Rejected releases it,
//! Errored replays it after a growing delay. A failing batch is replayed in halves, and a half
//! that fails while its sibling passes is split again until the failing records are alone;
//! after `max_replays` more failures they go to the consumer's `dead_letter` output. An outage
//! (every half fails) proves nothing and is retried until it ends. Released space is
//! reclaimed a segment at a time.
//!
//! On restart every unreleased byte range is replayed (at-least-once). The released position is
//! persisted (a contiguous prefix, written at most every 200 ms), so what is replayed after a
//! crash is what was not yet released, plus whatever was released after the last write of the
//! position or out of order behind an unreleased range (duplicates, never losses).
//!
//! Files, in `<data_dir>/<pipeline id>/<component>/buffer/`: `NNN.seg` segments of checksummed
//! frames ([`codec`]), `released` (the position below which everything is released) and `lock`
//! (one process per directory). A torn tail left by `kill -9` is cut at start; a damaged frame
//! is counted (`disk_buffer_corrupt_total`), logged and skipped, never a panic or a stop.
//!
//! Memory does not grow with the backlog: the reader reads at most `max_batches` batches
//! ahead of the consumer, and keeps at most 80 bytes per read batch still in flight downstream (a read
//! batch holds up to 1,024 records; at most ~80 MB per million in-flight batches in the worst
//! case of one record per batch, ~80 KB per million records at full batches).
//!
//! Disk use is bounded by `max_size` for unreleased data, plus at most one segment
//! (`max_size / 8`, between 1 MiB and 128 MiB) that is being reclaimed. When full, the writer
//! blocks (`when_full = "block"`, the default: backpressure reaches the source, logged once per
//! episode and shown in the `disk_buffer_full` gauge) or drops the newest batches
//! (`drop_newest`, counted in `dropped`).

pub mod codec;
pub mod segment;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::{BatchStatus, Finalizers, Tracker};
use crate::channel::{BufferConfig, Closed, Edge, Input, Outputs, WhenFull, DEAD_LETTER};
use crate::metrics::ComponentMetrics;
use crate::record::Batch;
use segment::{Found, Reader, Writer};

/// Records per batch read back for the consumer.
const READ_BATCH_RECORDS: usize = 1024;
/// Bytes per batch read back.
const READ_BATCH_BYTES: u64 = 1 << 20;
/// Bytes appended per group commit at most.
const GROUP_BYTES: usize = 4 << 20;
/// Records of just-written frames kept for a caught-up reader.
const RECENT_RECORDS: usize = 8 * READ_BATCH_RECORDS;
/// How long the reader waits for more frames when it has only a few records to hand out.
const LINGER: Duration = Duration::from_millis(20);
/// Splits whose delivered half is remembered (evidence for the failing half's strikes).
const SPLITS_REMEMBERED: usize = 1024;

/// The consumer's outputs as the reader holds them, for records that exhausted `max_replays`.
/// Let go as soon as the reader hands out nothing more: a clone of the consumer's outputs
/// keeps its downstream inputs open, and they must close for the pipeline to drain.
#[derive(Debug, Clone, Default)]
pub struct PoisonOutputs(Arc<Mutex<Option<Outputs>>>);

impl PoisonOutputs {
    pub(crate) fn set(&self, outputs: &Outputs) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(outputs.clone());
    }

    fn get(&self) -> Option<Outputs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn release(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Why a disk buffer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskBufferError {
    #[error("disk buffer directory {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("disk buffer directory {0} is in use by another sluice process (lock file {0}/lock); stop it, or give this pipeline another `[pipeline] id` or `data_dir`")]
    Locked(PathBuf),
}

/// The sending side of a disk buffer, held by upstream outputs.
#[derive(Debug, Clone)]
pub struct Appender {
    tx: mpsc::Sender<Append>,
}

#[derive(Debug)]
struct Append {
    frame: Vec<u8>,
    finalizers: Finalizers,
    records: usize,
    /// The records themselves (finalizers taken), handed to a caught-up reader without a
    /// disk read once the frame is durable.
    batch: Vec<crate::record::Record>,
    /// Already in the segment (a group whose write failed part-way is retried from the rest).
    appended: bool,
}

impl Appender {
    /// Encodes `batch` and queues it for the writer; its records' finalizers are finished
    /// (acknowledged upstream) once the frame is durable.
    pub(crate) async fn append(&self, mut batch: Batch) -> Result<(), Closed> {
        let mut frame = Vec::with_capacity(64 + batch.size_hint() * 2);
        codec::encode_frame(&batch, crate::topology::now_ns(), &mut frame);
        let mut finalizers = Finalizers::new();
        for r in &mut batch.records {
            finalizers.merge(std::mem::take(&mut r.finalizers));
        }
        let append = Append {
            frame,
            finalizers,
            records: batch.records.len(),
            batch: batch.records,
            appended: false,
        };
        self.tx.send(append).await.map_err(|_| Closed)
    }
}

struct State {
    /// Segment start → bytes committed in it.
    segments: BTreeMap<u64, u64>,
    /// Everything below is durable and may be read.
    committed: u64,
    /// Everything below is released.
    released: u64,
    writer_done: bool,
    /// Frames just made durable, with their records: `(start, end, written_at, records)`.
    /// A reader at `start` takes them from here instead of reading and decoding them again.
    recent: VecDeque<(u64, u64, i64, Vec<crate::record::Record>)>,
    recent_records: usize,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
    metrics: Arc<ComponentMetrics>,
    bytes: Arc<AtomicI64>,
    records: Arc<AtomicI64>,
    oldest_age: Arc<AtomicI64>,
    replays: Arc<AtomicI64>,
    corrupt: Arc<AtomicI64>,
    full: Arc<AtomicI64>,
    /// Keeps the directory locked while either thread runs.
    _lock: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens (or creates) the disk buffer in `dir` for the consumer counted in `metrics`, recovers
/// what a previous run left, and starts its writer and reader threads. Returns the edge
/// upstream outputs send into and the consumer's input.
///
/// When `shutdown` is cancelled the reader stops handing out records and closes the input as
/// [abandoned](Input::abandoned): what is still on disk, or in flight downstream and not
/// delivered by then, is replayed at the next start.
pub async fn open(
    dir: PathBuf,
    config: BufferConfig,
    metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
) -> Result<(Edge, Input), DiskBufferError> {
    let d = dir.clone();
    let m = metrics.clone();
    tokio::task::spawn_blocking(move || open_blocking(d, config, m, shutdown))
        .await
        .map_err(|e| DiskBufferError::Io(dir, io::Error::other(e.to_string())))?
}

fn open_blocking(
    dir: PathBuf,
    config: BufferConfig,
    metrics: Arc<ComponentMetrics>,
    shutdown: CancellationToken,
) -> Result<(Edge, Input), DiskBufferError> {
    let io_err = |e: io::Error| DiskBufferError::Io(dir.clone(), e);
    fs::create_dir_all(&dir).map_err(io_err)?;
    let lock = lock_dir(&dir)?;
    let released = read_released(&dir);
    let mut segments = segment::list(&dir).map_err(io_err)?;

    // Cut a torn tail of the newest segment (a crash mid-append).
    if let Some((&last, &len)) = segments.iter().next_back() {
        let path = segment::segment_path(&dir, last);
        let valid = segment::valid_end(&path).map_err(io_err)?;
        if valid < len {
            tracing::warn!(
                component = %metrics.name,
                file = %path.display(),
                cut = len - valid,
                "disk buffer: cut a torn tail left by an interrupted write"
            );
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(valid))
                .map_err(io_err)?;
            segments.insert(last, valid);
        }
    }
    // Drop segments entirely released.
    let starts: Vec<u64> = segments.keys().copied().collect();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts
            .get(i + 1)
            .copied()
            .unwrap_or(start + segments[&start]);
        if end <= released {
            let _ = fs::remove_file(segment::segment_path(&dir, start));
            segments.remove(&start);
        }
    }
    let end = segments
        .iter()
        .next_back()
        .map_or(0, |(&s, &len)| s + len)
        .max(released);
    let first = segments.keys().next().copied().unwrap_or(end);
    let read_from = released.max(first).min(end);
    if end > read_from {
        tracing::info!(
            component = %metrics.name,
            dir = %dir.display(),
            bytes = end - read_from,
            "disk buffer: replaying records a previous run did not finish"
        );
    }

    let segment_size = (config.max_size.0 / 8).clamp(1 << 20, 128 << 20);
    // A new segment at every start: a file written before a crash is never appended to.
    let writer = Writer::create(&dir, end, segment_size).map_err(io_err)?;
    segments.insert(end, 0);

    let shared = Arc::new(Shared {
        dir: dir.clone(),
        state: Mutex::new(State {
            segments,
            committed: end,
            released: read_from,
            writer_done: false,
            recent: VecDeque::new(),
            recent_records: 0,
        }),
        changed: Condvar::new(),
        bytes: metrics.gauge("disk_buffer_bytes"),
        records: metrics.gauge("disk_buffer_records"),
        oldest_age: metrics.gauge("disk_buffer_oldest_age_seconds"),
        replays: metrics.counter("disk_buffer_replays_total"),
        corrupt: metrics.counter("disk_buffer_corrupt_total"),
        full: metrics.gauge("disk_buffer_full"),
        metrics: metrics.clone(),
        _lock: lock,
    });
    shared
        .bytes
        .store(disk_bytes(&shared.lock()) as i64, Ordering::Relaxed);

    let cap = config.max_batches.max(1);
    metrics.buffer_capacity.store(cap, Ordering::Relaxed);
    // Room for a few groups of appends: one fsync covers every batch waiting, so a deeper queue
    // means fewer fsyncs per record under load (bounded: encoded frames, not records).
    let (append_tx, append_rx) = mpsc::channel::<Append>(cap.saturating_mul(8).clamp(16, 1024));
    let (out_tx, out_rx) = mpsc::channel::<Batch>(cap);
    let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dead_letter = PoisonOutputs::default();

    let w = WriterTask {
        shared: shared.clone(),
        rx: append_rx,
        writer,
        max_size: config.max_size.0,
        when_full: config.when_full,
        fsync: config.fsync,
        shutdown: shutdown.clone(),
    };
    let wake = {
        let s = Arc::downgrade(&shared);
        move || {
            if let Some(s) = s.upgrade() {
                let _guard = s.lock();
                s.changed.notify_all();
            }
        }
    };
    let r = ReaderTask {
        tracker: Tracker::new(wake),
        reader: Reader::new(&dir),
        shared: shared.clone(),
        tx: Some(out_tx),
        pos: read_from,
        pending: VecDeque::new(),
        base: 0,
        unresolved: BTreeMap::new(),
        lost_floor: None,
        retries: BTreeMap::new(),
        ok: 0,
        last_ok: false,
        ok_splits: VecDeque::new(),
        next_split: 0,
        max_replays: config.max_replays,
        dead_letter: dead_letter.clone(),
        runtime: tokio::runtime::Handle::current(),
        poisoned: metrics.counter("disk_buffer_poisoned_total"),
        persisted: read_from,
        persisted_at: Instant::now(),
        run_start: end,
        shutdown,
        abandoned: abandoned.clone(),
    };
    let name = &metrics.name;
    std::thread::Builder::new()
        .name(format!("buf-w-{name}"))
        .spawn(move || w.run())
        .map_err(io_err)?;
    std::thread::Builder::new()
        .name(format!("buf-r-{name}"))
        .spawn(move || r.run())
        .map_err(io_err)?;
    Ok((
        Edge::disk(Appender { tx: append_tx }, metrics.clone()),
        Input::from_receiver(out_rx, metrics, abandoned, dead_letter),
    ))
}

fn lock_dir(dir: &Path) -> Result<File, DiskBufferError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DiskBufferError::Io(dir.to_path_buf(), e))?;
    // A pipeline restarted in the same process may still be releasing the lock: wait a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DiskBufferError::Locked(dir.to_path_buf()))
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(DiskBufferError::Io(dir.to_path_buf(), e))
            }
        }
    }
}

fn read_released(dir: &Path) -> u64 {
    match fs::read_to_string(dir.join("released")) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(dir = %dir.display(), "disk buffer: unreadable `released` file; replaying every segment");
            0
        }),
        Err(_) => 0,
    }
}

fn write_released(dir: &Path, pos: u64) -> io::Result<()> {
    let tmp = dir.join("released.tmp");
    fs::write(&tmp, format!("{pos}\n"))?;
    fs::rename(tmp, dir.join("released"))
}

fn disk_bytes(st: &State) -> u64 {
    st.segments.values().sum()
}

struct WriterTask {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Append>,
    writer: Writer,
    max_size: u64,
    when_full: WhenFull,
    fsync: bool,
    shutdown: CancellationToken,
}

/// Whether an I/O error means the file system is full (wait for space rather than fail).
fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 /* ENOSPC */ | 122 /* EDQUOT */))
}

impl WriterTask {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut bytes = first.frame.len();
            let mut group = vec![first];
            while bytes < GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(a) => {
                        bytes += a.frame.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            if !self.wait_for_room(bytes as u64) {
                let n: usize = group.iter().map(|a| a.records).sum();
                self.shared.metrics.add_dropped(n);
                for a in group {
                    a.finalizers.finish(BatchStatus::Delivered);
                }
                continue;
            }
            let mut result = self.write(&mut group);
            // A full file system blocks like a full buffer (upstream waits, nothing is lost):
            // retry the rest of the group until space comes back or the pipeline stops.
            if result.as_ref().is_err_and(is_disk_full) {
                tracing::warn!(
                    component = %self.shared.metrics.name,
                    dir = %self.shared.dir.display(),
                    "disk buffer: the file system is full; blocking upstream until space is freed (retrying every second)"
                );
                self.shared.full.store(1, Ordering::Relaxed);
                while result.as_ref().is_err_and(is_disk_full) && !self.shutdown.is_cancelled() {
                    std::thread::sleep(Duration::from_secs(1));
                    result = self.write(&mut group);
                }
                self.shared.full.store(0, Ordering::Relaxed);
                if result.is_ok() {
                    tracing::info!(component = %self.shared.metrics.name, "disk buffer: space is back; appending again");
                }
            }
            if let Err(e) = &result {
                tracing::error!(
                    component = %self.shared.metrics.name,
                    dir = %self.shared.dir.display(),
                    error = %e,
                    "disk buffer: append failed; the batches are not acknowledged and will be redelivered"
                );
            }
            let n: usize = group.iter().map(|a| a.records).sum();
            if result.is_ok() {
                self.shared.records.fetch_add(n as i64, Ordering::Relaxed);
                for a in group {
                    a.finalizers.finish(BatchStatus::Delivered);
                }
            } else {
                // Dropped finalizers count as Errored: the source redelivers the batches.
                self.shared.metrics.add_errors(n);
                drop(group);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let mut st = self.shared.lock();
        st.writer_done = true;
        self.shared.changed.notify_all();
    }

    /// Waits until `bytes` more fit under `max_size`; `false` when they are to be dropped.
    fn wait_for_room(&self, bytes: u64) -> bool {
        let mut st = self.shared.lock();
        let live = |st: &State| self.writer.position().saturating_sub(st.released);
        if live(&st) == 0 || live(&st) + bytes <= self.max_size {
            return true;
        }
        if self.when_full == WhenFull::DropNewest {
            return false;
        }
        tracing::warn!(
            component = %self.shared.metrics.name,
            max_size = self.max_size,
            "disk buffer full: blocking upstream until the consumer releases records"
        );
        self.shared.full.store(1, Ordering::Relaxed);
        while live(&st) > 0 && live(&st) + bytes > self.max_size {
            st = self
                .shared
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        self.shared.full.store(0, Ordering::Relaxed);
        tracing::info!(component = %self.shared.metrics.name, "disk buffer has room again");
        true
    }

    fn write(&mut self, group: &mut [Append]) -> io::Result<()> {
        let mut rolled = Vec::new();
        let mut result = Ok(());
        let mut written = Vec::with_capacity(group.len());
        for a in group.iter_mut().filter(|a| !a.appended) {
            let before = self.writer.segment_start();
            let start = self.writer.position();
            let appended = self.writer.append(&a.frame);
            if appended.is_ok() {
                a.appended = true;
                let header = codec::Header::parse(&a.frame).map_or(0, |h| h.written_at);
                written.push((
                    start,
                    self.writer.position(),
                    header,
                    std::mem::take(&mut a.batch),
                ));
            }
            match appended {
                Ok(Some(new)) => rolled.push((before, new)),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && self.fsync {
            result = self.writer.sync();
        }
        if !rolled.is_empty() && self.fsync {
            let _ = segment::sync_dir(&self.shared.dir);
        }
        let mut st = self.shared.lock();
        for (old, new) in rolled {
            st.segments.insert(old, new - old);
            st.segments.insert(new, 0);
        }
        let start = self.writer.segment_start();
        st.segments.insert(start, self.writer.position() - start);
        st.committed = self.writer.position();
        if result.is_ok() {
            for entry in written {
                if st.recent_records + entry.3.len() > RECENT_RECORDS {
                    break; // the reader is behind: it reads these from disk
                }
                st.recent_records += entry.3.len();
                st.recent.push_back(entry);
            }
        }
        self.shared
            .bytes
            .store(disk_bytes(&st) as i64, Ordering::Relaxed);
        self.shared.changed.notify_all();
        drop(st);
        result
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Pending,
    Done,
}

/// What a read batch was made of: a byte range of frames, or some of its records.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
    written_at: i64,
    /// Records `lo..hi` of the range only (a half of a batch that failed, see `max_replays`).
    part: Option<(u32, u32)>,
    /// The split that made this half (its sibling has the same id); 0: not a half.
    split: u64,
    /// This range, or one it was split from, failed while its other half was delivered: its
    /// failures are its records' fault, not an outage's.
    proven: bool,
    /// Replays so far (sets the backoff).
    attempts: u32,
    /// Failures counted against `max_replays`: while alone (`part` of one record) and while
    /// the consumer delivered other records.
    strikes: u32,
    /// Goes to the consumer's `dead_letter` output, not its input.
    dead: bool,
}

/// What a failure of a range says about the consumer (see `ReaderTask::schedule_replay`).
#[derive(Debug, Clone, Copy)]
struct Evidence {
    /// Other slots were delivered since this one was handed out.
    delivered_since: bool,
    /// The slot resolved just before this failure was delivered.
    last_ok: bool,
    /// The other half of the split that made this range was delivered.
    sibling_delivered: bool,
}

/// One batch handed to the consumer.
struct Slot {
    range: Range,
    records: u32,
    /// The reader's `ok` count when handed out: more later means the consumer works.
    mark: u64,
    state: SlotState,
}

struct ReaderTask {
    tracker: Arc<Tracker>,
    reader: Reader,
    shared: Arc<Shared>,
    /// `None` once everything is read and the writer is done (the consumer's input closes).
    tx: Option<mpsc::Sender<Batch>>,
    /// Next position to read.
    pos: u64,
    /// Slot `base + i` is `pending[i]`.
    pending: VecDeque<Slot>,
    base: u64,
    /// Start positions of slots not yet resolved (with multiplicity).
    unresolved: BTreeMap<u64, u32>,
    /// Lowest start of a range that failed after the input closed: never released this run.
    lost_floor: Option<u64>,
    /// Errored ranges waiting for their replay, by due time.
    retries: BTreeMap<Instant, Vec<Range>>,
    /// Slots resolved Delivered or Rejected so far: evidence that the consumer works, so a
    /// failure is the records' fault rather than an outage.
    ok: u64,
    /// Whether the last slot resolved was delivered.
    last_ok: bool,
    /// Splits one of whose halves was delivered (the other half holds the failing record),
    /// newest last, at most `SPLITS_REMEMBERED`.
    ok_splits: VecDeque<u64>,
    next_split: u64,
    max_replays: u32,
    /// The consumer's outputs, for records that exhausted `max_replays`.
    dead_letter: PoisonOutputs,
    runtime: tokio::runtime::Handle,
    poisoned: Arc<AtomicI64>,
    persisted: u64,
    persisted_at: Instant,
    /// Where this run's writer started: frames below came from a previous run.
    run_start: u64,
    shutdown: CancellationToken,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

impl ReaderTask {
    fn run(mut self) {
        loop {
            if self.tx.as_ref().is_some_and(mpsc::Sender::is_closed) {
                break; // the consumer is gone (pipeline torn down)
            }
            if self.tx.is_some() && self.shutdown.is_cancelled() {
                // Shutting down: leave the backlog on disk for the next start.
                self.abandoned.store(true, Ordering::Release);
                self.tx = None;
                for range in std::mem::take(&mut self.retries).into_values().flatten() {
                    let start = range.start;
                    self.lost_floor = Some(self.lost_floor.map_or(start, |f| f.min(start)));
                    self.settle(start);
                }
            }
            if self.tx.is_none() {
                // Nothing more is handed out or replayed: let downstream close.
                self.dead_letter.release();
            }
            let mut progressed = self.resolve();
            progressed |= self.replay_due();
            self.release(false);
            if self.tx.is_some() {
                match self.read() {
                    Ok(p) => progressed |= p,
                    Err(e) => {
                        tracing::error!(component = %self.shared.metrics.name, error = %e, "disk buffer: read failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            if self.tx.is_none() && self.unresolved.is_empty() && self.retries.is_empty() {
                break;
            }
            if !progressed {
                let wait = self
                    .retries
                    .keys()
                    .next()
                    .map_or(Duration::from_millis(100), |due| {
                        due.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(100))
                    });
                let st = self.shared.lock();
                let _ = self.shared.changed.wait_timeout(st, wait);
            }
        }
        self.release(true);
    }

    /// One slot starting at `start` no longer waits for an outcome.
    fn settle(&mut self, start: u64) {
        if let Some(n) = self.unresolved.get_mut(&start) {
            *n -= 1;
            if *n == 0 {
                self.unresolved.remove(&start);
            }
        }
    }

    /// Applies resolved statuses; returns whether any arrived.
    fn resolve(&mut self) -> bool {
        let resolved = self.tracker.take_resolved();
        let any = !resolved.is_empty();
        for (id, status) in resolved {
            let Some(slot) = id
                .checked_sub(self.base)
                .and_then(|i| self.pending.get_mut(i as usize))
            else {
                continue;
            };
            if slot.state != SlotState::Pending {
                continue;
            }
            slot.state = SlotState::Done;
            let (range, n, mark) = (slot.range, slot.records, slot.mark);
            let last_ok = std::mem::replace(&mut self.last_ok, status != BatchStatus::Errored);
            if status == BatchStatus::Errored {
                if self.tx.is_some() {
                    let evidence = Evidence {
                        delivered_since: self.ok > mark,
                        last_ok,
                        sibling_delivered: range.split != 0
                            && self.ok_splits.contains(&range.split),
                    };
                    self.schedule_replay(range, n, evidence);
                    continue; // stays unresolved until the replay resolves
                }
                // The consumer's input is closed: keep the range for the next run.
                let start = range.start;
                self.lost_floor = Some(self.lost_floor.map_or(start, |f| f.min(start)));
            } else {
                self.ok += 1;
                if range.split != 0 && !self.ok_splits.contains(&range.split) {
                    if self.ok_splits.len() == SPLITS_REMEMBERED {
                        self.ok_splits.pop_front();
                    }
                    self.ok_splits.push_back(range.split);
                }
            }
            self.shared
                .records
                .fetch_sub(i64::from(n), Ordering::Relaxed);
            self.settle(range.start);
        }
        any
    }

    /// Schedules the replay of a failed range of `n` records. A batch is split in halves (to
    /// find the record that fails) and, with evidence that the consumer works for other
    /// records, a lone record gets a strike; after `max_replays` strikes it goes to
    /// `dead_letter`. Without evidence (an outage: everything fails) a half or a lone record is
    /// retried as is, without limit.
    fn schedule_replay(&mut self, mut range: Range, n: u32, evidence: Evidence) {
        let now = Instant::now();
        let backoff = |attempts: u32| {
            Duration::from_millis(200)
                .saturating_mul(1 << attempts.min(8))
                .min(Duration::from_secs(30))
        };
        if self.max_replays > 0 && !range.dead {
            // Splitting costs nothing but smaller batches, so a whole read batch is split at its
            // first failure (its halves are the evidence: one passing, one failing); a half is
            // split again on any sign of a working consumer.
            let proven = range.proven || evidence.sibling_delivered;
            let any_sign = proven || evidence.delivered_since || evidence.last_ok;
            if n > 1 && (range.part.is_none() || any_sign) {
                let (lo, hi) = range.part.unwrap_or((0, n));
                let mid = lo + (hi - lo) / 2;
                self.next_split += 1;
                let split = self.next_split;
                let half = |part| Range {
                    part: Some(part),
                    split,
                    proven,
                    attempts: 0,
                    strikes: 0,
                    ..range
                };
                let due = now + backoff(0);
                let halves = self.retries.entry(due).or_default();
                halves.push(half((lo, mid)));
                halves.push(half((mid, hi)));
                // The failed slot's `unresolved` entry stands for one half; add the other's.
                *self.unresolved.entry(range.start).or_default() += 1;
                return;
            }
            // A strike needs stronger evidence: records delivered since this one was handed
            // out, or a half it comes from failing while the other half passed.
            if n == 1 && (proven || evidence.delivered_since) {
                range.strikes += 1;
                if range.strikes >= self.max_replays {
                    range.dead = true;
                    self.retries.entry(now).or_default().push(range);
                    return;
                }
            }
        }
        let due = now + backoff(range.attempts);
        range.attempts += 1;
        self.retries.entry(due).or_default().push(range);
    }

    /// Replays the errored ranges whose delay is over.
    fn replay_due(&mut self) -> bool {
        let now = Instant::now();
        let due: Vec<Instant> = self.retries.range(..=now).map(|(k, _)| *k).collect();
        let mut any = false;
        for key in due {
            for range in self.retries.remove(&key).unwrap_or_default() {
                any = true;
                let segments = self.shared.lock().segments.clone();
                let mut records = match self.reader.reread(&segments, range.start, range.end) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(component = %self.shared.metrics.name, error = %e, "disk buffer: cannot re-read records for replay; retrying");
                        self.retries
                            .entry(now + Duration::from_secs(1))
                            .or_default()
                            .push(range);
                        continue;
                    }
                };
                if let Some((lo, hi)) = range.part {
                    let hi = (hi as usize).min(records.len());
                    records.truncate(hi);
                    records.drain(..(lo as usize).min(hi));
                }
                self.shared.replays.fetch_add(1, Ordering::Relaxed);
                // The old slot's `unresolved` entry stands for the replay.
                self.settle(range.start);
                if range.dead {
                    self.dead_letter(range, records);
                } else if !self.hand_out(range, records) {
                    return any;
                }
            }
        }
        any
    }

    /// Sends records that exhausted `max_replays` to the consumer's `dead_letter` output,
    /// tracked like a handed-out batch (released once the dead-letter path resolves).
    fn dead_letter(&mut self, range: Range, mut records: Vec<crate::record::Record>) {
        let Some(outputs) = self.dead_letter.get() else {
            // Not wired to a topology (cannot happen in a pipeline): keep replaying.
            *self.unresolved.entry(range.start).or_default() += 1;
            let range = Range {
                dead: false,
                strikes: 0,
                ..range
            };
            self.retries
                .entry(Instant::now() + Duration::from_secs(30))
                .or_default()
                .push(range);
            return;
        };
        let why = format!(
            "delivery failed {} times while other records were delivered; dead-lettered by the disk buffer's max_replays = {}",
            range.strikes, self.max_replays
        );
        tracing::warn!(component = %self.shared.metrics.name, records = records.len(), "disk buffer: {why}");
        self.poisoned
            .fetch_add(records.len() as i64, Ordering::Relaxed);
        let f = self.track(range, records.len());
        let reason: Arc<str> = Arc::from(why.as_str());
        for r in &mut records {
            r.finalizers = Finalizers::one(f.clone());
            r.meta.error = Some(reason.clone());
        }
        f.finish(BatchStatus::Delivered);
        let batch = Batch::new(records);
        // A closed output (shutdown) drops the batch: its finalizer reports Errored and the
        // range is kept for the next run.
        let _ = self.runtime.block_on(outputs.send_to(DEAD_LETTER, batch));
    }

    /// Adds a slot for `range` and returns the finalizer its records carry.
    fn track(&mut self, range: Range, records: usize) -> crate::ack::Finalizer {
        let id = self.base + self.pending.len() as u64;
        self.pending.push_back(Slot {
            range,
            records: records as u32,
            mark: self.ok,
            state: SlotState::Pending,
        });
        *self.unresolved.entry(range.start).or_default() += 1;
        self.tracker.finalizer(id)
    }

    /// Sends one read batch to the consumer with a finalizer tracking its range.
    fn hand_out(&mut self, range: Range, mut records: Vec<crate::record::Record>) -> bool {
        if range.attempts == 0 && range.part.is_none() && range.start < self.run_start {
            // Recovered from a previous run: counted once read (the writer counts new ones).
            self.shared
                .records
                .fetch_add(records.len() as i64, Ordering::Relaxed);
        }
        let f = self.track(range, records.len());
        for r in &mut records {
            r.finalizers = Finalizers::one(f.clone());
        }
        f.finish(BatchStatus::Delivered);
        let Some(tx) = &self.tx else { return false };
        self.shared.metrics.buffered.fetch_add(1, Ordering::Relaxed);
        if tx.blocking_send(Batch::new(records)).is_err() {
            self.shared.metrics.buffered.fetch_sub(1, Ordering::Relaxed);
            self.tx = None;
            return false;
        }
        true
    }

    /// Reads up to one batch of committed frames and hands it out.
    fn read(&mut self) -> io::Result<bool> {
        let mut records = Vec::new();
        let mut start = None;
        let mut written_at = 0;
        let mut read_bytes = 0;
        let mut lingered = false;
        loop {
            // Fast path: the frame at `pos` was just written; its records are still in memory.
            let fresh = {
                let mut st = self.shared.lock();
                while st.recent.front().is_some_and(|e| e.1 <= self.pos) {
                    if let Some(stale) = st.recent.pop_front() {
                        st.recent_records -= stale.3.len();
                    }
                }
                if st.recent.front().is_some_and(|e| e.0 == self.pos) {
                    let entry = st.recent.pop_front();
                    if let Some(e) = &entry {
                        st.recent_records -= e.3.len();
                    }
                    entry
                } else {
                    None
                }
            };
            if let Some((s, end, w, rs)) = fresh {
                if start.is_none() {
                    start = Some(s);
                    written_at = w;
                }
                read_bytes += end - s;
                records.extend(rs);
                self.pos = end;
                if records.len() >= READ_BATCH_RECORDS || read_bytes >= READ_BATCH_BYTES {
                    break;
                }
                continue;
            }
            let (committed, seg, seg_len, next_seg, writer_done) = {
                let st = self.shared.lock();
                let Some((&seg, &len)) = st.segments.range(..=self.pos).next_back() else {
                    break;
                };
                let next = st.segments.range(self.pos + 1..).next().map(|(&s, _)| s);
                (st.committed, seg, len, next, st.writer_done)
            };
            let limit = (seg + seg_len).min(committed);
            let found = if self.pos < limit {
                self.reader.next(seg, self.pos, limit)?
            } else {
                None
            };
            match found {
                Some(Found::Frame {
                    start: s,
                    end,
                    written_at: w,
                    records: rs,
                }) => {
                    if start.is_none() {
                        start = Some(s);
                        written_at = w;
                    }
                    read_bytes += end - s;
                    records.extend(rs);
                    self.pos = end;
                    if records.len() >= READ_BATCH_RECORDS || read_bytes >= READ_BATCH_BYTES {
                        break;
                    }
                }
                Some(Found::Skipped {
                    start: s,
                    end,
                    reason,
                }) => {
                    self.shared.corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        component = %self.shared.metrics.name,
                        dir = %self.shared.dir.display(),
                        from = s,
                        to = end,
                        %reason,
                        "disk buffer: skipped damaged bytes"
                    );
                    if start.is_none() {
                        // Nothing handed out yet: the damaged range is released with the next.
                        start = Some(s);
                    }
                    self.pos = end;
                }
                None => {
                    if let Some(next) = next_seg {
                        // End of a finished segment (a torn frame there is skipped too).
                        if self.pos < seg + seg_len {
                            self.shared.corrupt.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(component = %self.shared.metrics.name, segment = seg, "disk buffer: skipped a torn frame at the end of a segment");
                        }
                        self.pos = next;
                        continue;
                    }
                    if !records.is_empty() && records.len() < 64 && !lingered && !writer_done {
                        lingered = true;
                        let st = self.shared.lock();
                        let _ = self.shared.changed.wait_timeout(st, LINGER);
                        continue;
                    }
                    if writer_done
                        && self.pos >= committed
                        && records.is_empty()
                        && self.retries.is_empty()
                    {
                        // Everything is read and nothing more can come: close the input.
                        self.tx = None;
                        return Ok(true);
                    }
                    break;
                }
            }
        }
        let Some(start) = start else { return Ok(false) };
        if records.is_empty() {
            // Only damage was read: nothing to hand out, nothing to wait for.
            return Ok(true);
        }
        let range = Range {
            start,
            end: self.pos,
            written_at,
            part: None,
            split: 0,
            proven: false,
            attempts: 0,
            strikes: 0,
            dead: false,
        };
        self.hand_out(range, records);
        Ok(true)
    }

    /// Advances the released position and reclaims segments below it.
    fn release(&mut self, force: bool) {
        while self
            .pending
            .front()
            .is_some_and(|s| s.state == SlotState::Done)
        {
            self.pending.pop_front();
            self.base += 1;
        }
        // Ranges waiting for a replay keep their `unresolved` entry, so they hold it back too.
        let mut released = self.unresolved.keys().next().copied().unwrap_or(self.pos);
        if let Some(floor) = self.lost_floor {
            released = released.min(floor);
        }
        let oldest = self
            .pending
            .iter()
            .find(|s| s.state == SlotState::Pending)
            .map(|s| s.range.written_at);
        let age = oldest.map_or(0, |w| {
            (crate::topology::now_ns().saturating_sub(w) / 1_000_000_000).max(0)
        });
        self.shared.oldest_age.store(age, Ordering::Relaxed);

        let mut st = self.shared.lock();
        if released > st.released {
            st.released = released;
            // Reclaim finished segments wholly below the released position.
            let starts: Vec<u64> = st.segments.keys().copied().collect();
            for pair in starts.windows(2) {
                if pair[1] <= released
                    && fs::remove_file(segment::segment_path(&self.shared.dir, pair[0])).is_ok()
                {
                    st.segments.remove(&pair[0]);
                }
            }
            self.shared
                .bytes
                .store(disk_bytes(&st) as i64, Ordering::Relaxed);
            self.shared.changed.notify_all();
        }
        let released = st.released;
        drop(st);
        let due = force || self.persisted_at.elapsed() >= Duration::from_millis(200);
        if released != self.persisted && due {
            match write_released(&self.shared.dir, released) {
                Ok(()) => self.persisted = released,
                Err(e) => {
                    tracing::warn!(component = %self.shared.metrics.name, error = %e, "disk buffer: cannot save the released position (records may be replayed after a restart)")
                }
            }
            self.persisted_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests;
