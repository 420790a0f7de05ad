//! The replicated state machine: per-key ceilings, the allocation epoch and
//! the applied index, in the `state` column family.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;
use raft::prelude::{Entry, EntryType};
use rocksdb::{WriteBatch, DB};

use super::{cf, decode_u64, StorageError, CF_STATE};
use crate::pb::state::{command, Command, KeyCeiling, MachineMeta, SnapshotData};

const META: &[u8] = b"m";
const APPLIED: &[u8] = b"a";
const CEILING_PREFIX: u8 = b'c';

fn ceiling_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + namespace.len() + key.len());
    k.push(CEILING_PREFIX);
    k.extend_from_slice(namespace.as_bytes());
    // Namespace names never contain NUL (config validation), so the first NUL
    // ends the namespace whatever the key holds.
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn split_ceiling_key(k: &[u8]) -> Result<(String, String), StorageError> {
    let rest = &k[1..];
    let nul = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| StorageError::corrupt("ceiling key", "no separator"))?;
    let ns =
        std::str::from_utf8(&rest[..nul]).map_err(|e| StorageError::corrupt("ceiling key", e))?;
    let key = std::str::from_utf8(&rest[nul + 1..])
        .map_err(|e| StorageError::corrupt("ceiling key", e))?;
    Ok((ns.to_string(), key.to_string()))
}

/// What applying one entry changed, for the leader's allocator.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Ceilings after the raise (each is the new applied value).
    Raised(Vec<KeyCeiling>),
    /// A leader's start-of-term entry, with the epoch now in force.
    LeaderStarted { term: u64, node_id: u64, epoch: u64 },
    /// Ceilings set by a hand-over trim.
    Trimmed(Vec<KeyCeiling>),
    /// A configuration change; the Raft loop applies it.
    ConfChange(Entry),
    /// An empty entry (raft-rs appends one when a leader is elected).
    Empty,
}

/// The state machine. Owned by the Raft thread.
pub struct Machine {
    db: Arc<DB>,
    meta: MachineMeta,
    applied: u64,
}

impl Machine {
    pub fn open(db: Arc<DB>) -> Result<Self, StorageError> {
        let mut m = Self {
            db,
            meta: MachineMeta::default(),
            applied: 0,
        };
        m.reload()?;
        Ok(m)
    }

    /// Re-reads the cached fields, after a snapshot replaced the state.
    pub fn reload(&mut self) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE);
        self.meta = match self.db.get_cf(state, META)? {
            Some(b) => MachineMeta::decode(b.as_slice())
                .map_err(|e| StorageError::corrupt("machine meta", e))?,
            None => MachineMeta::default(),
        };
        self.applied = match self.db.get_cf(state, APPLIED)? {
            Some(b) => decode_u64("applied index", &b)?,
            None => 0,
        };
        Ok(())
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// The applied ceiling of a key, 0 when it was never allocated.
    pub fn ceiling(&self, namespace: &str, key: &str) -> Result<u64, StorageError> {
        match self
            .db
            .get_cf(cf(&self.db, CF_STATE), ceiling_key(namespace, key))?
        {
            Some(b) => decode_u64("ceiling", &b),
            None => Ok(0),
        }
    }

    /// Applies committed entries in one write batch and reports what each
    /// changed. Entries at or below the applied index are skipped, so a
    /// replay after a crash is harmless.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<Vec<(Entry, Applied)>, StorageError> {
        let mut batch = WriteBatch::default();
        let state = cf(&self.db, CF_STATE);
        let mut overlay: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut out = Vec::with_capacity(entries.len());
        let mut applied = self.applied;
        let mut meta = self.meta;
        for e in entries {
            if e.index <= applied {
                continue;
            }
            applied = e.index;
            let outcome = match e.get_entry_type() {
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    Applied::ConfChange(e.clone())
                }
                EntryType::EntryNormal if e.data.is_empty() => Applied::Empty,
                EntryType::EntryNormal => {
                    let cmd = Command::decode(e.data.as_ref()).map_err(|err| {
                        StorageError::corrupt("log command", format!("entry {}: {err}", e.index))
                    })?;
                    match cmd.kind {
                        Some(command::Kind::Raise(r)) => {
                            let mut done = Vec::with_capacity(r.keys.len());
                            for kc in r.keys {
                                let k = ceiling_key(&kc.namespace, &kc.key);
                                let old = match overlay.get(&k) {
                                    Some(v) => *v,
                                    None => match self.db.get_cf(state, &k)? {
                                        Some(b) => decode_u64("ceiling", &b)?,
                                        None => 0,
                                    },
                                };
                                let new = old.max(kc.ceiling);
                                if new != old {
                                    batch.put_cf(state, &k, new.to_be_bytes());
                                    overlay.insert(k, new);
                                }
                                done.push(KeyCeiling { ceiling: new, ..kc });
                            }
                            // A raise after a trim means the trimmed hand-over
                            // is over: the next leader change may open holes.
                            meta.clean_handoff = false;
                            Applied::Raised(done)
                        }
                        Some(command::Kind::LeaderStart(ls)) => {
                            if !meta.clean_handoff {
                                meta.epoch += 1;
                            }
                            meta.clean_handoff = false;
                            Applied::LeaderStarted {
                                term: ls.term,
                                node_id: ls.node_id,
                                epoch: meta.epoch,
                            }
                        }
                        Some(command::Kind::Trim(t)) => {
                            for kc in &t.keys {
                                let k = ceiling_key(&kc.namespace, &kc.key);
                                batch.put_cf(state, &k, kc.ceiling.to_be_bytes());
                                overlay.insert(k, kc.ceiling);
                            }
                            meta.clean_handoff = true;
                            Applied::Trimmed(t.keys)
                        }
                        None => {
                            return Err(StorageError::corrupt(
                                "log command",
                                format!("entry {} has no command", e.index),
                            ))
                        }
                    }
                }
            };
            out.push((e.clone(), outcome));
        }
        if applied == self.applied {
            return Ok(out);
        }
        batch.put_cf(state, META, meta.encode_to_vec());
        batch.put_cf(state, APPLIED, applied.to_be_bytes());
        self.db.write(batch)?;
        self.applied = applied;
        self.meta = meta;
        Ok(out)
    }
}

/// Serializes the whole state machine with its applied index.
pub(super) fn read_snapshot(db: &DB) -> Result<(u64, Vec<u8>), StorageError> {
    let state = cf(db, CF_STATE);
    // One RocksDB snapshot, so the index and the data agree.
    let snap = db.snapshot();
    let applied = match snap.get_cf(state, APPLIED)? {
        Some(b) => decode_u64("applied index", &b)?,
        None => 0,
    };
    let meta = match snap.get_cf(state, META)? {
        Some(b) => MachineMeta::decode(b.as_slice())
            .map_err(|e| StorageError::corrupt("machine meta", e))?,
        None => MachineMeta::default(),
    };
    let mut data = SnapshotData {
        meta: Some(meta),
        ceilings: Vec::new(),
    };
    let prefix = [CEILING_PREFIX];
    for item in snap.iterator_cf(
        state,
        rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
    ) {
        let (k, v) = item?;
        if k.first() != Some(&CEILING_PREFIX) {
            break;
        }
        let (namespace, key) = split_ceiling_key(&k)?;
        data.ceilings.push(KeyCeiling {
            namespace,
            key,
            ceiling: decode_u64("ceiling", &v)?,
        });
    }
    Ok((applied, data.encode_to_vec()))
}

/// Adds to `batch` the writes that replace the state machine with a
/// snapshot taken at `index`.
pub(super) fn write_snapshot(
    db: &DB,
    batch: &mut WriteBatch,
    index: u64,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let data =
        SnapshotData::decode(bytes).map_err(|e| StorageError::corrupt("snapshot data", e))?;
    let state = cf(db, CF_STATE);
    batch.delete_range_cf(state, [0u8].as_slice(), [0xffu8; 2].as_slice());
    for kc in &data.ceilings {
        batch.put_cf(
            state,
            ceiling_key(&kc.namespace, &kc.key),
            kc.ceiling.to_be_bytes(),
        );
    }
    batch.put_cf(state, META, data.meta.unwrap_or_default().encode_to_vec());
    batch.put_cf(state, APPLIED, index.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::state::{LeaderStart, RaiseCeilings, Trim};

    fn entry(index: u64, cmd: command::Kind) -> Entry {
        Entry {
            index,
            term: 1,
            data: Command { kind: Some(cmd) }.encode_to_vec().into(),
            ..Default::default()
        }
    }

    fn raise(ns: &str, key: &str, ceiling: u64) -> command::Kind {
        command::Kind::Raise(RaiseCeilings {
            keys: vec![KeyCeiling {
                namespace: ns.into(),
                key: key.into(),
                ceiling,
            }],
        })
    }

    #[test]
    fn raises_only_go_up_and_replays_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        m.apply(&[
            entry(1, raise("a", "k", 100)),
            entry(2, raise("a", "k", 50)),
        ])
        .unwrap();
        assert_eq!(m.ceiling("a", "k").unwrap(), 100);
        // Replaying entry 1 with another value changes nothing.
        m.apply(&[entry(1, raise("a", "k", 500))]).unwrap();
        assert_eq!(m.ceiling("a", "k").unwrap(), 100);
        assert_eq!(m.applied(), 2);
        let m = Machine::open(db).unwrap();
        assert_eq!((m.applied(), m.ceiling("a", "k").unwrap()), (2, 100));
        // Keys whose bytes extend another's namespace stay apart.
        assert_eq!(m.ceiling("a", "k\0x").unwrap(), 0);
    }

    #[test]
    fn epoch_stays_after_a_clean_handoff() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let start = |term| command::Kind::LeaderStart(LeaderStart { term, node_id: 1 });
        m.apply(&[entry(1, start(1))]).unwrap();
        assert_eq!(m.epoch(), 1);
        m.apply(&[entry(2, raise("a", "k", 100))]).unwrap();
        m.apply(&[entry(
            3,
            command::Kind::Trim(Trim {
                keys: vec![KeyCeiling {
                    namespace: "a".into(),
                    key: "k".into(),
                    ceiling: 7,
                }],
                term: 1,
            }),
        )])
        .unwrap();
        assert_eq!(m.ceiling("a", "k").unwrap(), 7);
        m.apply(&[entry(4, start(2))]).unwrap();
        assert_eq!(m.epoch(), 1, "trimmed hand-over keeps the epoch");
        m.apply(&[entry(5, start(3))]).unwrap();
        assert_eq!(m.epoch(), 2, "an untrimmed take-over bumps it");
    }

    #[test]
    fn snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        m.apply(&[
            entry(1, raise("a", "k1", 10)),
            entry(2, raise("b", "k2", 20)),
        ])
        .unwrap();
        let (index, bytes) = read_snapshot(&db).unwrap();
        assert_eq!(index, 2);

        let dir2 = tempfile::tempdir().unwrap();
        let db2 = super::super::open(dir2.path()).unwrap();
        let mut m2 = Machine::open(db2.clone()).unwrap();
        m2.apply(&[entry(1, raise("z", "old", 99))]).unwrap();
        let mut batch = WriteBatch::default();
        write_snapshot(&db2, &mut batch, index, &bytes).unwrap();
        db2.write(batch).unwrap();
        m2.reload().unwrap();
        assert_eq!(m2.applied(), 2);
        assert_eq!(m2.ceiling("b", "k2").unwrap(), 20);
        assert_eq!(m2.ceiling("z", "old").unwrap(), 0, "old state is replaced");
    }
}
