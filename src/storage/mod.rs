//! RocksDB: one database per node, three column families.
//!
//! - `raft_log`: Raft entries keyed by big-endian index.
//! - `raft_meta`: hard state, conf state and the compaction point; this
//!   directory's data id and those seen for peers ([`identity`]).
//! - `state`: the replicated state machine (ceilings, epoch, applied index).
//!
//! Everything shares one write-ahead log. Raft appends are written with
//! `sync = true`; state-machine writes are not, because WAL order makes any
//! later synced write persist them too, and the log is only compacted after a
//! synced write (see [`raft_log::RaftStore::compact`]).

pub mod identity;
pub mod machine;
pub mod raft_log;

use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

pub use machine::{Applied, Machine, REQUEST_RECORDS, REQUEST_RECORD_RANGES};
pub use raft_log::RaftStore;

pub const CF_LOG: &str = "raft_log";
pub const CF_META: &str = "raft_meta";
pub const CF_STATE: &str = "state";

/// Storage failures. A node that cannot write its log must stop: every
/// variant is fatal to the Raft loop.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("data directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "snowflake layout changed: this data directory's node issued IDs under \
         {recorded}, the configuration says {configured}; under another epoch or \
         other bit widths its worker id would stamp IDs it stamped before. Keep the \
         layout (it is fixed for a cluster's life), or start a new cluster"
    )]
    LayoutChanged {
        recorded: String,
        configured: String,
    },
    #[error(
        "this data directory belongs to node {recorded}, and this node is configured as \
         node {configured}: it would answer for the entries node {recorded} acknowledged and \
         the votes it cast. Give each node its own directory (check --data-dir, \
         SEQD_DATA_DIR and the volumes); a node that lost its directory comes back with an \
         empty one as a replacement (--join)"
    )]
    OtherNode { recorded: u64, configured: u64 },
}

impl StorageError {
    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Self::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }
}

/// A node's database. Reads go straight to RocksDB (through `Deref`);
/// every write goes through [`Disk::write_batch`], which says whether it
/// must be synced and, in the deterministic simulation, records it so that
/// a simulated crash can keep exactly the synced prefix. (The one
/// exception, a large snapshot's install through a table file, flushes
/// and ingests outside it, and so is never done on the simulation's disk:
/// see `raft_log::RaftStore::install_snapshot`.)
#[derive(Clone)]
pub struct Disk {
    db: Arc<DB>,
    journal: Option<Arc<Mutex<Journal>>>,
}

impl Deref for Disk {
    type Target = DB;

    fn deref(&self) -> &DB {
        &self.db
    }
}

impl Disk {
    /// Whether this is the simulation's disk, which records write batches
    /// and nothing else RocksDB does.
    pub fn is_simulated(&self) -> bool {
        self.journal.is_some()
    }

    pub fn write_batch(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        if let Some(journal) = &self.journal {
            let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
            match j.power_fails_in {
                Some(0) => return Err(StorageError::corrupt("simulated disk", "power lost")),
                Some(n) => j.power_fails_in = Some(n - 1),
                None => {}
            }
            j.writes.push((batch.data().to_vec(), sync));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Makes every write made so far durable (one fsync of the write-ahead
    /// log), as a synced write would. Safe to call from another thread
    /// while writes go on: what it covers is what was written before it.
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        match &self.journal {
            // The simulation's in-memory RocksDB has no WAL file to sync;
            // its journal is what a crash keeps.
            Some(journal) => journal.lock().unwrap_or_else(|p| p.into_inner()).sync(),
            None => self.db.flush_wal(true)?,
        }
        Ok(())
    }
}

/// Every write a simulated node made, in order, with its sync flag.
/// RocksDB has one write-ahead log, so a synced write also persists every
/// write before it: what survives a power loss is the prefix up to the last
/// synced write.
#[derive(Debug, Default)]
pub struct Journal {
    writes: Vec<(Vec<u8>, bool)>,
    /// Writes left before the simulated power loss (which fails the write).
    power_fails_in: Option<u64>,
}

impl Journal {
    /// Fails the write after the next `writes` ones, as a power loss in
    /// the middle of the node's work would.
    pub fn fail_after(&mut self, writes: u64) {
        self.power_fails_in = Some(writes);
    }

    /// Whether the armed power loss has happened.
    pub fn power_failed(&self) -> bool {
        self.power_fails_in == Some(0)
    }

    /// Makes every write so far durable (the simulation's WAL fsync).
    pub fn sync(&mut self) {
        self.writes.push((Vec::new(), true));
    }

    /// Makes the first `len` writes durable: an fsync that started when
    /// the journal held `len` writes. Writes made while it ran stay
    /// unsynced, so a node that answers for them on its word is caught
    /// by the next power loss.
    pub fn sync_prefix(&mut self, len: usize) {
        match len {
            0 => {}
            len if len >= self.writes.len() => self.sync(),
            len => self.writes[len - 1].1 = true,
        }
    }

    /// Forgets the writes after the last synced one, as a power loss would.
    pub fn lose_unsynced(&mut self) -> usize {
        self.lose_unsynced_but(0)
    }

    /// Writes made since the last synced one.
    pub fn unsynced(&self) -> usize {
        self.writes
            .iter()
            .rev()
            .take_while(|(_, sync)| !sync)
            .count()
    }

    /// Forgets the writes after the last synced one except the first
    /// `keep` of them: a power loss may leave some of the write-ahead log
    /// that was not synced, always a prefix (RocksDB recovers up to the
    /// first torn record). Returns how many were lost.
    pub fn lose_unsynced_but(&mut self, keep: usize) -> usize {
        let synced = self.writes.len() - self.unsynced();
        let keep = synced + keep.min(self.unsynced());
        let lost = self.writes.len() - keep;
        self.writes.truncate(keep);
        self.power_fails_in = None;
        lost
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

pub(crate) fn options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Small values and a short log: keep memory and background work modest.
    opts.set_max_background_jobs(2);
    // The three families share one write-ahead log, and a file of it is
    // kept until every family with writes in it has flushed them; a restart
    // after a crash replays what is kept. The meta family takes a few
    // bytes per Raft round and so flushes rarely, keeping the whole log
    // meanwhile, up to RocksDB's default bound of four times every memtable
    // (GiBs). Past this size the families holding the oldest file flush.
    opts.set_max_total_wal_size(WAL_BYTES_KEPT);
    // Required by the state family's in-place updates (below); the node
    // loop is its only writer anyway.
    opts.set_allow_concurrent_memtable_write(false);
    // Unsynced writes (applies, compaction, the commit index) are safe
    // because a crash loses only a suffix of the write-ahead log: RocksDB
    // recovers up to the first torn record and drops the rest. That is this
    // mode, RocksDB's default, named here because the node relies on it.
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
    // RocksDB's own log, `db/LOG`: at the debug level (the default of
    // Debian's build) it takes a line per WAL sync, about 200 bytes per
    // millisecond under dense load, and grows without bound; each open adds
    // a file, kept up to a thousand. At the info level it holds start-up,
    // flushes, compactions and errors; the files roll at 16 MiB, four kept.
    opts.set_log_level(rocksdb::LogLevel::Info);
    opts.set_max_log_file_size(ROCKSDB_LOG_FILE_BYTES);
    opts.set_keep_log_file_num(ROCKSDB_LOG_FILES_KEPT);
    opts
}

/// Write-ahead log kept before the families holding its oldest file are
/// flushed (see `options`). A restart after a crash replays what is kept,
/// about 85 ms per MiB of a dense load's log on the 2-core VM.
const WAL_BYTES_KEPT: u64 = 48 << 20;
/// Each family's memtable (RocksDB's default is 64 MiB, two per family).
const MEMTABLE_BYTES: usize = 32 << 20;

/// Options every family starts from.
fn family_options() -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(MEMTABLE_BYTES);
    opts
}

/// Size at which RocksDB's `LOG` file rolls over to `LOG.old.*`.
const ROCKSDB_LOG_FILE_BYTES: usize = 16 << 20;
/// How many of RocksDB's `LOG` files (the current one included) are kept.
const ROCKSDB_LOG_FILES_KEPT: usize = 4;

/// The state family: a ceiling rewritten in the memtable replaces its
/// value there rather than adding a version. Applying a raise reads the
/// key's stored ceiling first; with every version kept since the last
/// flush (millions under dense load) each of those reads walked a deep
/// skiplist. In-place updates give up point-in-time iterators under
/// concurrent writes, which this family never has: the node loop alone
/// writes it, and reads it between its own writes. Snapshots for followers
/// are built on another thread, so from a checkpoint (see
/// `raft_log::build_from_checkpoint`), not from a RocksDB snapshot.
/// Its memtable MUST NOT hold a range deletion: a put that finds an older
/// value of its key in the memtable is written into that entry, under a
/// newer range tombstone, which then hides it (see
/// `machine::write_snapshot`). The one range deletion it sees, a large
/// snapshot's install, is flushed at once (`raft_log::ingest_staged_state`).
fn state_options() -> Options {
    let mut opts = family_options();
    opts.set_inplace_update_support(true);
    // A bloom filter over the memtable's keys: a read of a key the memtable
    // does not hold (a raise of a new key, the release of a key idle since
    // the last flush) skips the skiplist search that dominated those
    // applies. A tenth of the memtable's size.
    opts.set_memtable_prefix_bloom_ratio(0.1);
    opts.set_memtable_whole_key_filtering(true);
    // RocksDB refuses a cache only for lack of memory: the default then.
    if let Ok(cache) = rocksdb::Cache::new_lru_cache(STATE_BLOCK_CACHE_BYTES) {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
    }
    opts
}

/// The state family's block cache (RocksDB's default is 8 MiB for the
/// whole database).
const STATE_BLOCK_CACHE_BYTES: usize = 128 << 20;

/// Opens the database at `path`; the state family updates in place only
/// if `in_place`.
pub(crate) fn open_with(opts: &Options, path: &Path, in_place: bool) -> Result<DB, StorageError> {
    let state = if in_place {
        state_options()
    } else {
        family_options()
    };
    let cfs = [
        ColumnFamilyDescriptor::new(CF_LOG, family_options()),
        ColumnFamilyDescriptor::new(CF_META, family_options()),
        ColumnFamilyDescriptor::new(CF_STATE, state),
    ];
    Ok(DB::open_cf_descriptors(opts, path, cfs)?)
}

/// Opens (creating if needed) the node's database under `dir`.
pub fn open(dir: &Path) -> Result<Disk, StorageError> {
    std::fs::create_dir_all(dir).map_err(|source| StorageError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let path = dir.join("db");
    // A copy a snapshot was being built from when the node stopped.
    raft_log::remove_checkpoint(&raft_log::checkpoint_dir(&path));
    // The write-ahead log may hold state writes from before in-place
    // updates (a snapshot install by an older build: a range deletion and
    // puts under it). Replayed with in-place updates on, those puts would
    // land under the tombstone and vanish, and the ceilings with them. So
    // the log is replayed without them first and the state flushed to a
    // table file, which the second open no longer replays.
    {
        let db = open_with(&options(), &path, false)?;
        db.flush_cf(cf(&db, CF_STATE))?;
    }
    let db = open_with(&options(), &path, true)?;
    let disk = Disk {
        db: Arc::new(db),
        journal: None,
    };
    raft_log::resume_install(&disk)?;
    Ok(disk)
}

/// Opens a fresh in-memory database holding what `journal` recorded, and
/// records further writes in it. The simulation's disk: a crash is
/// [`Journal::lose_unsynced`] followed by this.
pub fn open_journaled(journal: Arc<Mutex<Journal>>) -> Result<Disk, StorageError> {
    let mut opts = options();
    opts.set_env(&rocksdb::Env::mem_env()?);
    let db = open_with(&opts, Path::new("/sim/db"), true)?;
    {
        let j = journal.lock().unwrap_or_else(|p| p.into_inner());
        // Empty records are `sync_wal` marks.
        for (data, _) in j.writes.iter().filter(|(data, _)| !data.is_empty()) {
            db.write(WriteBatch::from_data(data))?;
        }
    }
    Ok(Disk {
        db: Arc::new(db),
        journal: Some(journal),
    })
}

const LAYOUT: &[u8] = b"snowflake_layout";

/// Records the Snowflake layout on a directory's first start, and refuses
/// any other on later ones: fences and worker ids are kept in absolute
/// milliseconds and raw ids, and stamped under another epoch or other bit
/// widths they no longer keep IDs apart.
pub fn check_layout(db: &Disk, layout: &crate::core::Layout) -> Result<(), StorageError> {
    let meta = cf(db, CF_META);
    let parts = layout.to_parts();
    match db.get_cf(meta, LAYOUT)? {
        Some(bytes) => {
            let recorded: Vec<u64> = bytes
                .chunks(8)
                .map(|c| decode_u64("snowflake layout", c))
                .collect::<Result<_, _>>()?;
            if recorded != parts {
                let recorded = crate::core::Layout::from_parts(&recorded)
                    .map_or_else(|| format!("{recorded:?}"), |l| l.to_string());
                return Err(StorageError::LayoutChanged {
                    recorded,
                    configured: layout.to_string(),
                });
            }
            Ok(())
        }
        None => {
            let mut batch = WriteBatch::default();
            let bytes: Vec<u8> = parts.iter().flat_map(|p| p.to_be_bytes()).collect();
            batch.put_cf(meta, LAYOUT, bytes);
            db.write_batch(batch, true)
        }
    }
}

const NODE_ID: &[u8] = b"node_id";

/// Records the node id on a directory's first start (and on the first start
/// of a build that records it), and refuses any other id on later ones:
/// two nodes' directories swapped (volumes mixed up), each would claim the
/// other's acknowledgements and votes, and a peer that never bound the
/// other's directory would take them.
pub fn check_node_id(db: &Disk, id: u64) -> Result<(), StorageError> {
    let meta = cf(db, CF_META);
    match db.get_cf(meta, NODE_ID)? {
        Some(bytes) => match decode_u64("node id", &bytes)? {
            recorded if recorded == id => Ok(()),
            recorded => Err(StorageError::OtherNode {
                recorded,
                configured: id,
            }),
        },
        None => {
            let mut batch = WriteBatch::default();
            batch.put_cf(meta, NODE_ID, id.to_be_bytes());
            db.write_batch(batch, true)
        }
    }
}

const VOTE_PROMISE: &[u8] = b"vote_promise_ms";

/// The vote promise this directory's node last named to its peers (see
/// `vote_promise` in the node), if it recorded one. Leaders granted leases
/// on that promise, so after a restart the node keeps it, whatever its new
/// configuration says, until the leases it backed have run out.
pub fn recorded_vote_promise(db: &Disk) -> Result<Option<std::time::Duration>, StorageError> {
    let meta = cf(db, CF_META);
    db.get_cf(meta, VOTE_PROMISE)?
        .map(|bytes| decode_u64("vote promise", &bytes).map(std::time::Duration::from_millis))
        .transpose()
}

/// Records the vote promise the node names now, synced.
pub fn record_vote_promise(db: &Disk, promise: std::time::Duration) -> Result<(), StorageError> {
    let ms = u64::try_from(promise.as_millis()).unwrap_or(u64::MAX);
    let mut batch = WriteBatch::default();
    batch.put_cf(cf(db, CF_META), VOTE_PROMISE, ms.to_be_bytes());
    db.write_batch(batch, true)
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    match db.cf_handle(name) {
        Some(cf) => cf,
        // open() creates every family; a missing one is a programming error.
        None => panic!("column family {name} missing"),
    }
}

pub(crate) fn decode_u64(what: &'static str, bytes: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StorageError::corrupt(what, format!("{} bytes, want 8", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_files(db_dir: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(db_dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("LOG"))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect();
        files.sort();
        files
    }

    fn wal_bytes(db_dir: &Path) -> u64 {
        std::fs::read_dir(db_dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    /// An fsync makes durable what was written before it started, not
    /// what was written while it ran.
    #[test]
    fn a_journal_fsync_covers_the_writes_before_it() {
        let mut j = Journal::default();
        let write = |j: &mut Journal, b: u8| j.writes.push((vec![b], false));
        write(&mut j, 1);
        write(&mut j, 2);
        let started = j.len();
        write(&mut j, 3);
        j.sync_prefix(started);
        assert_eq!(j.unsynced(), 1);
        assert_eq!(j.lose_unsynced(), 1);
        assert_eq!(j.writes.last().map(|w| w.0.clone()), Some(vec![2]));
        // One that started after every write covers them all.
        write(&mut j, 4);
        j.sync_prefix(j.len());
        assert_eq!(j.unsynced(), 0);
        // One that started before any write covers none.
        let mut empty = Journal::default();
        empty.sync_prefix(0);
        write(&mut empty, 5);
        assert_eq!(empty.unsynced(), 1);
    }

    #[test]
    fn a_directory_keeps_the_node_id_it_first_started_with() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open(dir.path()).unwrap();
        check_node_id(&disk, 2).unwrap();
        check_node_id(&disk, 2).unwrap();
        drop(disk);
        let disk = open(dir.path()).unwrap();
        check_node_id(&disk, 2).expect("the same node, reopened");
        match check_node_id(&disk, 1) {
            Err(e @ StorageError::OtherNode { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("belongs to node 2") && text.contains("configured as node 1"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        check_node_id(&disk, 2).expect("still node 2's");
    }

    #[test]
    fn the_write_ahead_log_stays_bounded_while_a_family_rarely_writes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open(dir.path()).unwrap();
        // One small write in the meta family pins the log file it is in
        // until that family flushes.
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&disk, CF_META), b"hard_state", [1u8; 16]);
        disk.write_batch(batch, false).unwrap();
        let value = vec![7u8; 1 << 20];
        let written = 3 * WAL_BYTES_KEPT;
        for i in 0..written >> 20 {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&disk, CF_LOG), i.to_be_bytes(), &value);
            disk.write_batch(batch, false).unwrap();
        }
        // Flushes and the deletion of log files they free run in the
        // background.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let db_dir = dir.path().join("db");
        let mut kept = wal_bytes(&db_dir);
        while kept > 2 * WAL_BYTES_KEPT && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            kept = wal_bytes(&db_dir);
        }
        assert!(
            kept <= 2 * WAL_BYTES_KEPT,
            "{kept} bytes of write-ahead log kept after writing {written}"
        );
        drop(disk);
        let disk = open(dir.path()).unwrap();
        assert_eq!(
            disk.get_cf(cf(&disk, CF_META), b"hard_state").unwrap(),
            Some(vec![1u8; 16])
        );
    }

    #[test]
    fn a_familys_memtable_flushes_at_the_size_set() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open(dir.path()).unwrap();
        let value = vec![7u8; 1 << 20];
        // More than MEMTABLE_BYTES, less than RocksDB's 64 MiB default,
        // and less than the log that would force a flush by itself.
        let values = (MEMTABLE_BYTES >> 20) as u64 + 8;
        assert!(values << 20 < WAL_BYTES_KEPT);
        for i in 0..values {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&disk, CF_LOG), i.to_be_bytes(), &value);
            disk.write_batch(batch, false).unwrap();
        }
        let active = disk
            .property_int_value_cf(cf(&disk, CF_LOG), "rocksdb.num-entries-active-mem-table")
            .unwrap()
            .unwrap();
        assert!(
            active < values,
            "all {values} values of 1 MiB still in the active memtable"
        );
    }

    #[test]
    fn rocksdbs_own_log_neither_logs_each_sync_nor_piles_up_files() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("db");
        let disk = open(dir.path()).unwrap();
        let before: u64 = log_files(&db_dir).iter().map(|(_, len)| len).sum();
        for i in 0..2_000u64 {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&disk, CF_META), b"k", i.to_be_bytes());
            disk.write_batch(batch, false).unwrap();
            disk.sync_wal().unwrap();
        }
        drop(disk);
        let after: u64 = log_files(&db_dir).iter().map(|(_, len)| len).sum();
        // A line per sync would be 2,000 lines (about 150 KB); closing
        // the database logs a few.
        assert!(
            after - before < 16 << 10,
            "RocksDB's LOG grew by {} bytes over 2,000 synced writes",
            after - before
        );

        // Every open (two per `open`) starts a new LOG file; old ones are
        // pruned to the limit instead of kept by the thousand.
        for _ in 0..6 {
            drop(open(dir.path()).unwrap());
        }
        let files = log_files(&db_dir);
        assert!(
            files.len() <= ROCKSDB_LOG_FILES_KEPT,
            "{} RocksDB LOG files kept: {files:?}",
            files.len()
        );
    }
}
