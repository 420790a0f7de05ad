//! Data directory ids: how a node tells a peer that lost its data from
//! the same peer restarted.
//!
//! A node's data directory gets a random id when it is first opened, kept
//! as long as the directory lives. Every peer stream a node opens names its
//! node id and data id, and the receiver remembers the first data id it saw
//! for each node (in `raft_meta`, so that it survives restarts). A node
//! that comes back under its old id with a new directory (wiped, or a
//! volume lost, and started without `--join`) has forgotten what it
//! acknowledged and whom it voted for: its vote could elect a node that
//! lacks a committed ceiling, and that node would hand out numbers again
//! (I1). Its streams are refused, by every peer that knew its old
//! directory, until it is removed from the cluster; removal forgets the
//! record, so a replacement (started with `--join`, added again) gets a
//! new one.
//!
//! Streams that name no data id (a build from before this check) are
//! taken without one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rocksdb::WriteBatch;

use super::{cf, decode_u64, Disk, StorageError, CF_META};

const OWN: &[u8] = b"data_id";
const PEER_PREFIX: &[u8] = b"peer_data_id/";
/// A refused peer tries again every second; the refusal is logged once
/// per this long.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// This directory's data id, created on first use. Never 0 (0 is "not
/// named" on the wire).
pub fn own(db: &Disk) -> Result<u64, StorageError> {
    let meta = cf(db, CF_META);
    if let Some(bytes) = db.get_cf(meta, OWN)? {
        return decode_u64("data id", &bytes);
    }
    let id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    let mut batch = WriteBatch::default();
    batch.put_cf(meta, OWN, id.to_be_bytes());
    db.write_batch(batch, true)?;
    Ok(id)
}

fn peer_key(node: u64) -> Vec<u8> {
    let mut key = PEER_PREFIX.to_vec();
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// A peer stream's admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The data id is the one known for the node (or the first seen).
    Known,
    /// The node is known with another data id.
    Refused {
        known: u64,
        /// Whether this refusal should be logged (rate-limited).
        log: bool,
    },
}

/// The data ids this node has seen for its peers.
pub struct PeerDataIds {
    db: Disk,
    state: Mutex<State>,
    /// Counts [`PeerDataIds::forget_all`]s: a stream admitted before the
    /// latest one has its sender admitted again (see `PeerService`).
    generation: AtomicU64,
}

#[derive(Default)]
struct State {
    known: HashMap<u64, u64>,
    refusals_logged: HashMap<u64, Instant>,
}

impl PeerDataIds {
    /// Loads the records kept in `db`.
    pub fn open(db: Disk) -> Result<Self, StorageError> {
        let mut known = HashMap::new();
        let meta = cf(&db, CF_META);
        let iter = db.iterator_cf(
            meta,
            rocksdb::IteratorMode::From(PEER_PREFIX, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            let Some(node) = key.strip_prefix(PEER_PREFIX) else {
                break;
            };
            known.insert(
                decode_u64("peer data id key", node)?,
                decode_u64("peer data id", &value)?,
            );
        }
        Ok(Self {
            db,
            state: Mutex::new(State {
                known,
                refusals_logged: HashMap::new(),
            }),
            generation: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a stream from `node` naming `data_id`, and remembers the id
    /// if it is the first seen for the node.
    pub fn admit(&self, node: u64, data_id: u64) -> Admission {
        let mut state = self.lock();
        match state.known.get(&node) {
            Some(&known) if known == data_id => Admission::Known,
            Some(&known) => {
                let now = Instant::now();
                let log = state
                    .refusals_logged
                    .get(&node)
                    .is_none_or(|at| now.duration_since(*at) >= REFUSAL_LOG_EVERY);
                if log {
                    state.refusals_logged.insert(node, now);
                }
                Admission::Refused { known, log }
            }
            None => {
                state.known.insert(node, data_id);
                // Synced: a record lost in a crash would let the node's
                // next directory in as though it were its first.
                let mut batch = WriteBatch::default();
                batch.put_cf(cf(&self.db, CF_META), peer_key(node), data_id.to_be_bytes());
                if let Err(e) = self.db.write_batch(batch, true) {
                    tracing::error!(node, error = %e, "cannot record a peer's data id");
                }
                Admission::Known
            }
        }
    }

    /// Forgets `node`'s data id: it was removed from the cluster, and may
    /// come back as a replacement with a directory of its own.
    pub fn forget(&self, node: u64) -> Result<(), StorageError> {
        let mut state = self.lock();
        state.refusals_logged.remove(&node);
        if state.known.remove(&node).is_some() {
            let mut batch = WriteBatch::default();
            batch.delete_cf(cf(&self.db, CF_META), peer_key(node));
            self.db.write_batch(batch, true)?;
        }
        Ok(())
    }

    /// Forgets every record: a snapshot replaced the log, and the removals
    /// it may have held were never applied here, so a record may be of a
    /// node since replaced. Peers are learned again from the streams open
    /// now (on their next frame) and those opened later.
    pub fn forget_all(&self) -> Result<(), StorageError> {
        let mut state = self.lock();
        state.refusals_logged.clear();
        // Every record on disk is in memory (loaded at open).
        let mut batch = WriteBatch::default();
        for (node, _) in state.known.drain() {
            batch.delete_cf(cf(&self.db, CF_META), peer_key(node));
        }
        if !batch.is_empty() {
            self.db.write_batch(batch, true)?;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// How many times every record was forgotten.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The data id known for `node`, if any.
    pub fn known(&self, node: u64) -> Option<u64> {
        self.lock().known.get(&node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &tempfile::TempDir) -> Disk {
        super::super::open(dir.path()).unwrap()
    }

    #[test]
    fn a_directory_keeps_its_id_and_a_new_one_gets_another() {
        let a = tempfile::tempdir().unwrap();
        let first = own(&disk(&a)).unwrap();
        assert_ne!(first, 0);
        assert_eq!(own(&disk(&a)).unwrap(), first, "reopened");
        let b = tempfile::tempdir().unwrap();
        assert_ne!(own(&disk(&b)).unwrap(), first, "another directory");
    }

    #[test]
    fn a_peer_with_another_directory_is_refused_until_forgotten_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ids = PeerDataIds::open(disk(&dir)).unwrap();
            assert_eq!(ids.admit(2, 7), Admission::Known);
            assert_eq!(ids.admit(2, 7), Admission::Known);
            assert_eq!(ids.admit(3, 9), Admission::Known);
        }
        let ids = PeerDataIds::open(disk(&dir)).unwrap();
        assert_eq!(ids.known(2), Some(7));
        assert_eq!(
            ids.admit(2, 8),
            Admission::Refused {
                known: 7,
                log: true
            }
        );
        assert_eq!(
            ids.admit(2, 8),
            Admission::Refused {
                known: 7,
                log: false
            },
            "logged once per {REFUSAL_LOG_EVERY:?}"
        );
        assert_eq!(ids.admit(3, 9), Admission::Known, "other peers unaffected");
        ids.forget(2).unwrap();
        assert_eq!(ids.admit(2, 8), Admission::Known, "a replacement");
        drop(ids);
        let ids = PeerDataIds::open(disk(&dir)).unwrap();
        assert_eq!(ids.known(2), Some(8));
        assert_eq!(ids.known(3), Some(9));

        let mine = own(&ids.db).unwrap();
        let before = ids.generation();
        ids.forget_all().unwrap();
        assert_ne!(ids.generation(), before);
        assert_eq!((ids.known(2), ids.known(3)), (None, None));
        assert_eq!(
            own(&ids.db).unwrap(),
            mine,
            "this directory's own id is kept"
        );
        drop(ids);
        let ids = PeerDataIds::open(disk(&dir)).unwrap();
        assert_eq!(
            (ids.known(2), ids.known(3)),
            (None, None),
            "after a restart"
        );
        assert_eq!(ids.admit(2, 1), Admission::Known);
    }
}
