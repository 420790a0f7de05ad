//! RocksDB: one database per node, three column families.
//!
//! - `raft_log`: Raft entries keyed by big-endian index.
//! - `raft_meta`: hard state, conf state and the compaction point.
//! - `state`: the replicated state machine (ceilings, epoch, applied index).
//!
//! Everything shares one write-ahead log. Raft appends are written with
//! `sync = true`; state-machine writes are not, because WAL order makes any
//! later synced write persist them too, and the log is only compacted after a
//! synced write (see [`raft_log::RaftStore::compact`]).

pub mod machine;
pub mod raft_log;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

pub use machine::{Applied, Machine};
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
}

impl StorageError {
    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Self::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }
}

/// Opens (creating if needed) the node's database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<DB>, StorageError> {
    std::fs::create_dir_all(dir).map_err(|source| StorageError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Small values and a short log: keep memory and background work modest.
    opts.set_max_background_jobs(2);
    opts.set_write_buffer_size(32 << 20);
    let cfs = [CF_LOG, CF_META, CF_STATE]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
    Ok(Arc::new(db))
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
