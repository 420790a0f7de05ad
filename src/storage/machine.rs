//! The replicated state machine: per-key ceilings, the allocation epoch,
//! Snowflake workers, members, what recent dense calls with a request id
//! were given, and the applied index, in the `state` column family.

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType};
use rocksdb::{WriteBatch, DB};

use super::{cf, decode_u64, Disk, StorageError, CF_STATE};
use crate::pb::state::{
    command, BindDataId, Command, KeyCeiling, MachineMeta, Member, RenewFence, RequestGrant,
    SnapshotData, WorkerEntry, WorkerRecord,
};

const META: &[u8] = b"m";
const APPLIED: &[u8] = b"a";
const CEILING_PREFIX: u8 = b'c';
/// `w` + worker id (BE) → WorkerRecord.
const WORKER_PREFIX: u8 = b'w';
/// `n` + node id (BE) → the worker id it holds.
const NODE_WORKER_PREFIX: u8 = b'n';
/// `p` + node id (BE) → member address.
const MEMBER_PREFIX: u8 = b'p';
/// `s` + node id (BE) → index of the conf change that made it a member this
/// time (absent: a founder, 0).
const SINCE_PREFIX: u8 = b's';
/// `d` + node id (BE) → the data id bound to its current incarnation.
const DATA_ID_PREFIX: u8 = b'd';
/// `r` + sequence number (BE, in apply order) + its ranges (BE u32) →
/// RequestGrant. The ranges are in the key so that the bounds can be
/// counted at start without decoding every record.
const REQUEST_PREFIX: u8 = b'r';

/// Request records kept (in memory and on disk): at most this many ...
pub const REQUEST_RECORDS: usize = 100_000;
/// ... holding at most this many ranges in all (a batch's record holds one
/// per item).
pub const REQUEST_RECORD_RANGES: usize = 1_000_000;

fn id_key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn request_key(seq: u64, ranges: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..9].copy_from_slice(&id_key(REQUEST_PREFIX, seq));
    k[9..].copy_from_slice(&ranges.to_be_bytes());
    k
}

/// A record's ranges as its key counts them (a batch has at most
/// MAX_BATCH_ITEMS, far below u32::MAX).
fn grant_ranges(g: &RequestGrant) -> u32 {
    u32::try_from(g.firsts.len()).unwrap_or(u32::MAX)
}

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

fn split_ceiling_key(k: &[u8]) -> Result<(&str, &str), StorageError> {
    let rest = &k[1..];
    let nul = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| StorageError::corrupt("ceiling key", "no separator"))?;
    let ns =
        std::str::from_utf8(&rest[..nul]).map_err(|e| StorageError::corrupt("ceiling key", e))?;
    let key = std::str::from_utf8(&rest[nul + 1..])
        .map_err(|e| StorageError::corrupt("ceiling key", e))?;
    Ok((ns, key))
}

/// Appends to `out` a `KeyCeiling` as field 2 of `SnapshotData`, the bytes
/// prost writes for it, from the key's stored parts (no `String`s per key:
/// a snapshot encodes tens of millions).
fn encode_ceiling(out: &mut Vec<u8>, namespace: &str, key: &str, ceiling: u64) {
    use prost::encoding::{encode_key, encode_varint, key_len, uint64, WireType};
    let text = |tag: u32, s: &str| {
        if s.is_empty() {
            0
        } else {
            key_len(tag) + prost::length_delimiter_len(s.len()) + s.len()
        }
    };
    // proto3 leaves out empty and zero fields.
    let number = if ceiling == 0 {
        0
    } else {
        uint64::encoded_len(3, &ceiling)
    };
    let len = text(1, namespace) + text(2, key) + number;
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    for (tag, s) in [(1, namespace), (2, key)] {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
    }
    if ceiling != 0 {
        uint64::encode(3, &ceiling, out);
    }
}

/// What applying one entry changed, for the leader's allocator.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Ceilings after the raise (each is the new applied value), and the
    /// request ids it answered.
    Raised(Vec<KeyCeiling>, Vec<RequestGrant>),
    /// A leader's start-of-term entry, with the epoch now in force.
    LeaderStarted { term: u64, node_id: u64, epoch: u64 },
    /// Ceilings set by a hand-over trim.
    Trimmed(Vec<KeyCeiling>),
    /// Idle keys whose ceiling was lowered to the last number handed out
    /// (those whose ceiling had moved since are left out).
    Released(Vec<KeyCeiling>),
    /// A configuration change raft-rs took. Member addresses and
    /// incarnations and freed workers are recorded.
    ConfChange(Entry),
    /// A configuration change raft-rs refused: nothing changed.
    ConfChangeRefused(Entry),
    /// `data_id` is now bound to `node_id`'s incarnation.
    DataIdBound { node_id: u64, data_id: u64 },
    /// `node_id` holds `worker`, whose fence (the floor for the new holder)
    /// is `fence_ms`, in the worker's `tenure`-th holding.
    WorkerAssigned {
        node_id: u64,
        worker: u64,
        fence_ms: u64,
        tenure: u64,
    },
    /// No worker id was free for `node_id`.
    NoFreeWorker { node_id: u64 },
    /// `node_id` asked for a worker id but is not a member (it was removed
    /// after asking): none is taken, as none would ever be freed.
    NotMember { node_id: u64 },
    /// `worker`, held by `node_id`, may now stamp up to `fence_ms`.
    FenceRenewed {
        node_id: u64,
        worker: u64,
        fence_ms: u64,
        boot: u64,
    },

    /// An empty entry (raft-rs appends one when a leader is elected).
    Empty,
}

/// The state machine. Owned by the node loop.
pub struct Machine {
    db: Disk,
    meta: MachineMeta,
    applied: u64,
    /// The stored request records, oldest first: sequence number and ranges.
    grants: VecDeque<(u64, u32)>,
    /// Ranges in `grants`.
    grant_ranges: usize,
    /// Most records and ranges kept ([`REQUEST_RECORDS`],
    /// [`REQUEST_RECORD_RANGES`]; smaller in tests).
    grant_bounds: (usize, usize),
    /// Stored ceilings by state key, as the last applies left them: a
    /// raise keeps the larger of the stored ceiling and its own, and
    /// reading the stored one from RocksDB (a memtable skiplist walk) was
    /// a tenth of a dense namespace's CPU. Exact, not a guess: every
    /// ceiling an apply reads or writes goes in once the apply's batch is
    /// written, and [`Machine::reload`] (a snapshot replaced the state)
    /// empties it. Emptied too when it reaches [`CEILING_CACHE_KEYS`].
    ceilings: HashMap<Vec<u8>, u64>,
}

/// Most keys [`Machine`] keeps stored ceilings of (about 100 bytes each).
const CEILING_CACHE_KEYS: usize = 1 << 16;

impl Machine {
    pub fn open(db: Disk) -> Result<Self, StorageError> {
        let mut m = Self {
            db,
            meta: MachineMeta::default(),
            applied: 0,
            grants: VecDeque::new(),
            grant_ranges: 0,
            grant_bounds: (REQUEST_RECORDS, REQUEST_RECORD_RANGES),
            ceilings: HashMap::new(),
        };
        m.reload()?;
        Ok(m)
    }

    /// Re-reads the cached fields, after a snapshot replaced the state.
    pub fn reload(&mut self) -> Result<(), StorageError> {
        self.ceilings.clear();
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
        let mut grants = VecDeque::new();
        self.scan(REQUEST_PREFIX, |k, _| {
            let bad = || StorageError::corrupt("request record key", format!("{} bytes", k.len()));
            let seq = decode_u64("request record key", k.get(1..9).ok_or_else(bad)?)?;
            let ranges: [u8; 4] = k.get(9..).and_then(|r| r.try_into().ok()).ok_or_else(bad)?;
            grants.push_back((seq, u32::from_be_bytes(ranges)));
            Ok(())
        })?;
        self.grant_ranges = grants.iter().map(|(_, r)| *r as usize).sum();
        self.grants = grants;
        Ok(())
    }

    /// The stored request records, oldest first: what recent dense calls
    /// with a request id were given, as their raises applied.
    pub fn request_grants(&self) -> Result<Vec<RequestGrant>, StorageError> {
        let mut out = Vec::with_capacity(self.grants.len());
        self.scan(REQUEST_PREFIX, |_, v| {
            out.push(
                RequestGrant::decode(v).map_err(|e| StorageError::corrupt("request record", e))?,
            );
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every key and value under `prefix`, in key order.
    fn scan(
        &self,
        prefix: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let from = [prefix];
        for item in self.db.iterator_cf(
            cf(&self.db, CF_STATE),
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            if k.first() != Some(&prefix) {
                break;
            }
            f(&k, &v)?;
        }
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

    /// The worker a node holds and that worker's fence.
    pub fn worker_of(&self, node_id: u64) -> Result<Option<(u64, u64)>, StorageError> {
        let state = cf(&self.db, CF_STATE);
        let Some(b) = self.db.get_cf(state, id_key(NODE_WORKER_PREFIX, node_id))? else {
            return Ok(None);
        };
        let worker = decode_u64("node worker", &b)?;
        let rec = match self.db.get_cf(state, id_key(WORKER_PREFIX, worker))? {
            Some(b) => WorkerRecord::decode(b.as_slice())
                .map_err(|e| StorageError::corrupt("worker record", e))?,
            None => WorkerRecord::default(),
        };
        Ok((rec.node_id == node_id).then_some((worker, rec.fence_ms)))
    }

    /// The highest time fence committed for a worker another node holds
    /// now (None: no other node holds one).
    pub fn latest_fence_of_others(&self, node_id: u64) -> Result<Option<u64>, StorageError> {
        let mut latest = None;
        self.scan(WORKER_PREFIX, |_, v| {
            let rec =
                WorkerRecord::decode(v).map_err(|e| StorageError::corrupt("worker record", e))?;
            if rec.node_id != 0 && rec.node_id != node_id {
                latest = Some(latest.map_or(rec.fence_ms, |f: u64| f.max(rec.fence_ms)));
            }
            Ok(())
        })?;
        Ok(latest)
    }

    /// Worker `worker`'s holding: its tenure, and the boot of the holder
    /// whose renewal set its fence (0: an earlier holder's, or unknown).
    pub fn holding(&self, worker: u64) -> Result<(u64, u64), StorageError> {
        let state = cf(&self.db, CF_STATE);
        let rec = match self.db.get_cf(state, id_key(WORKER_PREFIX, worker))? {
            Some(b) => WorkerRecord::decode(b.as_slice())
                .map_err(|e| StorageError::corrupt("worker record", e))?,
            None => WorkerRecord::default(),
        };
        Ok((rec.tenure, rec.boot))
    }

    /// Every member address recorded by conf changes.
    pub fn members(&self) -> Result<Vec<(u64, String)>, StorageError> {
        let mut out = Vec::new();
        self.scan(MEMBER_PREFIX, |k, v| {
            let id = decode_u64("member key", &k[1..])?;
            let addr =
                String::from_utf8(v.to_vec()).map_err(|e| StorageError::corrupt("member", e))?;
            out.push((id, addr));
            Ok(())
        })?;
        Ok(out)
    }

    /// Each member's incarnation: the index of the conf change that made it
    /// a member this time, for those added by one (founders: none, 0).
    pub fn member_since(&self) -> Result<HashMap<u64, u64>, StorageError> {
        self.by_member(SINCE_PREFIX, "member since")
    }

    /// The data id bound to each member's current incarnation, for those
    /// that bound one.
    pub fn data_ids(&self) -> Result<HashMap<u64, u64>, StorageError> {
        self.by_member(DATA_ID_PREFIX, "data id")
    }

    /// The u64 records under `prefix` + node id, by node id.
    fn by_member(&self, prefix: u8, what: &'static str) -> Result<HashMap<u64, u64>, StorageError> {
        let mut out = HashMap::new();
        self.scan(prefix, |k, v| {
            out.insert(decode_u64(what, &k[1..])?, decode_u64(what, v)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Applies committed entries in one write batch and reports what each
    /// changed. Entries at or below the applied index are skipped, so a
    /// replay after a crash is harmless.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<Vec<(Entry, Applied)>, StorageError> {
        self.apply_with_conf(entries, None)
    }

    /// Like [`Machine::apply`], also recording `conf` (the configuration
    /// after a conf-change entry among `entries`) in the same write, so the
    /// applied index never gets ahead of the saved configuration. A
    /// conf-change entry without `conf` is one raft-rs refused: it changes
    /// no member record.
    pub fn apply_with_conf(
        &mut self,
        entries: &[Entry],
        conf: Option<&ConfState>,
    ) -> Result<Vec<(Entry, Applied)>, StorageError> {
        let mut txn = Txn::new(&self.db);
        if let Some(cs) = conf {
            let bytes = cs
                .write_to_bytes()
                .map_err(|e| StorageError::corrupt("conf state", e))?;
            txn.batch.put_cf(
                cf(&self.db, super::CF_META),
                super::raft_log::CONF_STATE,
                bytes,
            );
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut applied = self.applied;
        let mut meta = self.meta;
        // Request records stored by this batch: sequence number and ranges.
        let mut new_grants: Vec<(u64, u32)> = Vec::new();
        // Ceilings this batch read or wrote, in order, for `self.ceilings`.
        let mut seen: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut next_seq = self.grants.back().map_or(0, |(seq, _)| seq + 1);
        for e in entries {
            if e.index <= applied {
                continue;
            }
            applied = e.index;
            let outcome = match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| StorageError::corrupt("conf change", err))?;
                    // Without the configuration raft-rs made of it, raft-rs
                    // refused the change (the same on every node): it
                    // changes no member record either.
                    if conf.is_some() {
                        txn.conf_change(&cc, e.index)?;
                        Applied::ConfChange(e.clone())
                    } else {
                        Applied::ConfChangeRefused(e.clone())
                    }
                }
                EntryType::EntryConfChangeV2 if conf.is_some() => Applied::ConfChange(e.clone()),
                EntryType::EntryConfChangeV2 => Applied::ConfChangeRefused(e.clone()),
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
                                let old = txn.ceiling(&k, &self.ceilings)?;
                                let new = old.max(kc.ceiling);
                                if new != old {
                                    txn.put(k.clone(), new.to_be_bytes().to_vec());
                                }
                                seen.push((k, new));
                                done.push(KeyCeiling { ceiling: new, ..kc });
                            }
                            // A raise after a trim means the trimmed hand-over
                            // is over: the next leader change may open holes.
                            meta.clean_handoff = false;
                            let mut requests = r.requests;
                            for g in &mut requests {
                                g.epoch = meta.epoch;
                                let ranges = grant_ranges(g);
                                txn.put(request_key(next_seq, ranges).to_vec(), g.encode_to_vec());
                                new_grants.push((next_seq, ranges));
                                next_seq += 1;
                            }
                            Applied::Raised(done, requests)
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
                        // Only in the term it was proposed in, by that
                        // term's leader. (raft-rs forwards a follower's
                        // proposal to the leader, in whose term a deposed
                        // leader's trim would lower ceilings under what the
                        // new leader handed out. The leader never proposes
                        // a trim but as leader; this keeps that true.)
                        Some(command::Kind::Trim(t)) if t.term != e.term => Applied::Empty,
                        Some(command::Kind::Trim(t)) => {
                            for kc in &t.keys {
                                let k = ceiling_key(&kc.namespace, &kc.key);
                                txn.put(k.clone(), kc.ceiling.to_be_bytes().to_vec());
                                seen.push((k, kc.ceiling));
                            }
                            // A part alone leaves holes in the keys of the
                            // parts that never came.
                            meta.clean_handoff = !t.more;
                            Applied::Trimmed(t.keys)
                        }
                        Some(command::Kind::Release(r)) => {
                            let mut done = Vec::with_capacity(r.keys.len());
                            for rk in r.keys {
                                let k = ceiling_key(&rk.namespace, &rk.key);
                                let current = txn.ceiling(&k, &self.ceilings)?;
                                // Only down, and only from the ceiling the
                                // leader saw: never below a raise it did not.
                                if current == rk.from && rk.ceiling < current {
                                    txn.put(k.clone(), rk.ceiling.to_be_bytes().to_vec());
                                    seen.push((k, rk.ceiling));
                                    done.push(KeyCeiling {
                                        namespace: rk.namespace,
                                        key: rk.key,
                                        ceiling: rk.ceiling,
                                    });
                                }
                            }
                            Applied::Released(done)
                        }
                        Some(command::Kind::AcquireWorker(a)) => {
                            txn.acquire_worker(a.node_id, a.max_workers)?
                        }
                        Some(command::Kind::RenewFence(r)) => txn.renew_fence(&r)?,
                        Some(command::Kind::BindDataId(b)) => txn.bind_data_id(&b)?,
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
        let evicted = self.evict_grants(&mut txn, &new_grants);
        txn.put(META.to_vec(), meta.encode_to_vec());
        txn.put(APPLIED.to_vec(), applied.to_be_bytes().to_vec());
        txn.commit()?;
        for (k, ceiling) in seen {
            if let Some(kept) = self.ceilings.get_mut(&k) {
                *kept = ceiling;
                continue;
            }
            if self.ceilings.len() >= CEILING_CACHE_KEYS {
                self.ceilings.clear();
            }
            self.ceilings.insert(k, ceiling);
        }
        self.applied = applied;
        self.meta = meta;
        for (seq, ranges) in new_grants {
            self.grants.push_back((seq, ranges));
            self.grant_ranges += ranges as usize;
        }
        for _ in 0..evicted {
            if let Some((_, ranges)) = self.grants.pop_front() {
                self.grant_ranges -= ranges as usize;
            }
        }
        Ok(out)
    }

    /// Deletes in `txn` the oldest request records while those kept and
    /// `added` (stored by `txn`) are over the bounds; returns how many
    /// records, oldest first, it deleted (some of `added` may be among
    /// them, deleted after their put).
    fn evict_grants(&self, txn: &mut Txn<'_>, added: &[(u64, u32)]) -> usize {
        let (max_records, max_ranges) = self.grant_bounds;
        let mut records = self.grants.len() + added.len();
        let mut ranges = self.grant_ranges + added.iter().map(|(_, r)| *r as usize).sum::<usize>();
        let mut evicted = 0;
        for &(seq, r) in self.grants.iter().chain(added) {
            if records <= max_records && ranges <= max_ranges {
                break;
            }
            txn.delete(request_key(seq, r).to_vec());
            records -= 1;
            ranges -= r as usize;
            evicted += 1;
        }
        evicted
    }
}

/// One apply batch: writes go to a RocksDB batch, and reads see them.
struct Txn<'a> {
    db: &'a Disk,
    batch: WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    fn new(db: &'a Disk) -> Self {
        Self {
            db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
        }
    }

    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.overlay.get(k) {
            return Ok(v.clone());
        }
        Ok(self.db.get_cf(cf(self.db, CF_STATE), k)?)
    }

    /// A key's ceiling as this batch leaves it so far: its own write,
    /// else the stored one (`cached`, else RocksDB), else 0.
    fn ceiling(&self, k: &[u8], cached: &HashMap<Vec<u8>, u64>) -> Result<u64, StorageError> {
        if !self.overlay.contains_key(k) {
            if let Some(c) = cached.get(k) {
                return Ok(*c);
            }
        }
        Ok(self.get_u64(k)?.unwrap_or(0))
    }

    fn get_u64(&self, k: &[u8]) -> Result<Option<u64>, StorageError> {
        self.get(k)?
            .map(|b| decode_u64("state value", &b))
            .transpose()
    }

    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.batch.put_cf(cf(self.db, CF_STATE), &k, &v);
        self.overlay.insert(k, Some(v));
    }

    fn delete(&mut self, k: Vec<u8>) {
        self.batch.delete_cf(cf(self.db, CF_STATE), &k);
        self.overlay.insert(k, None);
    }

    fn worker(&self, worker: u64) -> Result<WorkerRecord, StorageError> {
        match self.get(&id_key(WORKER_PREFIX, worker))? {
            Some(b) => WorkerRecord::decode(b.as_slice())
                .map_err(|e| StorageError::corrupt("worker record", e)),
            None => Ok(WorkerRecord::default()),
        }
    }

    fn acquire_worker(&mut self, node_id: u64, max_workers: u64) -> Result<Applied, StorageError> {
        if let Some(w) = self.get_u64(&id_key(NODE_WORKER_PREFIX, node_id))? {
            let rec = self.worker(w)?;
            if rec.node_id == node_id {
                return Ok(Applied::WorkerAssigned {
                    node_id,
                    worker: w,
                    fence_ms: rec.fence_ms,
                    tenure: rec.tenure,
                });
            }
        }
        if !self.is_member(node_id)? {
            return Ok(Applied::NotMember { node_id });
        }
        for w in 0..max_workers {
            let rec = self.worker(w)?;
            if rec.node_id == 0 {
                // Its fence is the last holder's.
                let rec = WorkerRecord {
                    node_id,
                    boot: 0,
                    tenure: rec.tenure + 1,
                    ..rec
                };
                self.put(id_key(WORKER_PREFIX, w).to_vec(), rec.encode_to_vec());
                self.put(
                    id_key(NODE_WORKER_PREFIX, node_id).to_vec(),
                    w.to_be_bytes().to_vec(),
                );
                return Ok(Applied::WorkerAssigned {
                    node_id,
                    worker: w,
                    fence_ms: rec.fence_ms,
                    tenure: rec.tenure,
                });
            }
        }
        Ok(Applied::NoFreeWorker { node_id })
    }

    /// Whether `node_id` is in the configuration as of the entry being
    /// applied: a conf change is applied in a batch of its own, which saves
    /// the configuration it yields, so the saved one is this entry's (the
    /// same on every node). A database with none saved (only a bare
    /// machine's, in tests) counts everyone.
    fn is_member(&self, node_id: u64) -> Result<bool, StorageError> {
        let Some(bytes) = self
            .db
            .get_cf(cf(self.db, super::CF_META), super::raft_log::CONF_STATE)?
        else {
            return Ok(true);
        };
        let cs = ConfState::parse_from_bytes(&bytes)
            .map_err(|e| StorageError::corrupt("conf state", e))?;
        Ok([
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&node_id)))
    }

    /// Binds a data id to a member's incarnation, unless it is not a
    /// member in that incarnation or one is bound already.
    fn bind_data_id(&mut self, b: &BindDataId) -> Result<Applied, StorageError> {
        let since = self.get_u64(&id_key(SINCE_PREFIX, b.node_id))?.unwrap_or(0);
        if b.data_id == 0
            || since != b.since
            || !self.is_member(b.node_id)?
            || self.get(&id_key(DATA_ID_PREFIX, b.node_id))?.is_some()
        {
            return Ok(Applied::Empty);
        }
        self.put(
            id_key(DATA_ID_PREFIX, b.node_id).to_vec(),
            b.data_id.to_be_bytes().to_vec(),
        );
        Ok(Applied::DataIdBound {
            node_id: b.node_id,
            data_id: b.data_id,
        })
    }

    fn renew_fence(&mut self, r: &RenewFence) -> Result<Applied, StorageError> {
        let mut rec = self.worker(r.worker)?;
        if rec.node_id != r.node_id {
            // The worker changed hands since the renewal was proposed.
            return Ok(Applied::Empty);
        }
        if r.fence_ms >= rec.fence_ms {
            rec.boot = r.boot;
        }
        rec.fence_ms = rec.fence_ms.max(r.fence_ms);
        self.put(
            id_key(WORKER_PREFIX, r.worker).to_vec(),
            rec.encode_to_vec(),
        );
        Ok(Applied::FenceRenewed {
            node_id: r.node_id,
            worker: r.worker,
            fence_ms: rec.fence_ms,
            boot: r.boot,
        })
    }

    /// Records member addresses and incarnations (entry `index` for a node
    /// that was not a member: a learner added, or a voter added directly;
    /// a learner promoted keeps its own), and frees the worker of a removed
    /// node (keeping its fence for the next holder).
    fn conf_change(&mut self, cc: &ConfChange, index: u64) -> Result<(), StorageError> {
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                let promoted = cc.get_change_type() == ConfChangeType::AddNode
                    && (self.get(&id_key(MEMBER_PREFIX, cc.node_id))?.is_some()
                        || self.get(&id_key(SINCE_PREFIX, cc.node_id))?.is_some());
                if !promoted {
                    self.put(
                        id_key(SINCE_PREFIX, cc.node_id).to_vec(),
                        index.to_be_bytes().to_vec(),
                    );
                    self.delete(id_key(DATA_ID_PREFIX, cc.node_id).to_vec());
                }
                if !cc.context.is_empty() {
                    self.put(
                        id_key(MEMBER_PREFIX, cc.node_id).to_vec(),
                        cc.context.to_vec(),
                    );
                }
            }
            ConfChangeType::RemoveNode => {
                self.delete(id_key(MEMBER_PREFIX, cc.node_id).to_vec());
                self.delete(id_key(SINCE_PREFIX, cc.node_id).to_vec());
                self.delete(id_key(DATA_ID_PREFIX, cc.node_id).to_vec());
                if let Some(w) = self.get_u64(&id_key(NODE_WORKER_PREFIX, cc.node_id))? {
                    let mut rec = self.worker(w)?;
                    if rec.node_id == cc.node_id {
                        rec.node_id = 0;
                        rec.boot = 0;
                        self.put(id_key(WORKER_PREFIX, w).to_vec(), rec.encode_to_vec());
                    }
                    self.delete(id_key(NODE_WORKER_PREFIX, cc.node_id).to_vec());
                }
            }
        }
        Ok(())
    }

    fn commit(self) -> Result<(), StorageError> {
        self.db.write_batch(self.batch, false)?;
        Ok(())
    }
}

/// The protobuf key (field 2, length-delimited) of `SnapshotData.ceilings`,
/// the state's bulk: one entry per key ever used. Snapshots encode and
/// decode it one key at a time (see [`read_snapshot`] and
/// [`split_ceilings`]), so a state of tens of millions of keys is never held
/// decoded at once.
const CEILINGS_KEY: usize = (2 << 3) | 2;

/// Serializes the whole state machine with its applied index, as RocksDB
/// snapshot `snap` of `db` holds them (so the index and the data agree).
/// The key ceilings are encoded as they are read, then the other fields:
/// protobuf decodes a message's fields in any order.
pub(super) fn read_snapshot(
    db: &DB,
    snap: &rocksdb::Snapshot<'_>,
) -> Result<(u64, Vec<u8>), StorageError> {
    let state = cf(db, CF_STATE);
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
        ..Default::default()
    };
    let mut members: BTreeMap<u64, Member> = BTreeMap::new();
    fn member<'m>(
        members: &'m mut BTreeMap<u64, Member>,
        k: &[u8],
    ) -> Result<&'m mut Member, StorageError> {
        let node_id = decode_u64("member key", &k[1..])?;
        Ok(members.entry(node_id).or_insert_with(|| Member {
            node_id,
            ..Default::default()
        }))
    }
    let mut out = Vec::new();
    // Read in place: no key or value copied out per entry.
    let mut items = snap.raw_iterator_cf(state);
    items.seek_to_first();
    while let (Some(k), Some(v)) = (items.key(), items.value()) {
        match k.first() {
            Some(&CEILING_PREFIX) => {
                let (namespace, key) = split_ceiling_key(k)?;
                encode_ceiling(&mut out, namespace, key, decode_u64("ceiling", v)?);
            }
            Some(&WORKER_PREFIX) => data.workers.push(WorkerEntry {
                worker: decode_u64("worker key", &k[1..])?,
                record: Some(
                    WorkerRecord::decode(v)
                        .map_err(|e| StorageError::corrupt("worker record", e))?,
                ),
            }),
            Some(&REQUEST_PREFIX) => data.requests.push(
                RequestGrant::decode(v).map_err(|e| StorageError::corrupt("request record", e))?,
            ),
            Some(&MEMBER_PREFIX) => {
                member(&mut members, k)?.addr =
                    String::from_utf8(v.to_vec()).map_err(|e| StorageError::corrupt("member", e))?
            }
            Some(&SINCE_PREFIX) => member(&mut members, k)?.since = decode_u64("member since", v)?,
            Some(&DATA_ID_PREFIX) => member(&mut members, k)?.data_id = decode_u64("data id", v)?,
            _ => {}
        }
        items.next();
    }
    items.status()?;
    data.members = members.into_values().collect();
    data.encode(&mut out).expect("a Vec grows");
    Ok((applied, out))
}

/// Walks an encoded `SnapshotData`: hands each key ceiling to `each` as it
/// is decoded, and decodes the other fields (a few members, workers and
/// request records) as one `SnapshotData` without ceilings.
fn split_ceilings(
    mut bytes: &[u8],
    mut each: impl FnMut(KeyCeiling) -> Result<(), StorageError>,
) -> Result<SnapshotData, StorageError> {
    let corrupt = |e: &dyn std::fmt::Display| StorageError::corrupt("snapshot data", e);
    let varint = |bytes: &mut &[u8]| prost::decode_length_delimiter(bytes).map_err(|e| corrupt(&e));
    let mut rest = Vec::new();
    while !bytes.is_empty() {
        let field_start = bytes;
        let key = varint(&mut bytes)?;
        let len = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                0
            }
            1 => 8,
            2 => varint(&mut bytes)?,
            5 => 4,
            wire => return Err(corrupt(&format!("field {}: wire type {wire}", key >> 3))),
        };
        if len > bytes.len() {
            return Err(corrupt(&format!(
                "field {} runs past the end ({len} bytes, {} left)",
                key >> 3,
                bytes.len()
            )));
        }
        let (value, after) = bytes.split_at(len);
        if key == CEILINGS_KEY {
            each(KeyCeiling::decode(value).map_err(|e| corrupt(&e))?)?;
        } else {
            rest.extend_from_slice(&field_start[..field_start.len() - after.len()]);
        }
        bytes = after;
    }
    SnapshotData::decode(rest.as_slice()).map_err(|e| corrupt(&e))
}

/// Adds to `batch` the writes that replace the state machine with a
/// snapshot taken at `index`.
pub(super) fn write_snapshot(
    db: &DB,
    batch: &mut WriteBatch,
    index: u64,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let state = cf(db, CF_STATE);
    // Key by key, not by a range deletion: the family updates values in
    // place (see `storage::state_options`), and a put finding an older
    // value of its key in the memtable would overwrite that value under
    // the range tombstone, which would then hide the new value too. A
    // point deletion is the key's newest entry, so the put after it is
    // added, not written in place.
    for item in db.iterator_cf(state, rocksdb::IteratorMode::Start) {
        let (k, _) = item?;
        batch.delete_cf(state, &k);
    }
    snapshot_entries(index, bytes, |k, v| {
        batch.put_cf(state, k, v);
        Ok(())
    })
}

/// Writes the state family of a snapshot taken at `index` to a table file
/// at `path`, for RocksDB to ingest (see `raft_log::RaftStore::install_snapshot`).
/// A table file takes its keys in order, as every build encodes them (read
/// from RocksDB in order); answers false, and leaves the file unfinished,
/// if these are not.
pub(super) fn write_state_file(
    path: &std::path::Path,
    index: u64,
    bytes: &[u8],
) -> Result<bool, StorageError> {
    let opts = super::state_options();
    let mut writer = rocksdb::SstFileWriter::create(&opts);
    writer.open(path)?;
    let mut last = Vec::new();
    let mut sorted = true;
    snapshot_entries(index, bytes, |k, v| {
        // Decoding goes on to the end, so that a corrupt snapshot is
        // refused as such, not taken for one merely out of order.
        if sorted && k > last.as_slice() {
            last.clear();
            last.extend_from_slice(k);
            writer.put(k, v)?;
        } else {
            sorted = false;
        }
        Ok(())
    })?;
    if sorted {
        writer.finish()?;
    }
    Ok(sorted)
}

/// The applied index the state family holds.
pub(super) fn applied_index(db: &DB) -> Result<u64, StorageError> {
    match db.get_cf(cf(db, CF_STATE), APPLIED)? {
        Some(b) => decode_u64("applied index", &b),
        None => Ok(0),
    }
}

/// Hands `put` every entry of the state family a snapshot taken at `index`
/// holds, in key order if its ceilings come in key order: the applied
/// index (`a`), the ceilings (`c`), then the rest (a few members, workers
/// and request records, and the machine's meta), sorted.
fn snapshot_entries(
    index: u64,
    bytes: &[u8],
    mut put: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    put(APPLIED, &index.to_be_bytes())?;
    let data = split_ceilings(bytes, |kc| {
        put(
            &ceiling_key(&kc.namespace, &kc.key),
            &kc.ceiling.to_be_bytes(),
        )
    })?;
    let mut rest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for w in &data.workers {
        let rec = w.record.unwrap_or_default();
        rest.insert(
            id_key(WORKER_PREFIX, w.worker).to_vec(),
            rec.encode_to_vec(),
        );
        if rec.node_id != 0 {
            rest.insert(
                id_key(NODE_WORKER_PREFIX, rec.node_id).to_vec(),
                w.worker.to_be_bytes().to_vec(),
            );
        }
    }
    for m in &data.members {
        if !m.addr.is_empty() {
            rest.insert(
                id_key(MEMBER_PREFIX, m.node_id).to_vec(),
                m.addr.as_bytes().to_vec(),
            );
        }
        if m.since != 0 {
            rest.insert(
                id_key(SINCE_PREFIX, m.node_id).to_vec(),
                m.since.to_be_bytes().to_vec(),
            );
        }
        if m.data_id != 0 {
            rest.insert(
                id_key(DATA_ID_PREFIX, m.node_id).to_vec(),
                m.data_id.to_be_bytes().to_vec(),
            );
        }
    }
    // In the order they were stored: the oldest is evicted first.
    for (seq, g) in (0u64..).zip(&data.requests) {
        rest.insert(
            request_key(seq, grant_ranges(g)).to_vec(),
            g.encode_to_vec(),
        );
    }
    rest.insert(META.to_vec(), data.meta.unwrap_or_default().encode_to_vec());
    for (k, v) in &rest {
        put(k, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::state::{LeaderStart, RaiseCeilings, Trim};

    fn conf(voters: Vec<u64>, learners: Vec<u64>) -> ConfState {
        ConfState {
            voters,
            learners,
            ..Default::default()
        }
    }

    /// A fresh database whose saved configuration is `cs`.
    fn db_with_conf(dir: &tempfile::TempDir, cs: &ConfState) -> Disk {
        let db = super::super::open(dir.path()).unwrap();
        save_conf(&db, cs);
        db
    }

    fn save_conf(db: &Disk, cs: &ConfState) {
        db.put_cf(
            cf(db, super::super::CF_META),
            super::super::raft_log::CONF_STATE,
            cs.write_to_bytes().unwrap(),
        )
        .unwrap();
    }

    fn conf_change(index: u64, change_type: ConfChangeType, node_id: u64, addr: &str) -> Entry {
        let cc = ConfChange {
            change_type,
            node_id,
            context: addr.as_bytes().to_vec().into(),
            ..Default::default()
        };
        let mut e = Entry {
            index,
            term: 1,
            data: cc.write_to_bytes().unwrap().into(),
            ..Default::default()
        };
        e.set_entry_type(EntryType::EntryConfChange);
        e
    }

    /// A machine restored from a snapshot of `db`.
    fn restored(db: &Disk) -> Machine {
        let (index, bytes) = read_snapshot(db, &db.snapshot()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = super::super::open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        write_snapshot(&other, &mut batch, index, &bytes).unwrap();
        other.write_batch(batch, true).unwrap();
        Machine::open(other).unwrap()
    }

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
            requests: Vec::new(),
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

    /// A ceiling raised again and again replaces its value in the state
    /// family's memtable instead of stacking versions there, which every
    /// raise's read of the stored ceiling would have to walk past.
    #[test]
    fn a_raised_ceiling_keeps_one_memtable_entry() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let entries_in_memtable = || {
            db.property_int_value_cf(cf(&db, CF_STATE), "rocksdb.num-entries-active-mem-table")
                .unwrap()
                .unwrap()
        };
        m.apply(&[entry(1, raise("a", "k", 1))]).unwrap();
        let before = entries_in_memtable();
        for i in 2..=1_000 {
            m.apply(&[entry(i, raise("a", "k", i))]).unwrap();
        }
        assert_eq!(m.ceiling("a", "k").unwrap(), 1_000);
        // The applied index is rewritten in place too; nothing else is new.
        assert_eq!(entries_in_memtable(), before);
        let m = Machine::open(db).unwrap();
        assert_eq!((m.applied(), m.ceiling("a", "k").unwrap()), (1_000, 1_000));
    }

    /// Raises keep the larger of the stored ceiling and their own, and the
    /// stored one they compare with is read from memory after the first
    /// apply: it must follow what trims, releases and snapshots wrote.
    #[test]
    fn raises_compare_with_what_trims_releases_and_snapshots_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let release = |from, ceiling| {
            command::Kind::Release(crate::pb::state::ReleaseKeys {
                keys: vec![crate::pb::state::ReleasedKey {
                    namespace: "a".into(),
                    key: "k".into(),
                    ceiling,
                    from,
                }],
            })
        };
        let ceiling_after =
            |m: &mut Machine, entries: &[Entry]| match m.apply(entries).unwrap().last() {
                Some((_, Applied::Raised(kcs, _))) => kcs[0].ceiling,
                other => panic!("not a raise: {other:?}"),
            };
        assert_eq!(
            ceiling_after(&mut m, &[entry(1, raise("a", "k", 100))]),
            100
        );
        m.apply(&[entry(2, trim("k", 30, false))]).unwrap();
        assert_eq!(ceiling_after(&mut m, &[entry(3, raise("a", "k", 50))]), 50);
        let batch = [
            entry(4, raise("a", "k", 200)),
            entry(5, trim("k", 60, false)),
            entry(6, raise("a", "k", 70)),
        ];
        assert_eq!(ceiling_after(&mut m, &batch), 70);
        let batch = [
            entry(7, raise("a", "k", 300)),
            entry(8, raise("a", "k", 80)),
        ];
        assert_eq!(ceiling_after(&mut m, &batch), 300);
        m.apply(&[entry(9, release(300, 10))]).unwrap();
        assert_eq!(m.ceiling("a", "k").unwrap(), 10);
        assert_eq!(ceiling_after(&mut m, &[entry(10, raise("a", "k", 20))]), 20);
        // A release from a ceiling the key no longer has changes nothing.
        m.apply(&[entry(11, release(300, 5))]).unwrap();
        assert_eq!(ceiling_after(&mut m, &[entry(12, raise("a", "k", 15))]), 20);

        // A snapshot from another history, with the key lower.
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = super::super::open(dir2.path()).unwrap();
        let mut other = Machine::open(db2.clone()).unwrap();
        other.apply(&[entry(20, raise("a", "k", 8))]).unwrap();
        let (index, bytes) = read_snapshot(&db2, &db2.snapshot()).unwrap();
        let mut batch = WriteBatch::default();
        write_snapshot(&db, &mut batch, index, &bytes).unwrap();
        db.write_batch(batch, false).unwrap();
        m.reload().unwrap();
        assert_eq!(ceiling_after(&mut m, &[entry(21, raise("a", "k", 9))]), 9);
        let m = Machine::open(db).unwrap();
        assert_eq!((m.applied(), m.ceiling("a", "k").unwrap()), (21, 9));
    }

    /// A database last written by a build whose snapshot installs used a
    /// range deletion, with that install still only in the write-ahead
    /// log, opens with the snapshot's values: replaying the log must not
    /// write them in place under the range tombstone.
    #[test]
    fn a_range_deletion_in_the_log_survives_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = super::super::open_with(&super::super::options(), &path, false).unwrap();
            let state = cf(&db, CF_STATE);
            let k = ceiling_key("a", "k");
            let mut first = WriteBatch::default();
            first.put_cf(state, &k, 100u64.to_be_bytes());
            first.put_cf(state, APPLIED, 5u64.to_be_bytes());
            db.write(first).unwrap();
            // An install as older builds wrote it, in one batch.
            let mut install = WriteBatch::default();
            install.delete_range_cf(state, [0u8].as_slice(), [0xffu8; 2].as_slice());
            install.put_cf(state, &k, 200u64.to_be_bytes());
            install.put_cf(state, APPLIED, 6u64.to_be_bytes());
            db.write(install).unwrap();
            // Closed without a flush: the writes are in the log only.
        }
        let m = Machine::open(super::super::open(dir.path()).unwrap()).unwrap();
        assert_eq!((m.applied(), m.ceiling("a", "k").unwrap()), (6, 200));
    }

    /// A trim of `key` to `ceiling` in term 1; `more`: other parts follow.
    fn trim(key: &str, ceiling: u64, more: bool) -> command::Kind {
        command::Kind::Trim(Trim {
            keys: vec![KeyCeiling {
                namespace: "a".into(),
                key: key.into(),
                ceiling,
            }],
            term: 1,
            more,
        })
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
        m.apply(&[entry(3, trim("k", 7, false))]).unwrap();
        assert_eq!(m.ceiling("a", "k").unwrap(), 7);
        m.apply(&[entry(4, start(2))]).unwrap();
        assert_eq!(m.epoch(), 1, "trimmed hand-over keeps the epoch");
        m.apply(&[entry(5, start(3))]).unwrap();
        assert_eq!(m.epoch(), 2, "an untrimmed take-over bumps it");
    }

    /// A hand-over trimmed in parts is clean only once its last part
    /// applies: a leader that starts after the first part alone finds the
    /// other parts' keys still above what was handed out.
    #[test]
    fn a_trim_in_parts_is_clean_only_with_its_last_part() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let start = |term| command::Kind::LeaderStart(LeaderStart { term, node_id: 1 });
        m.apply(&[entry(1, start(1))]).unwrap();
        m.apply(&[
            entry(2, raise("a", "k", 100)),
            entry(3, raise("a", "l", 100)),
        ])
        .unwrap();
        m.apply(&[entry(4, trim("k", 7, true))]).unwrap();
        m.apply(&[entry(5, start(2))]).unwrap();
        assert_eq!(
            (
                m.ceiling("a", "k").unwrap(),
                m.ceiling("a", "l").unwrap(),
                m.epoch()
            ),
            (7, 100, 2),
            "a take-over after one part of a trim opens a new epoch"
        );
        m.apply(&[entry(6, trim("k", 8, true)), entry(7, trim("l", 9, false))])
            .unwrap();
        m.apply(&[entry(8, start(3))]).unwrap();
        assert_eq!(
            (
                m.ceiling("a", "k").unwrap(),
                m.ceiling("a", "l").unwrap(),
                m.epoch()
            ),
            (8, 9, 2),
            "a hand-over trimmed in two parts keeps the epoch"
        );
    }

    /// A trim counts only in the term it names: one a deposed leader
    /// proposed, forwarded by raft-rs into the next leader's term, would
    /// lower a ceiling under what that leader handed out.
    #[test]
    fn a_trim_in_another_term_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let start = |term| command::Kind::LeaderStart(LeaderStart { term, node_id: 1 });
        m.apply(&[entry(1, start(1)), entry(2, raise("a", "k", 100))])
            .unwrap();
        let mut forwarded = entry(3, trim("k", 7, false));
        forwarded.term = 2;
        let outcome = m.apply(&[forwarded]).unwrap();
        assert!(matches!(outcome[..], [(_, Applied::Empty)]));
        assert_eq!(m.ceiling("a", "k").unwrap(), 100);
    }

    /// A dense raise of `key` to `ceiling` that answered `request_id`
    /// with the 10 numbers below it.
    fn granted(ns: &str, key: &str, ceiling: u64, request_id: &str) -> command::Kind {
        command::Kind::Raise(RaiseCeilings {
            keys: vec![KeyCeiling {
                namespace: ns.into(),
                key: key.into(),
                ceiling,
            }],
            requests: vec![RequestGrant {
                namespace: ns.into(),
                request_id: request_id.into(),
                items: 7,
                firsts: vec![ceiling - 9],
                counts: vec![10],
                epoch: 0,
            }],
        })
    }

    fn grant_ids(m: &Machine) -> Vec<String> {
        m.request_grants()
            .unwrap()
            .into_iter()
            .map(|g| g.request_id)
            .collect()
    }

    #[test]
    fn request_records_outlive_a_restart_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        m.grant_bounds = (3, 100);
        m.apply(&[
            entry(1, granted("d", "k", 10, "a")),
            entry(2, granted("d", "k", 20, "b")),
        ])
        .unwrap();
        m.apply(&[entry(3, granted("d", "k", 30, "c"))]).unwrap();
        assert_eq!(grant_ids(&m), ["a", "b", "c"]);
        m.apply(&[
            entry(4, granted("d", "k", 40, "d")),
            entry(5, granted("d", "k", 50, "e")),
        ])
        .unwrap();
        assert_eq!(grant_ids(&m), ["c", "d", "e"], "at most 3 records");
        // A replayed entry stores nothing twice.
        m.apply(&[entry(5, granted("d", "k", 50, "e"))]).unwrap();
        assert_eq!(grant_ids(&m), ["c", "d", "e"]);

        drop(m);
        let mut m = Machine::open(db.clone()).unwrap();
        assert_eq!(grant_ids(&m), ["c", "d", "e"], "kept across a restart");
        let g = &m.request_grants().unwrap()[2];
        assert_eq!(
            (g.items, g.firsts.as_slice(), g.counts.as_slice()),
            (7, [41].as_slice(), [10].as_slice())
        );
        // Bounded by ranges too: one per record here, 2 at most.
        m.grant_bounds = (100, 2);
        m.apply(&[entry(6, granted("d", "k", 60, "f"))]).unwrap();
        assert_eq!(grant_ids(&m), ["e", "f"]);
        drop(m);
        let m = Machine::open(db).unwrap();
        assert_eq!(grant_ids(&m), ["e", "f"]);
    }

    /// A request record keeps the epoch its raise applied in, whatever the
    /// proposal said: a retry after a take-over is answered with it, not
    /// with the new epoch (which would hide the holes the take-over left
    /// between those numbers and the new leader's).
    #[test]
    fn a_request_record_keeps_the_epoch_its_raise_applied_in() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let start = |term| command::Kind::LeaderStart(LeaderStart { term, node_id: 1 });
        m.apply(&[entry(1, start(1)), entry(2, start(2))]).unwrap();
        assert_eq!(m.epoch(), 2);
        let mut raise = granted("d", "k", 10, "a");
        if let command::Kind::Raise(r) = &mut raise {
            r.requests[0].epoch = 9;
        }
        let applied = m.apply(&[entry(3, raise), entry(4, start(3))]).unwrap();
        assert_eq!(m.epoch(), 3);
        match &applied[0].1 {
            Applied::Raised(_, requests) => assert_eq!(requests[0].epoch, 2),
            other => panic!("applied {other:?}"),
        }
        drop(m);
        let m = Machine::open(db).unwrap();
        assert_eq!(m.request_grants().unwrap()[0].epoch, 2, "as stored");
    }

    /// A worker id goes only to a node in the configuration as of the
    /// request's entry: one removed after asking (its request committed
    /// after the removal) would hold it forever, as only a removal frees it.
    #[test]
    fn a_worker_id_goes_only_to_a_member() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_conf(&dir, &conf(vec![1, 2, 3], vec![4]));
        let mut m = Machine::open(db.clone()).unwrap();
        let acquire = |node_id| {
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id,
                max_workers: 4,
            })
        };
        let outcomes = m
            .apply(&[
                entry(1, acquire(7)),
                entry(2, acquire(4)),
                entry(3, acquire(2)),
            ])
            .unwrap();
        assert!(matches!(outcomes[0].1, Applied::NotMember { node_id: 7 }));
        assert_eq!(m.worker_of(7).unwrap(), None);
        assert_eq!(m.worker_of(4).unwrap(), Some((0, 0)), "a learner gets one");
        assert_eq!(m.worker_of(2).unwrap(), Some((1, 0)));

        // Node 3 is removed, then its request commits.
        let removal = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: 3,
            ..Default::default()
        };
        let mut cc = Entry {
            index: 4,
            term: 1,
            data: removal.write_to_bytes().unwrap().into(),
            ..Default::default()
        };
        cc.set_entry_type(EntryType::EntryConfChange);
        m.apply_with_conf(&[cc], Some(&conf(vec![1, 2], vec![4])))
            .unwrap();
        let outcomes = m.apply(&[entry(5, acquire(3))]).unwrap();
        assert!(matches!(outcomes[0].1, Applied::NotMember { node_id: 3 }));
        assert_eq!(m.worker_of(3).unwrap(), None);
        // The id it did not take goes to the next member that asks.
        m.apply(&[entry(6, acquire(1))]).unwrap();
        assert_eq!(m.worker_of(1).unwrap(), Some((2, 0)));
    }

    /// A worker's record names the boot whose renewal set its fence: a node
    /// catching up by snapshot tells its own renewal from another's by it.
    #[test]
    fn a_worker_record_names_the_boot_that_set_its_fence() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_conf(&dir, &conf(vec![1, 2, 3], vec![]));
        let mut m = Machine::open(db.clone()).unwrap();
        let renew = |index, fence_ms, boot| {
            entry(
                index,
                command::Kind::RenewFence(RenewFence {
                    node_id: 3,
                    worker: 0,
                    fence_ms,
                    boot,
                }),
            )
        };
        m.apply(&[entry(
            1,
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id: 3,
                max_workers: 4,
            }),
        )])
        .unwrap();
        assert_eq!(m.holding(0).unwrap().1, 0);
        m.apply(&[renew(2, 100, 7)]).unwrap();
        assert_eq!(m.holding(0).unwrap().1, 7);
        // A renewal below the fence (an earlier boot's, late) sets nothing.
        m.apply(&[renew(3, 50, 9)]).unwrap();
        assert_eq!(m.holding(0).unwrap().1, 7);
        m.apply_with_conf(
            &[conf_change(4, ConfChangeType::RemoveNode, 3, "")],
            Some(&conf(vec![1, 2], vec![])),
        )
        .unwrap();
        assert_eq!(m.holding(0).unwrap(), (1, 0), "freed: nobody's renewal");
        // The next holding of the id counts up.
        m.apply(&[entry(
            5,
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id: 1,
                max_workers: 4,
            }),
        )])
        .unwrap();
        assert_eq!(m.worker_of(1).unwrap(), Some((0, 100)));
        assert_eq!(m.holding(0).unwrap(), (2, 0));
        assert_eq!(m.worker_of(3).unwrap(), None);
    }

    /// A conf change raft-rs refused (applied without a configuration)
    /// frees no worker id and records no address; taken, it does both.
    #[test]
    fn a_refused_conf_change_changes_no_member_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_conf(&dir, &conf(vec![1, 2, 3], vec![]));
        let mut m = Machine::open(db.clone()).unwrap();
        m.apply(&[entry(
            1,
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id: 3,
                max_workers: 4,
            }),
        )])
        .unwrap();
        assert_eq!(m.worker_of(3).unwrap(), Some((0, 0)));

        let outcomes = m
            .apply(&[conf_change(2, ConfChangeType::RemoveNode, 3, "")])
            .unwrap();
        assert!(matches!(outcomes[0].1, Applied::ConfChangeRefused(_)));
        m.apply(&[conf_change(3, ConfChangeType::AddLearnerNode, 5, "h:1")])
            .unwrap();
        assert_eq!(m.worker_of(3).unwrap(), Some((0, 0)), "refused: kept");
        assert!(m.members().unwrap().iter().all(|(id, _)| *id != 5));

        let outcomes = m
            .apply_with_conf(
                &[conf_change(4, ConfChangeType::RemoveNode, 3, "")],
                Some(&conf(vec![1, 2], vec![])),
            )
            .unwrap();
        assert!(matches!(outcomes[0].1, Applied::ConfChange(_)));
        m.apply_with_conf(
            &[conf_change(5, ConfChangeType::AddLearnerNode, 5, "h:1")],
            Some(&conf(vec![1, 2], vec![])),
        )
        .unwrap();
        assert_eq!(m.worker_of(3).unwrap(), None, "taken: freed");
        assert!(m.members().unwrap().contains(&(5, "h:1".to_string())));

        // Incarnations: a learner's is its add; a promotion keeps it; a
        // removal ends it and a new add starts another; a snapshot carries
        // them.
        assert_eq!(m.member_since().unwrap(), HashMap::from([(5, 5)]));
        m.apply_with_conf(
            &[conf_change(6, ConfChangeType::AddNode, 5, "h:1")],
            Some(&conf(vec![1, 2, 5], vec![])),
        )
        .unwrap();
        m.apply_with_conf(
            &[conf_change(7, ConfChangeType::AddNode, 6, "h:2")],
            Some(&conf(vec![1, 2, 5, 6], vec![])),
        )
        .unwrap();
        assert_eq!(m.member_since().unwrap(), HashMap::from([(5, 5), (6, 7)]));
        m.apply_with_conf(
            &[conf_change(8, ConfChangeType::RemoveNode, 5, "")],
            Some(&conf(vec![1, 2, 6], vec![])),
        )
        .unwrap();
        m.apply_with_conf(
            &[conf_change(9, ConfChangeType::AddLearnerNode, 5, "h:3")],
            Some(&conf(vec![1, 2, 6], vec![])),
        )
        .unwrap();
        assert_eq!(m.member_since().unwrap(), HashMap::from([(5, 9), (6, 7)]));
        let restored = restored(&db);
        assert_eq!(restored.member_since().unwrap(), m.member_since().unwrap());
        assert_eq!(restored.members().unwrap(), m.members().unwrap());
    }

    /// A data id binds to a member's incarnation once; a removal ends the
    /// binding and the next incarnation gets its own; a snapshot carries it.
    #[test]
    fn a_data_id_binds_once_to_a_members_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_conf(&dir, &conf(vec![1, 2, 3], vec![]));
        let mut m = Machine::open(db.clone()).unwrap();
        let bind = |node_id, since, data_id| {
            command::Kind::BindDataId(BindDataId {
                node_id,
                since,
                data_id,
            })
        };
        let outcomes = m
            .apply(&[
                entry(1, bind(2, 0, 7)),
                entry(2, bind(2, 0, 8)),
                entry(3, bind(9, 0, 5)),
                entry(4, bind(3, 4, 5)),
                entry(5, bind(3, 0, 0)),
            ])
            .unwrap();
        assert!(matches!(
            outcomes[0].1,
            Applied::DataIdBound {
                node_id: 2,
                data_id: 7
            }
        ));
        assert!(
            outcomes[1..]
                .iter()
                .all(|(_, o)| matches!(o, Applied::Empty)),
            "the first stands; not a member; not its incarnation; no id"
        );
        assert_eq!(m.data_ids().unwrap(), HashMap::from([(2, 7)]));

        m.apply_with_conf(
            &[conf_change(6, ConfChangeType::RemoveNode, 2, "h:1")],
            Some(&conf(vec![1, 3], vec![])),
        )
        .unwrap();
        assert_eq!(m.data_ids().unwrap(), HashMap::new());
        let learners = conf(vec![1, 3], vec![2]);
        save_conf(&db, &learners);
        m.apply_with_conf(
            &[conf_change(7, ConfChangeType::AddLearnerNode, 2, "h:1")],
            Some(&learners),
        )
        .unwrap();
        m.apply(&[entry(8, bind(2, 0, 8)), entry(9, bind(2, 7, 9))])
            .unwrap();
        assert_eq!(m.data_ids().unwrap(), HashMap::from([(2, 9)]));

        let restored = restored(&db);
        assert_eq!(restored.data_ids().unwrap(), HashMap::from([(2, 9)]));
        assert_eq!(restored.member_since().unwrap(), HashMap::from([(2, 7)]));
    }

    #[test]
    fn snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let acquire = |node_id| {
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id,
                max_workers: 4,
            })
        };
        m.apply(&[
            entry(1, raise("a", "k1", 10)),
            entry(2, raise("b", "k2", 20)),
            entry(3, acquire(7)),
            entry(4, acquire(8)),
        ])
        .unwrap();
        m.apply(&[entry(5, granted("b", "k2", 30, "id-1"))])
            .unwrap();
        m.apply(&[entry(6, granted("b", "k2", 40, "id-2"))])
            .unwrap();
        assert_eq!(m.worker_of(8).unwrap(), Some((1, 0)));
        let (index, bytes) = read_snapshot(&db, &db.snapshot()).unwrap();
        assert_eq!(index, 6);

        let dir2 = tempfile::tempdir().unwrap();
        let db2 = super::super::open(dir2.path()).unwrap();
        let mut m2 = Machine::open(db2.clone()).unwrap();
        m2.apply(&[entry(1, raise("z", "old", 99))]).unwrap();
        let mut batch = WriteBatch::default();
        write_snapshot(&db2, &mut batch, index, &bytes).unwrap();
        db2.write_batch(batch, false).unwrap();
        m2.reload().unwrap();
        assert_eq!(m2.applied(), 6);
        assert_eq!(m2.ceiling("b", "k2").unwrap(), 40);
        assert_eq!(m2.worker_of(7).unwrap(), Some((0, 0)));
        assert_eq!(
            grant_ids(&m2),
            ["id-1", "id-2"],
            "request records come with the snapshot, in order"
        );
        m2.apply(&[entry(7, granted("b", "k2", 50, "id-3"))])
            .unwrap();
        assert_eq!(grant_ids(&m2), ["id-1", "id-2", "id-3"]);
        let out = m2.apply(&[entry(8, acquire(9))]).unwrap();
        assert_eq!(
            out[0].1,
            Applied::WorkerAssigned {
                node_id: 9,
                worker: 2,
                fence_ms: 0,
                tenure: 1,
            },
            "workers held before the snapshot stay held"
        );
        assert_eq!(m2.ceiling("z", "old").unwrap(), 0, "old state is replaced");
    }

    /// A ceiling encoded from its stored parts is the bytes prost writes
    /// for the `KeyCeiling` as field 2, whatever is empty, zero or long.
    #[test]
    fn ceilings_encode_from_their_parts_as_prost_does() {
        let long = "k".repeat(300);
        for (namespace, key, ceiling) in [
            ("conv", "c-1", 42),
            ("conv", "", 7),
            ("", "x", 0),
            ("ns", long.as_str(), u64::MAX),
            ("ns", "ü-ключ", 1 << 40),
        ] {
            let mut ours = Vec::new();
            encode_ceiling(&mut ours, namespace, key, ceiling);
            let mut prosts = Vec::new();
            prost::encode_length_delimiter(CEILINGS_KEY, &mut prosts).unwrap();
            KeyCeiling {
                namespace: namespace.into(),
                key: key.into(),
                ceiling,
            }
            .encode_length_delimited(&mut prosts)
            .unwrap();
            assert_eq!(ours, prosts, "{namespace:?} {key:?} {ceiling}");
        }
    }

    /// Snapshots encode their key ceilings one at a time, and installs
    /// decode them so: the bytes are still one `SnapshotData`, as builds
    /// before session 31 encoded and decoded it whole, both ways.
    #[test]
    fn snapshots_streamed_key_by_key_read_as_one_message_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::open(dir.path()).unwrap();
        let mut m = Machine::open(db.clone()).unwrap();
        let mut entries: Vec<Entry> = (1..=300)
            .map(|i| {
                entry(
                    i,
                    raise(["a", "b"][i as usize % 2], &format!("k{i}"), i * 7),
                )
            })
            .collect();
        entries.push(entry(
            301,
            command::Kind::AcquireWorker(crate::pb::state::AcquireWorker {
                node_id: 5,
                max_workers: 4,
            }),
        ));
        m.apply(&entries).unwrap();
        m.apply(&[entry(302, granted("a", "k2", 3000, "id-1"))])
            .unwrap();
        let (index, streamed) = read_snapshot(&db, &db.snapshot()).unwrap();

        // An older build decodes it whole, and finds every field.
        let whole = SnapshotData::decode(streamed.as_slice()).unwrap();
        assert_eq!(whole.ceilings.len(), 300);
        assert_eq!(whole.workers.len(), 1);
        assert_eq!(whole.requests.len(), 1);
        assert!(whole.meta.is_some());

        // This build installs what an older one encoded whole (ceilings
        // first), and what it encodes itself, to the same state.
        for (what, bytes) in [
            ("whole", whole.encode_to_vec()),
            ("streamed", streamed.clone()),
        ] {
            let other = tempfile::tempdir().unwrap();
            let db2 = super::super::open(other.path()).unwrap();
            let mut batch = WriteBatch::default();
            write_snapshot(&db2, &mut batch, index, &bytes).unwrap();
            db2.write_batch(batch, false).unwrap();
            let (_, again) = read_snapshot(&db2, &db2.snapshot()).unwrap();
            assert!(again == streamed, "{what}: installed state differs");
            let m2 = Machine::open(db2.clone()).unwrap();
            assert_eq!(m2.ceiling("a", "k300").unwrap(), 2100, "{what}");
            assert_eq!(m2.ceiling("a", "k2").unwrap(), 3000, "{what}");
            assert_eq!(grant_ids(&m2), ["id-1"], "{what}");
        }

        // Cut short, it is refused whole: nothing reaches the database.
        let other = tempfile::tempdir().unwrap();
        let db3 = super::super::open(other.path()).unwrap();
        let mut batch = WriteBatch::default();
        let err = write_snapshot(&db3, &mut batch, index, &streamed[..streamed.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot data"), "{err}");
    }
}
