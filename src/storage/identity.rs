//! Data directory ids: how a node tells a peer that lost its data from
//! the same peer restarted.
//!
//! A node's data directory gets a random id when it is first opened, kept
//! as long as the directory lives. Every peer stream a node opens names its
//! node id and data id, and the receiver remembers (in `raft_meta`, so that
//! it survives restarts) the data id it first saw for each member in the
//! member's current incarnation: the index of the conf change that made it
//! a member (0 for founders), replicated in the state machine. A node that
//! comes back under its old id with a new directory (wiped, or a volume
//! lost, and started without `--join`) has forgotten what it acknowledged
//! and whom it voted for: its vote could elect a node that lacks a
//! committed ceiling, and that node would hand out numbers again (I1). Its
//! streams are refused by every peer that knew its directory.
//!
//! Removed and added back (a replacement, started with `--join`), the node
//! is another incarnation, and its new directory is recorded as the first
//! of it: when it is added, if a stream it opened as a non-member is open
//! (a replacement connects before it is added), or else at its first
//! stream. A stream of an earlier incarnation that outlives it (a dead
//! host's connection, until keepalive gives up) is never taken for the new
//! one, and its frames are refused once the new one is known. A node that
//! is not a member is not recorded at all. A record follows the
//! configuration, not the log: a node that catches up by snapshot, and so
//! never applies the removals and additions the snapshot covers, keeps the
//! records of members still in the same incarnation and drops the rest.
//!
//! A record first seen is each node's own. So that a node that never saw
//! a member's directory (down while it joined) refuses another one too,
//! the leader binds each member's directory to its incarnation through the
//! log (`BindDataId`, proposed once every member names its data id, so
//! that no build without the command has to apply it); a bound data id
//! replaces whatever a node recorded itself.
//!
//! Streams that name no data id (a build from before this check) are
//! taken without one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocksdb::WriteBatch;

use super::{cf, decode_u64, Disk, StorageError, CF_META};
use crate::telemetry::LogEvery;

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
#[derive(Debug)]
pub enum Admission {
    /// The data id is the one known for the node in its incarnation (or the
    /// first seen, or the node is not a member). Open while held.
    Known(OpenStream),
    /// The node is known in its incarnation with another data id.
    Refused {
        known: u64,
        /// Whether this refusal should be logged (rate-limited).
        log: bool,
    },
}

/// An admitted stream, counted as open until dropped: a node added while
/// a stream it opened as a non-member is open is recorded with that
/// stream's data id.
#[derive(Debug)]
pub struct OpenStream {
    ids: Arc<PeerDataIds>,
    /// Its key in `State::open`.
    seq: u64,
    node: u64,
    data_id: u64,
}

impl OpenStream {
    /// Whether frames on this stream may still be taken: not if its node is
    /// now known by another data id (the stream outlived its incarnation,
    /// or its process was replaced while it stayed open).
    pub fn still_admitted(&self) -> bool {
        let state = self.ids.lock();
        state
            .known
            .get(&self.node)
            .is_none_or(|(data_id, _)| *data_id == self.data_id)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.ids.lock().open.remove(&self.seq);
    }
}

/// The data ids this node has seen for its peers.
pub struct PeerDataIds {
    db: Disk,
    state: Mutex<State>,
}

impl std::fmt::Debug for PeerDataIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerDataIds").finish_non_exhaustive()
    }
}

/// A member's incarnation, as the node loop knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incarnation {
    /// Index of the conf change that made it a member (0: a founder).
    pub since: u64,
    /// The data id bound to the incarnation through the log, if any.
    pub bound: Option<u64>,
}

#[cfg(test)]
impl Incarnation {
    pub fn unbound(since: u64) -> Self {
        Self { since, bound: None }
    }
}

struct Opened {
    node: u64,
    data_id: u64,
    as_member: bool,
}

struct State {
    /// Members other than this node, with their incarnations.
    members: HashMap<u64, Incarnation>,
    /// Node → its data id, and the incarnation it was seen in.
    known: HashMap<u64, (u64, u64)>,
    /// Streams open now, by admission order: their node, data id, and
    /// whether the node was a member when they were admitted.
    open: BTreeMap<u64, Opened>,
    next_seq: u64,
    /// A refused stream is logged once per [`REFUSAL_LOG_EVERY`] for each
    /// node.
    refusals_logged: LogEvery,
}

/// Once per member and incarnation (and after a restart only if it was
/// not recorded before).
fn recorded(node: u64, data_id: u64, since: u64) {
    tracing::info!(
        peer_id = node,
        data_id = %format_args!("{data_id:016x}"),
        since,
        "recorded a peer's data directory"
    );
}

fn record_value(data_id: u64, since: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&data_id.to_be_bytes());
    v[8..].copy_from_slice(&since.to_be_bytes());
    v
}

impl PeerDataIds {
    /// Loads the records kept in `db`. Until [`PeerDataIds::set_members`],
    /// no node is a member.
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
            if value.len() != 16 {
                return Err(StorageError::corrupt(
                    "peer data id",
                    format!("{} bytes, want 16", value.len()),
                ));
            }
            known.insert(
                decode_u64("peer data id key", node)?,
                (
                    decode_u64("peer data id", &value[..8])?,
                    decode_u64("peer incarnation", &value[8..])?,
                ),
            );
        }
        Ok(Self {
            db,
            state: Mutex::new(State {
                members: HashMap::new(),
                known,
                open: BTreeMap::new(),
                next_seq: 0,
                refusals_logged: LogEvery::new(REFUSAL_LOG_EVERY),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The members other than this node, with their incarnations and the
    /// data ids bound to them through the log, as of the state just applied
    /// (at start, after a conf change or a binding, after a snapshot).
    /// A bound data id is the record; records of nodes no longer members
    /// in the same incarnation are dropped; a member without a record that
    /// is connected now is recorded with its stream's data id.
    pub fn set_members(&self, members: HashMap<u64, Incarnation>) -> Result<(), StorageError> {
        let mut state = self.lock();
        let meta = cf(&self.db, CF_META);
        let mut batch = WriteBatch::default();
        for (node, (data_id, since)) in &state.known {
            if let Some(b) = members
                .get(node)
                .filter(|m| m.since == *since)
                .and_then(|m| m.bound)
                .filter(|b| b != data_id)
            {
                tracing::warn!(
                    peer_id = node,
                    bound = %format_args!("{b:016x}"),
                    seen = %format_args!("{data_id:016x}"),
                    "the cluster bound another data directory to a member than the one this \
                     node saw: the bound one is taken"
                );
            }
        }
        let stale: Vec<u64> = state
            .known
            .iter()
            .filter(|(node, (data_id, since))| {
                members
                    .get(node)
                    .is_none_or(|m| m.since != *since || m.bound.is_some_and(|b| b != *data_id))
            })
            .map(|(node, _)| *node)
            .collect();
        for node in stale {
            state.known.remove(&node);
            state.refusals_logged.forget(node);
            batch.delete_cf(meta, peer_key(node));
        }
        for (&node, m) in &members {
            let since = m.since;
            if state.known.contains_key(&node) {
                continue;
            }
            if let Some(data_id) = m.bound {
                state.known.insert(node, (data_id, since));
                batch.put_cf(meta, peer_key(node), record_value(data_id, since));
                recorded(node, data_id, since);
                continue;
            }
            // The latest stream it opened while it was not a member: a
            // replacement connects before it is added. A stream admitted
            // in an earlier incarnation may outlive it (a dead host's
            // connection until keepalive gives up) and is not taken.
            let joined = state
                .open
                .values()
                .rev()
                .find(|o| o.node == node && !o.as_member)
                .map(|o| o.data_id);
            if let Some(data_id) = joined {
                state.known.insert(node, (data_id, since));
                batch.put_cf(meta, peer_key(node), record_value(data_id, since));
                recorded(node, data_id, since);
            }
        }
        state.members = members;
        if !batch.is_empty() {
            // Not synced here: the shared write-ahead log is synced with
            // the node's next Raft write.
            self.db.write_batch(batch, false)?;
        }
        Ok(())
    }

    /// Checks a stream from `node` naming `data_id`; a member's first data
    /// id in its incarnation is recorded.
    pub fn admit(self: &Arc<Self>, node: u64, data_id: u64) -> Result<Admission, StorageError> {
        let mut state = self.lock();
        let member = state.members.get(&node).map(|m| m.since);
        if let Some(since) = member {
            match state.known.get(&node) {
                Some(&(known, _)) if known != data_id => {
                    let log = state.refusals_logged.due(node, Instant::now());
                    return Ok(Admission::Refused { known, log });
                }
                Some(_) => {}
                None => {
                    // Not synced here: the shared write-ahead log is synced
                    // with the node's next Raft write.
                    let mut batch = WriteBatch::default();
                    batch.put_cf(
                        cf(&self.db, CF_META),
                        peer_key(node),
                        record_value(data_id, since),
                    );
                    self.db.write_batch(batch, false)?;
                    state.known.insert(node, (data_id, since));
                    recorded(node, data_id, since);
                }
            }
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.open.insert(
            seq,
            Opened {
                node,
                data_id,
                as_member: member.is_some(),
            },
        );
        Ok(Admission::Known(OpenStream {
            ids: self.clone(),
            seq,
            node,
            data_id,
        }))
    }

    /// Whether every member names its data id (runs a build that knows
    /// them): only then may a binding be proposed, which a build without
    /// the command could not apply.
    pub fn every_member_named(&self) -> bool {
        let state = self.lock();
        state.members.keys().all(|n| state.known.contains_key(n))
    }

    /// Every record: node, data id, and the incarnation it was seen in.
    pub fn records(&self) -> Vec<(u64, u64, u64)> {
        let state = self.lock();
        state
            .known
            .iter()
            .map(|(node, (data_id, since))| (*node, *data_id, *since))
            .collect()
    }

    /// The data id known for `node`, if any.
    #[cfg(test)]
    pub fn known(&self, node: u64) -> Option<u64> {
        self.lock().known.get(&node).map(|(data_id, _)| *data_id)
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

    fn members(list: &[(u64, u64)]) -> HashMap<u64, Incarnation> {
        list.iter()
            .map(|&(node, since)| (node, Incarnation::unbound(since)))
            .collect()
    }

    fn known(a: &Admission) -> bool {
        matches!(a, Admission::Known(_))
    }

    fn refused(a: &Admission) -> Option<(u64, bool)> {
        match a {
            Admission::Refused { known, log } => Some((*known, *log)),
            Admission::Known(_) => None,
        }
    }

    #[test]
    fn a_member_with_another_directory_is_refused_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ids = Arc::new(PeerDataIds::open(disk(&dir)).unwrap());
            ids.set_members(members(&[(2, 0), (3, 0)])).unwrap();
            assert!(known(&ids.admit(2, 7).unwrap()));
            assert!(known(&ids.admit(2, 7).unwrap()));
            assert!(known(&ids.admit(3, 9).unwrap()));
        }
        let ids = Arc::new(PeerDataIds::open(disk(&dir)).unwrap());
        ids.set_members(members(&[(2, 0), (3, 0)])).unwrap();
        assert_eq!(ids.known(2), Some(7));
        assert_eq!(refused(&ids.admit(2, 8).unwrap()), Some((7, true)));
        assert_eq!(
            refused(&ids.admit(2, 8).unwrap()),
            Some((7, false)),
            "logged once per {REFUSAL_LOG_EVERY:?}"
        );
        assert!(known(&ids.admit(3, 9).unwrap()), "other peers unaffected");
    }

    #[test]
    fn a_node_is_recorded_only_as_a_member_and_afresh_in_each_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(PeerDataIds::open(disk(&dir)).unwrap());
        ids.set_members(members(&[(2, 0)])).unwrap();
        assert!(known(&ids.admit(2, 7).unwrap()));

        // Removed: whatever it names is taken, and nothing is recorded.
        ids.set_members(members(&[])).unwrap();
        assert_eq!(ids.known(2), None);
        assert!(known(&ids.admit(2, 8).unwrap()), "the old process, removed");
        assert_eq!(ids.known(2), None);

        // The replacement connects before it is added; the add records it.
        let replacement = ids.admit(2, 9).unwrap();
        assert!(known(&replacement));
        ids.set_members(members(&[(2, 40)])).unwrap();
        assert_eq!(ids.known(2), Some(9));
        assert_eq!(refused(&ids.admit(2, 8).unwrap()).map(|r| r.0), Some(9));
        drop(replacement);

        // A stream of an incarnation that outlives it (a dead host's
        // connection, until keepalive gives up) is not taken for the next
        // one, and its frames stop once the next one is known.
        ids.set_members(members(&[(2, 30)])).unwrap();
        assert_eq!(ids.known(2), None, "another incarnation");
        let Admission::Known(lingering) = ids.admit(2, 21).unwrap() else {
            panic!("the first of its incarnation");
        };
        ids.set_members(members(&[])).unwrap();
        ids.set_members(members(&[(2, 40)])).unwrap();
        assert_eq!(ids.known(2), None, "the lingering stream is not taken");
        assert!(known(&ids.admit(2, 9).unwrap()), "the replacement");
        assert_eq!(ids.known(2), Some(9));
        assert!(!lingering.still_admitted());
        drop(lingering);

        // Of the streams opened as a non-member, the latest is taken.
        ids.set_members(members(&[])).unwrap();
        let first = ids.admit(2, 11).unwrap();
        let latest = ids.admit(2, 12).unwrap();
        ids.set_members(members(&[(2, 40)])).unwrap();
        assert_eq!(ids.known(2), Some(12));
        drop((first, latest));

        // A promotion keeps the incarnation, and the record.
        ids.set_members(members(&[(2, 40), (3, 0)])).unwrap();
        assert_eq!(ids.known(2), Some(12));

        // Another incarnation, not connected when added: its first stream.
        ids.set_members(members(&[(2, 55), (3, 0)])).unwrap();
        assert_eq!(ids.known(2), None);
        assert!(known(&ids.admit(2, 10).unwrap()));
        assert_eq!(ids.known(2), Some(10));
        drop(ids);
        let ids = Arc::new(PeerDataIds::open(disk(&dir)).unwrap());
        ids.set_members(members(&[(2, 55), (3, 0)])).unwrap();
        assert_eq!(ids.known(2), Some(10), "kept across a restart");
        ids.set_members(members(&[(2, 60)])).unwrap();
        assert_eq!(ids.known(2), None, "a snapshot covering a replacement");
    }
}
