//! The Raft log, hard state and conf state in RocksDB, behind
//! [`raft::Storage`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use rocksdb::{WriteBatch, DB};

use super::{cf, decode_u64, machine, Disk, StorageError, CF_LOG, CF_META, CF_STATE};
use crate::config::InstallStep;

const HARD_STATE: &[u8] = b"hard_state";
pub(super) const CONF_STATE: &[u8] = b"conf_state";
/// Index and term of the last entry removed by compaction or covered by an
/// installed snapshot.
const COMPACTED: &[u8] = b"compacted";

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft side of a node's storage. Owned by the node loop.
pub struct RaftStore {
    db: Disk,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term just below the first entry in the log.
    compacted: (u64, u64),
    /// Term of every entry in the log, from `compacted.0 + 1` on: raft-rs
    /// asks for terms constantly and the log is kept short by compaction.
    terms: VecDeque<u64>,
    snapshots: Snapshots,
    /// Test only: exit inside the next install through a table file.
    stop_in_install: Option<InstallStep>,
}

impl RaftStore {
    /// Opens the log. On a fresh database, records `voters` as the initial
    /// configuration (every member of a new cluster starts with the same
    /// list, so no bootstrap step is needed).
    pub fn open(db: Disk, voters: &[u64]) -> Result<Self, StorageError> {
        let meta = cf(&db, CF_META);
        let hard_state = match db.get_cf(meta, HARD_STATE)? {
            Some(b) => HardState::parse_from_bytes(&b)
                .map_err(|e| StorageError::corrupt("hard state", e))?,
            None => HardState::default(),
        };
        let stored_conf = match db.get_cf(meta, CONF_STATE)? {
            Some(b) => Some(
                ConfState::parse_from_bytes(&b)
                    .map_err(|e| StorageError::corrupt("conf state", e))?,
            ),
            None => None,
        };
        let (hard_state, conf_state) = match stored_conf {
            Some(cs) => (hard_state, cs),
            None => {
                Self::refuse_partial(&db)?;
                Self::bootstrap(&db, voters)?
            }
        };
        let compacted = parse_compaction_point(db.get_cf(meta, COMPACTED)?)?;
        let mut terms = VecDeque::new();
        let first = compacted.0 + 1;
        let iter = db.iterator_cf(
            cf(&db, CF_LOG),
            rocksdb::IteratorMode::From(&log_key(first), rocksdb::Direction::Forward),
        );
        for (expect, item) in (first..).zip(iter) {
            let (k, v) = item?;
            let index = decode_u64("log key", &k)?;
            if index != expect {
                return Err(StorageError::corrupt(
                    "raft log",
                    format!("entry {index} found where {expect} was expected"),
                ));
            }
            let e = Entry::parse_from_bytes(&v).map_err(|e| StorageError::corrupt("entry", e))?;
            terms.push_back(e.term);
        }
        Ok(Self {
            db,
            hard_state,
            conf_state,
            compacted,
            terms,
            snapshots: Snapshots::default(),
            stop_in_install: None,
        })
    }

    /// A directory without a configuration must be new: the first open
    /// writes it with the hard state and the compaction point, before any
    /// entry or state. One that holds any of those lost its configuration
    /// (damaged, or written by something else), and a fresh log over it
    /// would forget its term, vote and commit without a word.
    fn refuse_partial(db: &Disk) -> Result<(), StorageError> {
        let meta = cf(db, CF_META);
        let mut held = Vec::new();
        for (key, what) in [
            (HARD_STATE, "a hard state"),
            (COMPACTED, "a compaction point"),
        ] {
            if db.get_cf(meta, key)?.is_some() {
                held.push(what);
            }
        }
        for (family, what) in [(CF_LOG, "log entries"), (CF_STATE, "state")] {
            if db
                .iterator_cf(cf(db, family), rocksdb::IteratorMode::Start)
                .next()
                .transpose()?
                .is_some()
            {
                held.push(what);
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        Err(StorageError::corrupt(
            "conf state",
            format!(
                "missing from a data directory that holds {}; a fresh log over it would \
                 forget this node's term, vote and commit",
                held.join(", ")
            ),
        ))
    }

    /// Initializes a fresh log. A founding member starts as if index 1
    /// (term 1) had been committed and compacted, holding the initial
    /// configuration: every founder starts identically, and a node that
    /// joins later (empty, no voters) must receive a snapshot, which carries
    /// the configuration that its empty log could not replay.
    fn bootstrap(db: &Disk, voters: &[u64]) -> Result<(HardState, ConfState), StorageError> {
        let meta = cf(db, CF_META);
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        let cs_bytes = cs
            .write_to_bytes()
            .map_err(|e| StorageError::corrupt("conf state", e))?;
        batch.put_cf(meta, CONF_STATE, cs_bytes);
        let hs = if voters.is_empty() {
            HardState::default()
        } else {
            batch.put_cf(meta, COMPACTED, compaction_point(1, 1));
            HardState {
                term: 1,
                commit: 1,
                ..Default::default()
            }
        };
        let hs_bytes = hs
            .write_to_bytes()
            .map_err(|e| StorageError::corrupt("hard state", e))?;
        batch.put_cf(meta, HARD_STATE, hs_bytes);
        db.write_batch(batch, true)?;
        Ok((hs, cs))
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn first(&self) -> u64 {
        self.compacted.0 + 1
    }

    pub fn last(&self) -> u64 {
        self.compacted.0 + self.terms.len() as u64
    }

    /// Index of the last compaction or installed snapshot.
    pub fn compacted_index(&self) -> u64 {
        self.compacted.0
    }

    /// Builds snapshots for followers on a thread of their own (see
    /// `Snapshots`).
    pub fn build_snapshots_in_background(&mut self) {
        self.snapshots.background = true;
    }

    /// The snapshot for followers: its index and whether it is still being
    /// built (its index is then the log's start now, the least it will
    /// have), or `None`. Compaction keeps the entries after it, which its
    /// follower needs next.
    pub fn snapshot_hold(&self) -> Option<(u64, bool)> {
        let st = self.snapshots.lock();
        match (&st.ready, st.building) {
            (Some(snap), _) => Some((snap.get_metadata().index, false)),
            (None, true) => Some((self.compacted.0, true)),
            (None, false) => None,
        }
    }

    /// Drops the finished snapshot (a later request builds a new one).
    pub fn drop_snapshot(&self) {
        self.snapshots.lock().ready = None;
    }

    /// Appends entries (replacing any conflicting suffix) and the new hard
    /// state in one write. Returns whether the write needs a sync: it does
    /// when it carries entries, a term or a vote, as raft-rs requires those
    /// on disk before the messages that depend on them are sent. The write
    /// is synced at once when `sync_now`; otherwise the caller must have the
    /// log synced ([`Disk::sync_wal`]) before it tells raft-rs the entries
    /// are persisted. A hard state that only moves the commit index needs no
    /// sync, as with [`RaftStore::set_commit`]: a lost commit index is learnt
    /// again from the leader, and a later synced write (the WAL is one
    /// ordered file) persists it anyway. This saves one fsync per commit
    /// advance on every node.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync_now: bool,
    ) -> Result<bool, StorageError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        if let Some(first) = entries.first() {
            if first.index <= self.compacted.0 {
                return Err(StorageError::corrupt(
                    "append",
                    format!(
                        "entry {} is below the compaction point {}",
                        first.index, self.compacted.0
                    ),
                ));
            }
            if first.index > self.last() + 1 {
                return Err(StorageError::corrupt(
                    "append",
                    format!("gap: entry {} after last {}", first.index, self.last()),
                ));
            }
            // Entries from first.index on are replaced.
            if first.index <= self.last() {
                batch.delete_range_cf(log, log_key(first.index), log_key(self.last() + 1));
            }
            for e in entries {
                let bytes = e
                    .write_to_bytes()
                    .map_err(|err| StorageError::corrupt("entry", err))?;
                batch.put_cf(log, log_key(e.index), bytes);
            }
        }
        if let Some(hs) = hs {
            let bytes = hs
                .write_to_bytes()
                .map_err(|e| StorageError::corrupt("hard state", e))?;
            batch.put_cf(cf(&self.db, CF_META), HARD_STATE, bytes);
        }
        let needs_sync = !entries.is_empty()
            || hs.is_some_and(|hs| {
                hs.term != self.hard_state.term || hs.vote != self.hard_state.vote
            });
        self.db.write_batch(batch, needs_sync && sync_now)?;

        if let Some(first) = entries.first() {
            let keep = (first.index - self.compacted.0 - 1) as usize;
            self.terms.truncate(keep);
            self.terms.extend(entries.iter().map(|e| e.term));
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(needs_sync && !sync_now)
    }

    /// Makes every write so far durable (see [`Disk::sync_wal`]).
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        self.db.sync_wal()
    }

    /// Records a new commit index. Not synced: raft-rs recovers the commit
    /// index from its peers, and a later synced write persists it anyway.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        self.hard_state.commit = commit;
        let bytes = self
            .hard_state
            .write_to_bytes()
            .map_err(|e| StorageError::corrupt("hard state", e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), HARD_STATE, bytes);
        self.db.write_batch(batch, false)?;
        Ok(())
    }

    /// Adopts a configuration already written to disk (by the state
    /// machine's apply batch).
    pub fn cache_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Raises the stored commit index to `index`, which MUST be committed
    /// (e.g. already applied). Repairs a crash between applying entries and
    /// persisting the hard state that announced their commit.
    pub fn ensure_commit(&mut self, index: u64) -> Result<(), StorageError> {
        if self.hard_state.commit >= index {
            return Ok(());
        }
        self.set_commit(index)
    }

    /// Removes entries up to and including `index`, which MUST already be
    /// applied. Not synced: the node's loop makes this write, and an fsync
    /// there held every call for its length. Nothing needs it durable. A
    /// crash loses unsynced writes from the end of the write-ahead log
    /// only (RocksDB recovers up to the first torn record), so a compaction
    /// that survives brings the state-machine writes of the entries it
    /// removed with it (written before it, on the same loop), and one that
    /// is lost leaves those entries in the log to be applied again.
    pub fn compact(&mut self, index: u64) -> Result<(), StorageError> {
        if index <= self.compacted.0 {
            return Ok(());
        }
        if index > self.last() {
            return Err(StorageError::corrupt(
                "compaction",
                format!("index {index} is past the last entry {}", self.last()),
            ));
        }
        let term = self.terms[(index - self.compacted.0 - 1) as usize];
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            log_key(self.compacted.0 + 1),
            log_key(index + 1),
        );
        batch.put_cf(
            cf(&self.db, CF_META),
            COMPACTED,
            compaction_point(index, term),
        );
        self.db.write_batch(batch, false)?;
        let drop = (index - self.compacted.0) as usize;
        self.terms.drain(..drop);
        self.compacted = (index, term);
        Ok(())
    }

    /// Installs a snapshot from the leader: replaces the state machine and
    /// the log. Answers whether the state went through a table file.
    ///
    /// A small snapshot is one synced write. A large one (at least
    /// `INGEST_MIN_BYTES`) would be one too large write: every key put
    /// through the write-ahead log and the state family's memtable, whose
    /// in-place updates search it before each insert (28 million keys held
    /// the node loop 66-122 s, session 31). So its state is written, in key
    /// order, to a table file RocksDB ingests whole, and the install takes
    /// three steps: the file and an `INSTALLING` mark (synced), the state
    /// family replaced by the file, then the log replaced and the mark
    /// removed (synced). A node stopped between them finishes the install
    /// when it opens its database again (`resume_install`). The
    /// simulation's disk records writes only, so it installs in one write.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> Result<bool, StorageError> {
        // A build still running may take its checkpoint between two of the
        // install's steps, a state that is no snapshot (the state family
        // replaced, the log not yet): it is dropped as overtaken, not
        // counted as a failed build.
        self.snapshots.lock().generation += 1;
        let meta = snap.get_metadata();
        let ingested = snap.get_data().len() >= INGEST_MIN_BYTES
            && !self.db.is_simulated()
            && self.stage_install(snap)?;
        let hs = self.hard_state.clone();
        let (hs, cs) = if ingested {
            self.maybe_stop_after(InstallStep::Staged);
            ingest_staged_state(&self.db, meta)?;
            self.maybe_stop_after(InstallStep::Ingested);
            finish_install(&self.db, meta, hs)?
        } else {
            let mut batch = WriteBatch::default();
            machine::write_snapshot(&self.db, &mut batch, meta.index, snap.get_data())?;
            let replaced = replace_log(&self.db, &mut batch, meta, hs)?;
            self.db.write_batch(batch, true)?;
            replaced
        };
        self.hard_state = hs;
        self.conf_state = cs;
        self.compacted = (meta.index, meta.term);
        self.terms.clear();
        // Older than the state now, as is one being built: a follower
        // would need what it lacks.
        let mut st = self.snapshots.lock();
        st.ready = None;
        st.generation += 1;
        Ok(ingested)
    }

    /// Test only: makes the next install through a table file exit the
    /// process after `step`, as a crash there would.
    pub fn stop_in_install(&mut self, step: Option<InstallStep>) {
        self.stop_in_install = step;
    }

    fn maybe_stop_after(&self, step: InstallStep) {
        if self.stop_in_install == Some(step) {
            tracing::error!(
                ?step,
                "stopping inside a snapshot install, as configured (test only)"
            );
            std::process::exit(crate::config::STOPPED_IN_INSTALL);
        }
    }

    /// The first step of an install through a table file: writes the
    /// snapshot's state to the file and, once it is durable, the mark
    /// naming the snapshot. Answers false (nothing marked) if the
    /// snapshot's keys are out of order, which a table file cannot take.
    fn stage_install(&self, snap: &Snapshot) -> Result<bool, StorageError> {
        let meta = snap.get_metadata();
        let dir = install_dir(self.db.path());
        remove_install_dir(&dir);
        let io = |source| StorageError::Dir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let file = dir.join(INSTALL_FILE);
        if !machine::write_state_file(&file, meta.index, snap.get_data())? {
            tracing::warn!(
                index = meta.index,
                "snapshot keys out of order for a table file: installed in one write"
            );
            remove_install_dir(&dir);
            return Ok(false);
        }
        // The file's contents are synced by RocksDB; its name, and the
        // directory's (made afresh for each install), by these.
        for d in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
            std::fs::File::open(d)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        let mut batch = WriteBatch::default();
        let meta_bytes = meta
            .write_to_bytes()
            .map_err(|e| StorageError::corrupt("snapshot metadata", e))?;
        batch.put_cf(cf(&self.db, CF_META), INSTALLING, meta_bytes);
        self.db.write_batch(batch, true)?;
        Ok(true)
    }

    fn entry(&self, index: u64) -> Result<Entry, StorageError> {
        let bytes = self
            .db
            .get_cf(cf(&self.db, CF_LOG), log_key(index))?
            .ok_or_else(|| StorageError::corrupt("raft log", format!("entry {index} missing")))?;
        Entry::parse_from_bytes(&bytes).map_err(|e| StorageError::corrupt("entry", e))
    }
}

/// Adds to `batch` the writes that replace the log with the snapshot
/// `meta` describes: no entries, the compaction point at the snapshot, its
/// configuration, and `hs` with the snapshot's index committed. Answers the
/// hard and conf state written.
fn replace_log(
    db: &DB,
    batch: &mut WriteBatch,
    meta: &SnapshotMetadata,
    mut hs: HardState,
) -> Result<(HardState, ConfState), StorageError> {
    let log = cf(db, CF_LOG);
    batch.delete_range_cf(log, log_key(0), log_key(u64::MAX));
    let metacf = cf(db, CF_META);
    batch.put_cf(metacf, COMPACTED, compaction_point(meta.index, meta.term));
    let cs = meta.get_conf_state().clone();
    let cs_bytes = cs
        .write_to_bytes()
        .map_err(|e| StorageError::corrupt("conf state", e))?;
    batch.put_cf(metacf, CONF_STATE, cs_bytes);
    // The snapshot's index is committed; the term and vote stay raft-rs's
    // to persist (raising the term here would re-date an old vote).
    hs.commit = hs.commit.max(meta.index);
    let hs_bytes = hs
        .write_to_bytes()
        .map_err(|e| StorageError::corrupt("hard state", e))?;
    batch.put_cf(metacf, HARD_STATE, hs_bytes);
    Ok((hs, cs))
}

/// Snapshots at least this large are installed through a table file (see
/// [`RaftStore::install_snapshot`]), about 45,000 keys.
const INGEST_MIN_BYTES: usize = 1 << 20;
/// Meta key: the metadata of a snapshot being installed through a table
/// file. Written once the file is durable, removed with the write that
/// replaces the log; found on start, it means the install was cut short.
const INSTALLING: &[u8] = b"installing";
/// The table file, in [`install_dir`], holding a staged snapshot's state.
const INSTALL_FILE: &str = "state.sst";

/// Where an install stages its table file, beside the database at `db`.
pub(super) fn install_dir(db: &std::path::Path) -> std::path::PathBuf {
    db.with_file_name("snapshot-install")
}

fn remove_install_dir(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot install's files failed")
        }
    }
}

/// The last step of an install through a table file, once the state
/// family holds the snapshot `meta`'s state ([`ingest_staged_state`]): the
/// log replaced and the mark removed, in one synced write.
fn finish_install(
    db: &Disk,
    meta: &SnapshotMetadata,
    hs: HardState,
) -> Result<(HardState, ConfState), StorageError> {
    let mut batch = WriteBatch::default();
    let replaced = replace_log(db, &mut batch, meta, hs)?;
    batch.delete_cf(cf(db, CF_META), INSTALLING);
    db.write_batch(batch, true)?;
    remove_install_dir(&install_dir(db.path()));
    Ok(replaced)
}

/// Replaces the state family with the staged table file of the snapshot
/// `meta`, unless it already holds the snapshot's applied index: the file
/// was ingested before a stop. (The state held before the install is
/// older, as raft-rs restores only a snapshot above its commit index; and
/// any state applied up to that index would be the snapshot's anyway.)
fn ingest_staged_state(db: &Disk, meta: &SnapshotMetadata) -> Result<(), StorageError> {
    if machine::applied_index(db)? == meta.index {
        return Ok(());
    }
    let file = install_dir(db.path()).join(INSTALL_FILE);
    if !file.exists() {
        return Err(StorageError::corrupt(
            "snapshot install",
            format!(
                "the install of the snapshot at index {} was cut short and its state \
                 file {} is gone; this data directory cannot be used",
                meta.index,
                file.display()
            ),
        ));
    }
    let state = cf(db, CF_STATE);
    let mut batch = WriteBatch::default();
    // Every state key begins with a letter.
    batch.delete_range_cf(state, &b""[..], &b"\xff"[..]);
    db.write_batch(batch, false)?;
    // The state family updates values in place and must not hold a range
    // deletion in its memtable (see `storage::state_options`): flushed at
    // once, before anything else is written to it.
    db.flush_cf(state)?;
    let mut opts = rocksdb::IngestExternalFileOptions::default();
    // Linked into the database, not copied; the staged name goes with it.
    opts.set_move_files(true);
    db.ingest_external_file_cf_opts(state, &opts, vec![file])?;
    Ok(())
}

/// Finishes an install through a table file that a stop cut short (see
/// [`RaftStore::install_snapshot`]), before anything reads the state or
/// the log; removes a staged file that was never marked.
pub(super) fn resume_install(db: &Disk) -> Result<(), StorageError> {
    let metacf = cf(db, CF_META);
    let Some(bytes) = db.get_cf(metacf, INSTALLING)? else {
        remove_install_dir(&install_dir(db.path()));
        return Ok(());
    };
    let meta = SnapshotMetadata::parse_from_bytes(&bytes)
        .map_err(|e| StorageError::corrupt("snapshot install mark", e))?;
    let hs = match db.get_cf(metacf, HARD_STATE)? {
        Some(b) => {
            HardState::parse_from_bytes(&b).map_err(|e| StorageError::corrupt("hard state", e))?
        }
        None => HardState::default(),
    };
    tracing::warn!(
        index = meta.index,
        "finishing a snapshot install the node stopped in"
    );
    ingest_staged_state(db, &meta)?;
    finish_install(db, &meta, hs)?;
    Ok(())
}

fn parse_compaction_point(bytes: Option<Vec<u8>>) -> Result<(u64, u64), StorageError> {
    match bytes {
        Some(b) if b.len() == 16 => Ok((
            decode_u64("compaction point", &b[..8])?,
            decode_u64("compaction point", &b[8..])?,
        )),
        Some(b) => Err(StorageError::corrupt(
            "compaction point",
            format!("{} bytes", b.len()),
        )),
        None => Ok((0, 0)),
    }
}

/// Builds a snapshot of the applied state from one RocksDB snapshot of
/// `db`, so the state, its index, that entry's term and the configuration
/// applied with it (written in the same batch) agree. Only while nothing
/// writes to `db`: the state family updates values in place, and a RocksDB
/// snapshot of it is no point-in-time view under concurrent writes (see
/// `storage::state_options`).
fn build_snapshot(db: &DB) -> Result<Snapshot, StorageError> {
    let view = db.snapshot();
    let (applied, data) = machine::read_snapshot(db, &view)?;
    let meta_cf = cf(db, CF_META);
    let compacted = parse_compaction_point(view.get_cf(meta_cf, COMPACTED)?)?;
    // A fresh cluster's bootstrap index counts as applied (empty state),
    // and an installed snapshot's index is applied with it.
    let (index, term) = if applied <= compacted.0 {
        compacted
    } else {
        let bytes = view
            .get_cf(cf(db, CF_LOG), log_key(applied))?
            .ok_or_else(|| {
                StorageError::corrupt("raft log", format!("applied entry {applied} missing"))
            })?;
        let e = Entry::parse_from_bytes(&bytes).map_err(|e| StorageError::corrupt("entry", e))?;
        (applied, e.term)
    };
    let conf_state = match view.get_cf(meta_cf, CONF_STATE)? {
        Some(b) => {
            ConfState::parse_from_bytes(&b).map_err(|e| StorageError::corrupt("conf state", e))?
        }
        None => return Err(StorageError::corrupt("conf state", "missing")),
    };
    let mut snap = Snapshot {
        data: data.into(),
        ..Default::default()
    };
    let meta: &mut SnapshotMetadata = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf_state);
    Ok(snap)
}

/// Builds a snapshot off the node loop, while it writes: from a checkpoint
/// of `db` (its table files hard-linked and its write-ahead log copied, a
/// point-in-time copy RocksDB makes under writes), opened read-only in a
/// directory beside it and removed after.
fn build_from_checkpoint(db: &Disk) -> Result<Snapshot, StorageError> {
    let dir = checkpoint_dir(db.path());
    remove_checkpoint(&dir);
    rocksdb::checkpoint::Checkpoint::new(db)?.create_checkpoint(&dir)?;
    let built = DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        &dir,
        [CF_LOG, CF_META, CF_STATE],
        false,
    )
    .map_err(StorageError::from)
    .and_then(|copy| build_snapshot(&copy));
    remove_checkpoint(&dir);
    built
}

/// Where [`build_from_checkpoint`] puts its copy of the database at `db`.
pub(super) fn checkpoint_dir(db: &std::path::Path) -> std::path::PathBuf {
    db.with_file_name("snapshot-checkpoint")
}

/// Removes a checkpoint directory: after a build, or left by a crash.
pub(super) fn remove_checkpoint(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a snapshot checkpoint failed")
        }
    }
}

/// Whether configuration `cs` has node `id` in it, in any role.
fn names(cs: &ConfState, id: u64) -> bool {
    [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ]
    .iter()
    .any(|ids| ids.contains(&id))
}

/// Snapshots for followers that fell behind the log. One of a large state
/// takes seconds to read and encode: built on the node loop, it would stop
/// heartbeats for that long, the followers would elect another leader, and
/// that one would start over. So a thread builds it while the store answers
/// "temporarily unavailable" (raft-rs asks again on the follower's next
/// heartbeat response), and the finished one serves every follower that
/// needs one while its index is still in the log. The thread reads a
/// checkpoint, not the live database (see [`build_from_checkpoint`]).
#[derive(Default)]
struct Snapshots {
    /// Built by a thread; otherwise (the simulation, which must replay
    /// exactly) built inline on the first request and handed out on the
    /// next, the same answers in the same order.
    background: bool,
    state: Arc<Mutex<SnapshotState>>,
}

#[derive(Default)]
struct SnapshotState {
    building: bool,
    ready: Option<Snapshot>,
    /// Bumped when the state is replaced (as a snapshot install here
    /// starts, and once it is done): a build started before is of no use
    /// after, and is dropped.
    generation: u64,
    /// When the last build on a thread failed: the next waits a while
    /// rather than start at every heartbeat response (a full disk, say).
    failed_at: Option<std::time::Instant>,
}

/// Held by a test to keep a build on a thread from finishing.
#[cfg(test)]
static BUILD_GATE: Mutex<()> = Mutex::new(());

/// How long after a failed build the next may start.
const REBUILD_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(1);

impl Snapshots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SnapshotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The finished snapshot if it is at `floor` or later and its
    /// configuration holds `to` (a node added after it was built ignores
    /// it: raft-rs restores only a snapshot that names the node);
    /// otherwise starts building one (unless one is being built) and
    /// answers `None`.
    fn get(&self, db: &Disk, floor: u64, to: u64) -> Option<Snapshot> {
        let mut st = self.lock();
        if let Some(snap) = st.ready.as_ref() {
            let meta = snap.get_metadata();
            if meta.index >= floor && names(meta.get_conf_state(), to) {
                return Some(snap.clone());
            }
            st.ready = None;
        }
        if st.building {
            return None;
        }
        if !self.background {
            st.ready = build_snapshot(db)
                .map_err(|e| tracing::error!(error = %e, "building a snapshot failed"))
                .ok();
            return None;
        }
        if st
            .failed_at
            .is_some_and(|at| at.elapsed() < REBUILD_AFTER_FAILURE)
        {
            return None;
        }
        st.building = true;
        let generation = st.generation;
        let db = db.clone();
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name("seqd-snapshot".into())
            .spawn(move || {
                #[cfg(test)]
                drop(BUILD_GATE.lock().unwrap_or_else(|p| p.into_inner()));
                let started = std::time::Instant::now();
                let built = build_from_checkpoint(&db);
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                st.building = false;
                match built {
                    Ok(_) if st.generation != generation => {
                        tracing::info!(
                            "snapshot built for followers dropped: the state was replaced"
                        );
                    }
                    Ok(snap) => {
                        let took = started.elapsed();
                        let bytes = snap.get_data().len();
                        metrics::gauge!(crate::metrics::SNAPSHOT_BUILD_SECONDS)
                            .set(took.as_secs_f64());
                        metrics::gauge!(crate::metrics::SNAPSHOT_BYTES).set(bytes as f64);
                        tracing::info!(
                            index = snap.get_metadata().index,
                            bytes,
                            took_ms = took.as_millis() as u64,
                            "snapshot built for followers"
                        );
                        st.ready = Some(snap);
                    }
                    Err(e) if st.generation != generation => {
                        tracing::info!(
                            error = %e,
                            "snapshot build for followers dropped: the state was replaced \
                             while it was built"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "building a snapshot failed");
                        st.failed_at = Some(std::time::Instant::now());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting the snapshot thread failed");
            st.building = false;
        }
        None
    }
}

fn compaction_point(index: u64, term: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&index.to_be_bytes());
    v.extend_from_slice(&term.to_be_bytes());
    v
}

fn other(e: StorageError) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(e)))
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.compacted.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for index in low..high {
            let e = self.entry(index).map_err(other)?;
            size += u64::from(protobuf::Message::compute_size(&e));
            // Always return at least one entry, as raft-rs expects.
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.compacted.0 {
            return Ok(self.compacted.1);
        }
        if idx < self.compacted.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        match self.terms.get((idx - self.compacted.0 - 1) as usize) {
            Some(t) => Ok(*t),
            None => Err(raft::Error::Store(RaftStorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // One below the log's first entry: the follower needs the entries
        // after the snapshot, which an older one would leave out.
        let floor = request_index.max(self.compacted.0);
        self.snapshots
            .get(&self.db, floor, to)
            .ok_or(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ))
    }
}

/// Whether the state CF has been written at all (for tests and status).
pub fn has_state(db: &DB) -> bool {
    db.iterator_cf(cf(db, CF_STATE), rocksdb::IteratorMode::Start)
        .next()
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_directory_that_lost_its_configuration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db.clone(), &[1, 2, 3]).unwrap();
        let hs = HardState {
            term: 7,
            vote: 2,
            commit: 1,
            ..Default::default()
        };
        s.append(&[entry(2, 7)], Some(&hs), true).unwrap();
        drop(s);
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&db, CF_META), CONF_STATE);
        db.write_batch(batch, true).unwrap();
        let err = RaftStore::open(db.clone(), &[1, 2, 3])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("conf state")
                && err.contains("a hard state, a compaction point, log entries"),
            "{err}"
        );
        // Nothing was overwritten: the term and vote are still there.
        let stored = db.get_cf(cf(&db, CF_META), HARD_STATE).unwrap().unwrap();
        assert_eq!(HardState::parse_from_bytes(&stored).unwrap(), hs);
        // A new directory still starts.
        let fresh = tempfile::tempdir().unwrap();
        RaftStore::open(super::super::open(fresh.path()).unwrap(), &[1]).unwrap();
    }

    #[test]
    fn append_truncates_conflicts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db.clone(), &[1, 2, 3]).unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 0,
            ..Default::default()
        };
        // A founding member starts after a compacted index 1.
        assert_eq!((s.first(), s.last()), (2, 1));
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)], Some(&hs), true)
            .unwrap();
        assert!(!s.append(&[entry(3, 2)], None, true).unwrap(), "synced");
        // Entries written for a later sync, then synced: on a real disk.
        assert!(s.append(&[entry(4, 2)], None, false).unwrap(), "owed");
        db.sync_wal().unwrap();
        assert_eq!((s.first(), s.last()), (2, 4));
        assert_eq!(s.term(3).unwrap(), 2);
        drop(s);
        let s = RaftStore::open(db, &[9]).unwrap();
        assert_eq!(s.last(), 4);
        assert_eq!(s.hard_state().vote, 1);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        let got = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn only_a_commit_advance_is_written_without_a_sync() {
        use crate::storage::{open_journaled, Journal};
        use std::sync::{Arc, Mutex};
        let journal = Arc::new(Mutex::new(Journal::default()));
        let mut s = RaftStore::open(open_journaled(journal.clone()).unwrap(), &[1]).unwrap();
        let hs = |term, vote, commit| HardState {
            term,
            vote,
            commit,
            ..Default::default()
        };
        s.append(&[entry(2, 1), entry(3, 1)], Some(&hs(1, 1, 1)), true)
            .unwrap();
        assert!(!s.append(&[], Some(&hs(1, 1, 3)), false).unwrap());
        let lost = journal.lock().unwrap().lose_unsynced();
        assert_eq!(lost, 1, "the commit-only write is the one not synced");
        let s = RaftStore::open(open_journaled(journal.clone()).unwrap(), &[1]).unwrap();
        assert_eq!((s.last(), s.hard_state().commit), (3, 1));

        // A new term or vote is synced even without entries.
        let mut s = s;
        s.append(&[], Some(&hs(2, 0, 1)), true).unwrap();
        s.append(&[], Some(&hs(2, 3, 1)), true).unwrap();
        assert_eq!(journal.lock().unwrap().lose_unsynced(), 0);
        let s = RaftStore::open(open_journaled(journal).unwrap(), &[1]).unwrap();
        assert_eq!((s.hard_state().term, s.hard_state().vote), (2, 3));
    }

    #[test]
    fn a_deferred_sync_is_owed_until_the_log_is_synced() {
        use crate::storage::{open_journaled, Journal};
        use std::sync::{Arc, Mutex};
        let journal = Arc::new(Mutex::new(Journal::default()));
        let disk = open_journaled(journal.clone()).unwrap();
        let mut s = RaftStore::open(disk.clone(), &[1]).unwrap();
        let vote = HardState {
            term: 1,
            vote: 1,
            ..Default::default()
        };
        let owed = s.append(&[entry(2, 1)], Some(&vote), false).unwrap();
        assert!(owed, "entries and a vote need a sync");
        // Readable at once (raft-rs reads them before they are synced)...
        assert_eq!((s.last(), s.term(2).unwrap()), (2, 1));
        // ...but a crash now would lose them.
        let unsynced = |j: &Journal| j.writes.iter().rev().take_while(|(_, sync)| !sync).count();
        assert_eq!(unsynced(&journal.lock().unwrap()), 1);
        // Synced, they survive one.
        disk.sync_wal().unwrap();
        assert_eq!(unsynced(&journal.lock().unwrap()), 0);
        assert_eq!(journal.lock().unwrap().lose_unsynced(), 0);
        let s = RaftStore::open(open_journaled(journal).unwrap(), &[1]).unwrap();
        assert_eq!((s.last(), s.hard_state().vote), (2, 1));
    }

    #[test]
    fn a_joining_node_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let s = RaftStore::open(db, &[]).unwrap();
        assert_eq!((s.first(), s.last(), s.hard_state().commit), (1, 0, 0));
        assert!(s.conf_state().voters.is_empty());
    }

    #[test]
    fn compaction_keeps_the_term_of_the_compaction_point() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db.clone(), &[1]).unwrap();
        let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1 + i / 5)).collect();
        s.append(&es, None, true).unwrap();
        s.compact(6).unwrap();
        assert_eq!(s.first(), 7);
        assert_eq!(s.term(6).unwrap(), 2);
        assert!(s.term(5).is_err());
        assert!(s
            .entries(5, 8, None, GetEntriesContext::empty(false))
            .is_err());
        drop(s);
        let s = RaftStore::open(db, &[1]).unwrap();
        assert_eq!((s.first(), s.last()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 2);
    }

    /// Compaction runs on the node's loop and must not wait for an fsync; a
    /// crash that loses it leaves the whole log, one that keeps it keeps
    /// what was written before it.
    #[test]
    fn compaction_is_not_synced_and_a_crash_loses_it_whole() {
        use crate::storage::{open_journaled, Journal};
        use std::sync::{Arc, Mutex};
        let journal = Arc::new(Mutex::new(Journal::default()));
        let mut s = RaftStore::open(open_journaled(journal.clone()).unwrap(), &[1]).unwrap();
        let es: Vec<Entry> = (2..=8).map(|i| entry(i, 1)).collect();
        s.append(&es, None, true).unwrap();
        s.compact(5).unwrap();
        assert_eq!(journal.lock().unwrap().unsynced(), 1, "no fsync");
        assert_eq!((s.first(), s.last()), (6, 8));

        // Kept by the crash (a later sync, or the disk wrote it anyway).
        let kept = RaftStore::open(open_journaled(journal.clone()).unwrap(), &[1]).unwrap();
        assert_eq!((kept.first(), kept.last()), (6, 8));
        assert_eq!(kept.term(5).unwrap(), 1);

        // Lost by the crash: the log is back whole, every entry readable.
        assert_eq!(journal.lock().unwrap().lose_unsynced(), 1);
        let lost = RaftStore::open(open_journaled(journal).unwrap(), &[1]).unwrap();
        assert_eq!((lost.first(), lost.last()), (2, 8));
        let got = lost
            .entries(2, 9, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            (2..=8).collect::<Vec<_>>()
        );
    }

    fn unavailable(r: raft::Result<Snapshot>) -> bool {
        matches!(
            r,
            Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable
            ))
        )
    }

    /// Off the thread (as the simulation runs): built on the first request,
    /// handed out on the next; one older than the log's start is rebuilt.
    #[test]
    fn a_snapshot_is_built_on_request_and_handed_out_after() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        assert_eq!(s.snapshot_hold(), None);
        assert!(unavailable(s.snapshot(0, 2)));
        assert_eq!(
            s.snapshot_hold(),
            Some((1, false)),
            "the entries after it are kept"
        );
        let snap = s.snapshot(0, 2).unwrap();
        let meta = snap.get_metadata();
        assert_eq!((meta.index, meta.term), (1, 1));
        assert_eq!(meta.get_conf_state().voters, [1, 2]);

        let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1 + i / 5)).collect();
        s.append(&es, None, true).unwrap();
        s.compact(6).unwrap();
        assert!(
            unavailable(s.snapshot(0, 2)),
            "a snapshot older than the log's start was handed out"
        );
        let meta = s.snapshot(0, 2).unwrap().get_metadata().clone();
        assert_eq!((meta.index, meta.term), (6, 2));
        s.drop_snapshot();
        assert_eq!(s.snapshot_hold(), None);
    }

    /// On a thread: the store holds compaction while it builds, and hands
    /// the snapshot out once built.
    #[test]
    fn a_snapshot_built_in_the_background_is_handed_out_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        s.build_snapshots_in_background();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let snap = loop {
            match s.snapshot(0, 2) {
                Ok(snap) => break snap,
                Err(e) => {
                    assert!(unavailable(Err(e)));
                    assert!(matches!(s.snapshot_hold(), Some((1, _))));
                    assert!(std::time::Instant::now() < deadline, "never built");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        };
        assert_eq!(snap.get_metadata().index, 1);
    }

    /// A build that fails (here: its checkpoint's place is taken by a
    /// file) is not started again at every request, and succeeds once the
    /// cause is gone.
    #[test]
    fn a_failed_background_build_waits_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let blocker = checkpoint_dir(db.path());
        std::fs::write(&blocker, b"not a directory").unwrap();
        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        s.build_snapshots_in_background();
        assert!(unavailable(s.snapshot(0, 2)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.snapshot_hold().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the build never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(unavailable(s.snapshot(0, 2)));
        assert_eq!(
            s.snapshot_hold(),
            None,
            "a build started again at once after a failure"
        );
        std::fs::remove_file(&blocker).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.snapshot(0, 2).is_err() {
            assert!(std::time::Instant::now() < deadline, "never built");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A node added after the finished snapshot was built is not in its
    /// configuration, and raft-rs would not restore it there: it gets a
    /// new one.
    #[test]
    fn a_node_added_after_the_snapshot_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        assert!(unavailable(s.snapshot(0, 2)));
        assert!(s.snapshot(0, 2).is_ok());
        // As the state machine's apply batch records a conf change.
        let cs = ConfState {
            voters: vec![1, 2],
            learners: vec![3],
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&s.db, CF_META), CONF_STATE, cs.write_to_bytes().unwrap());
        s.db.write_batch(batch, false).unwrap();
        s.cache_conf_state(cs);
        assert!(unavailable(s.snapshot(0, 3)), "handed out without node 3");
        let snap = s.snapshot(0, 3).unwrap();
        assert_eq!(snap.get_metadata().get_conf_state().learners, [3]);
        assert!(s.snapshot(0, 2).is_ok(), "node 2 is in the new one too");
    }

    /// A build still running when a snapshot from the leader replaces the
    /// state is of no use after: it is dropped, not kept as the finished
    /// one (which would hold compaction back at its old index).
    #[test]
    fn a_build_overtaken_by_an_install_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let newer = snapshot_at_10();

        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        s.build_snapshots_in_background();
        let gate = BUILD_GATE.lock().unwrap_or_else(|p| p.into_inner());
        assert!(unavailable(s.snapshot(0, 2)));
        assert_eq!(s.snapshot_hold(), Some((1, true)));
        s.install_snapshot(&newer).unwrap();
        drop(gate);
        wait_build(&s);
        assert_eq!(
            s.snapshot_hold(),
            None,
            "the build from before the install was kept"
        );
    }

    /// Another store's snapshot at index 10 (term 3), for nodes 1 and 2.
    fn snapshot_at_10() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let mut other = RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2]).unwrap();
        let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1 + i / 5)).collect();
        other.append(&es, None, true).unwrap();
        other.compact(6).unwrap();
        assert!(unavailable(other.snapshot(0, 2)));
        other.snapshot(0, 2).unwrap()
    }

    /// Waits until `s`'s build on a thread has ended.
    fn wait_build(s: &RaftStore) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.snapshots.lock().building {
            assert!(
                std::time::Instant::now() < deadline,
                "the build never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A build that fails while an install replaces the state (its
    /// checkpoint taken between the install's steps reads as a corrupt
    /// log) is dropped as overtaken: not logged as an error, and not
    /// counted as a failure that holds the next build back.
    #[test]
    fn a_build_failing_under_an_install_is_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let newer = snapshot_at_10();

        let mut s = RaftStore::open(db, &[1, 2]).unwrap();
        s.build_snapshots_in_background();
        // A file where the build puts its checkpoint: the build fails.
        let blocker = checkpoint_dir(s.db.path());
        std::fs::write(&blocker, b"not a directory").unwrap();
        let gate = BUILD_GATE.lock().unwrap_or_else(|p| p.into_inner());
        assert!(unavailable(s.snapshot(0, 2)));
        s.install_snapshot(&newer).unwrap();
        drop(gate);
        wait_build(&s);
        assert!(
            s.snapshots.lock().failed_at.is_none(),
            "the overtaken build was counted as a failure"
        );
        // With nothing overtaking it, the same build's failure counts: the
        // blocker does fail a build.
        let gate = BUILD_GATE.lock().unwrap_or_else(|p| p.into_inner());
        assert!(unavailable(s.snapshot(0, 2)));
        drop(gate);
        wait_build(&s);
        assert!(
            s.snapshots.lock().failed_at.is_some(),
            "a failed build was not counted"
        );
    }

    /// A snapshot's state: `keys` ceilings named `prefix` and a number (in
    /// key order unless `reversed`), a worker, a member, a request record
    /// and the epoch.
    fn snapshot_data(prefix: &str, keys: usize, reversed: bool) -> Vec<u8> {
        use crate::pb::state::{
            KeyCeiling, MachineMeta, Member, RequestGrant, SnapshotData, WorkerEntry, WorkerRecord,
        };
        use prost::Message as _;
        let mut ceilings: Vec<KeyCeiling> = (0..keys)
            .map(|i| KeyCeiling {
                namespace: "ns".into(),
                key: format!("{prefix}{i:08}"),
                ceiling: i as u64 + 1,
            })
            .collect();
        if reversed {
            ceilings.reverse();
        }
        SnapshotData {
            meta: Some(MachineMeta {
                epoch: keys as u64,
                clean_handoff: true,
            }),
            ceilings,
            workers: vec![WorkerEntry {
                worker: keys as u64 % 7,
                record: Some(WorkerRecord {
                    node_id: 1,
                    fence_ms: 1_000,
                    boot: 2,
                    ..Default::default()
                }),
            }],
            members: vec![Member {
                node_id: 2,
                addr: format!("{prefix}:7002"),
                since: 3,
                data_id: 77,
            }],
            requests: vec![RequestGrant {
                namespace: "ns".into(),
                request_id: format!("{prefix}-request"),
                items: 1,
                firsts: vec![1],
                counts: vec![1],
                epoch: 1,
            }],
        }
        .encode_to_vec()
    }

    fn snapshot_at(index: u64, term: u64, data: Vec<u8>) -> Snapshot {
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        });
        snap
    }

    /// An old state (a small snapshot at 5, installed in one write) and a
    /// large snapshot at 100 to replace it (80,000 keys, 1.8 MB).
    fn old_and_large(reversed: bool) -> (Snapshot, Snapshot) {
        let small = snapshot_at(5, 2, snapshot_data("old", 100, false));
        let large = snapshot_at(100, 4, snapshot_data("new", 80_000, reversed));
        assert!(large.get_data().len() >= INGEST_MIN_BYTES);
        (small, large)
    }

    /// Every entry of a state family, in key order.
    type State = Vec<(Box<[u8]>, Box<[u8]>)>;

    fn state_of(db: &DB) -> State {
        db.iterator_cf(cf(db, CF_STATE), rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap())
            .collect()
    }

    /// The state family after `small` then `large`, each installed in one
    /// write.
    fn installed_in_one_write(small: &Snapshot, large: &Snapshot) -> State {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
        assert!(!s.install_snapshot(small).unwrap());
        let mut batch = WriteBatch::default();
        let meta = large.get_metadata();
        machine::write_snapshot(&s.db, &mut batch, meta.index, large.get_data()).unwrap();
        replace_log(&s.db, &mut batch, meta, s.hard_state.clone()).unwrap();
        s.db.write_batch(batch, true).unwrap();
        let state = state_of(&s.db);
        assert!(state.len() > 80_000);
        state
    }

    /// What an install of `large` leaves, checked on a store reopened from
    /// `dir`: its state family, the log replaced, no mark, no staged file.
    fn assert_installed(dir: &std::path::Path, large: &Snapshot, expected: &State) {
        let db = super::super::open(dir).unwrap();
        assert!(
            &state_of(&db) == expected,
            "the state differs from the snapshot's installed in one write"
        );
        assert_eq!(db.get_cf(cf(&db, CF_META), INSTALLING).unwrap(), None);
        assert!(!install_dir(db.path()).exists(), "the staged file is left");
        let s = RaftStore::open(db, &[1, 2, 3]).unwrap();
        let meta = large.get_metadata();
        assert_eq!(s.compacted, (meta.index, meta.term));
        assert_eq!(s.first_index().unwrap(), meta.index + 1);
        assert_eq!(s.hard_state.commit, meta.index);
        assert_eq!(s.conf_state.voters, [1, 2, 3]);
    }

    /// Raises applied after an ingest (the state family's memtable updates
    /// in place) land above the ingested file and the range deletion
    /// under it, and are read back after a reopen: on a key the snapshot
    /// holds, and on one only the replaced state held.
    fn raises_after_an_ingest_are_kept(dir: &std::path::Path) {
        use crate::pb::state::{command, Command, KeyCeiling, RaiseCeilings};
        use prost::Message as _;
        let raise = |index: u64, key: &str, ceiling: u64| Entry {
            index,
            term: 4,
            data: Command {
                kind: Some(command::Kind::Raise(RaiseCeilings {
                    keys: vec![KeyCeiling {
                        namespace: "ns".into(),
                        key: key.into(),
                        ceiling,
                    }],
                    requests: Vec::new(),
                })),
            }
            .encode_to_vec()
            .into(),
            ..Default::default()
        };
        let mut m = machine::Machine::open(super::super::open(dir).unwrap()).unwrap();
        assert_eq!(m.ceiling("ns", "new00000007").unwrap(), 8);
        assert_eq!(m.ceiling("ns", "old00000007").unwrap(), 0, "old state kept");
        m.apply(&[raise(101, "new00000007", 500), raise(102, "old00000007", 3)])
            .unwrap();
        m.apply(&[raise(103, "new00000007", 600)]).unwrap();
        drop(m);
        let m = machine::Machine::open(super::super::open(dir).unwrap()).unwrap();
        assert_eq!(m.applied(), 103);
        assert_eq!(m.ceiling("ns", "new00000007").unwrap(), 600);
        assert_eq!(m.ceiling("ns", "old00000007").unwrap(), 3);
        assert_eq!(m.ceiling("ns", "new00000008").unwrap(), 9);
    }

    /// A large snapshot goes through a table file and leaves the same state
    /// family as one write would: the old state's keys gone, the new ones
    /// and the applied index in. One whose keys are out of order (which a
    /// table file cannot take) is installed in one write, to the same.
    #[test]
    fn a_large_snapshot_is_ingested_to_the_state_one_write_would_leave() {
        let (small, large) = old_and_large(false);
        let expected = installed_in_one_write(&small, &large);
        let dir = tempfile::tempdir().unwrap();
        let mut s = RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
        assert!(!s.install_snapshot(&small).unwrap(), "a small one ingested");
        assert!(s.install_snapshot(&large).unwrap(), "not ingested");
        assert_eq!(s.compacted, (100, 4));
        assert_eq!(s.hard_state.commit, 100);
        drop(s);
        assert_installed(dir.path(), &large, &expected);
        raises_after_an_ingest_are_kept(dir.path());

        let (small, reversed) = old_and_large(true);
        let dir = tempfile::tempdir().unwrap();
        let mut s = RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
        assert!(!s.install_snapshot(&small).unwrap());
        assert!(
            !s.install_snapshot(&reversed).unwrap(),
            "ingested out of order"
        );
        drop(s);
        assert_installed(dir.path(), &reversed, &expected);
    }

    /// A node stopped inside an install through a table file (after the
    /// file and its mark, after the old state's deletion, or after the
    /// ingest too) finishes it when it opens its database again. One whose staged file is gone refuses to start,
    /// naming the file; a file staged without a mark is removed.
    #[test]
    fn an_install_cut_short_is_finished_when_the_node_opens_again() {
        let (small, large) = old_and_large(false);
        let expected = installed_in_one_write(&small, &large);
        for stop in ["staged", "old state deleted", "ingested"] {
            let dir = tempfile::tempdir().unwrap();
            let mut s =
                RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
            s.install_snapshot(&small).unwrap();
            assert!(s.stage_install(&large).unwrap());
            if stop == "old state deleted" {
                // What the ingest does first, and a stop then leaves: the
                // old state gone, the new one not in yet.
                let state = cf(&s.db, CF_STATE);
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(state, &b""[..], &b"\xff"[..]);
                s.db.write_batch(batch, false).unwrap();
                s.db.flush_cf(state).unwrap();
                assert_eq!(state_of(&s.db), State::new(), "{stop}");
            }
            if stop == "ingested" {
                ingest_staged_state(&s.db, large.get_metadata()).unwrap();
                assert_eq!(machine::applied_index(&s.db).unwrap(), 100);
            }
            assert_eq!(s.compacted, (5, 2), "the log was replaced early");
            drop(s);
            assert_installed(dir.path(), &large, &expected);
        }

        let dir = tempfile::tempdir().unwrap();
        let mut s = RaftStore::open(super::super::open(dir.path()).unwrap(), &[1, 2, 3]).unwrap();
        s.install_snapshot(&small).unwrap();
        let before = state_of(&s.db);
        std::fs::create_dir_all(install_dir(s.db.path())).unwrap();
        std::fs::write(install_dir(s.db.path()).join(INSTALL_FILE), b"half a file").unwrap();
        drop(s);
        let db = super::super::open(dir.path()).unwrap();
        assert!(!install_dir(db.path()).exists(), "an unmarked file is left");
        assert!(
            state_of(&db) == before,
            "an unmarked file changed the state"
        );
        let s = RaftStore::open(db, &[1, 2, 3]).unwrap();
        assert_eq!(s.compacted, (5, 2));

        assert!(s.stage_install(&large).unwrap());
        std::fs::remove_dir_all(install_dir(s.db.path())).unwrap();
        drop(s);
        let err = super::super::open(dir.path()).err().expect("opened");
        let msg = err.to_string();
        assert!(
            msg.contains("snapshot at index 100 was cut short") && msg.contains(INSTALL_FILE),
            "{msg}"
        );
    }
}
