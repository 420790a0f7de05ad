//! The leader's key map: an insertion-ordered hash map kept in shards, so
//! that no single insert moves the whole map.
//!
//! A hash table grows by doubling: the insert that fills it allocates one
//! twice the size and moves every entry. One map of every active key held
//! the node loop for that move, and at millions of keys the move outlasted
//! the election timeout: filling ten million keys, the leader stalled 0.46 s
//! at 3.67 million keys and 0.93 s at 7.34 million (`cargo bench --bench
//! memory`), and its followers elected another leader each time, which
//! started again from an empty map. In 256 shards, chosen by the key's hash,
//! each shard grows on its own and a growth moves a 256th of the keys.
//!
//! Entries are found by a handle (shard and position in it), valid until
//! the next removal, as an `IndexMap`'s index is; the idle sweep walks the
//! handles in order, a slice at a time.

use std::hash::{BuildHasher, Hash};
use std::ops::{Index, IndexMut};

use indexmap::map::raw_entry_v1::{RawEntryApiV1, RawEntryMut};
use indexmap::IndexMap;

type Hasher = foldhash::quality::RandomState;

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;
/// A key's shard is these bits of its hash, which no shard's own table
/// reads: hashbrown takes a bucket from the low bits (fewer than 48 for any
/// table that fits in memory) and a tag from the top seven.
const SHARD_SHIFT: u32 = 48;
/// A handle is its shard's number above this many bits of position.
const POSITION_BITS: u32 = 40;
// Handles pack a shard and a position into a `usize`: on a narrower one
// they would wrap, and a handle could name another key's state.
const _: () = assert!(usize::BITS >= POSITION_BITS + SHARD_BITS);

pub struct KeyMap<K, V> {
    /// Every shard hashes with the same hasher (clones of one seed), so a
    /// hash taken here finds its key in the shard.
    shards: Vec<IndexMap<K, V, Hasher>>,
    hasher: Hasher,
    len: usize,
}

impl<K, V> Default for KeyMap<K, V> {
    fn default() -> Self {
        let hasher = Hasher::default();
        Self {
            shards: (0..SHARDS)
                .map(|_| IndexMap::with_hasher(hasher.clone()))
                .collect(),
            hasher,
            len: 0,
        }
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for KeyMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.shards.iter().flat_map(IndexMap::iter))
            .finish()
    }
}

fn handle(shard: usize, position: usize) -> usize {
    debug_assert!(position < 1 << POSITION_BITS);
    shard << POSITION_BITS | position
}

fn parts(handle: usize) -> (usize, usize) {
    (handle >> POSITION_BITS, handle & ((1 << POSITION_BITS) - 1))
}

fn shard_of(hash: u64) -> usize {
    (hash >> SHARD_SHIFT) as usize & (SHARDS - 1)
}

impl<K: Hash + Eq, V> KeyMap<K, V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash [`KeyMap::find`] takes.
    pub fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The handle of `key`, whose hash is `hash`.
    pub fn find(&self, hash: u64, key: &K) -> Option<usize> {
        let shard = shard_of(hash);
        self.shards[shard]
            .raw_entry_v1()
            .index_from_hash(hash, |k| k == key)
            .map(|position| handle(shard, position))
    }

    /// Inserts a key that is not in the map; its handle.
    pub fn insert_new(&mut self, key: K, value: V) -> usize {
        let hash = self.hash(&key);
        let shard = shard_of(hash);
        let map = &mut self.shards[shard];
        let position = map.len();
        match map.raw_entry_mut_v1().from_key_hashed_nocheck(hash, &key) {
            RawEntryMut::Vacant(entry) => {
                entry.insert_hashed_nocheck(hash, key, value);
                self.len += 1;
            }
            // Not for a key already held (the allocator looks first); it
            // would keep its handle, with the new value.
            RawEntryMut::Occupied(mut entry) => {
                entry.insert(value);
                return handle(shard, entry.index());
            }
        }
        handle(shard, position)
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let hash = self.hash(key);
        self.shards[shard_of(hash)]
            .raw_entry_v1()
            .from_key_hashed_nocheck(hash, key)
            .map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let hash = self.hash(key);
        match self.shards[shard_of(hash)]
            .raw_entry_mut_v1()
            .from_key_hashed_nocheck(hash, key)
        {
            RawEntryMut::Occupied(entry) => Some(entry.into_mut()),
            RawEntryMut::Vacant(_) => None,
        }
    }

    /// Removes `key`; the last entry of its shard takes its handle.
    pub fn swap_remove(&mut self, key: &K) -> Option<V> {
        let hash = self.hash(key);
        let removed = self.shards[shard_of(hash)].swap_remove(key);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// The entry at `handle`, if there is one.
    pub fn get_at_mut(&mut self, handle: usize) -> Option<(&K, &mut V)> {
        let (shard, position) = parts(handle);
        self.shards.get_mut(shard)?.get_index_mut(position)
    }

    /// Removes the entry at `handle`; the last entry of its shard takes
    /// the handle. Removing several: highest handle first, so that none
    /// moves an entry still to be removed.
    pub fn swap_remove_at(&mut self, handle: usize) -> Option<(K, V)> {
        let (shard, position) = parts(handle);
        let removed = self.shards.get_mut(shard)?.swap_remove_index(position);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// The handle at `cursor` or the next one after it, wrapping around
    /// after the last; moves `cursor` past it. `len()` calls from any
    /// cursor, with nothing removed meanwhile, visit every entry once.
    pub fn next_from(&self, cursor: &mut usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let (mut shard, mut position) = parts(*cursor);
        loop {
            if shard >= SHARDS {
                (shard, position) = (0, 0);
            }
            if position < self.shards[shard].len() {
                *cursor = handle(shard, position + 1);
                return Some(handle(shard, position));
            }
            (shard, position) = (shard + 1, 0);
        }
    }

    pub fn clear(&mut self) {
        for shard in &mut self.shards {
            shard.clear();
        }
        self.len = 0;
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for shard in &mut self.shards {
            shard.retain(&mut keep);
        }
        self.len = self.shards.iter().map(IndexMap::len).sum();
    }

    /// Every entry: each shard's in its insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(IndexMap::iter)
    }
}

impl<K, V> Index<usize> for KeyMap<K, V> {
    type Output = V;

    fn index(&self, handle: usize) -> &V {
        let (shard, position) = parts(handle);
        &self.shards[shard][position]
    }
}

impl<K, V> IndexMut<usize> for KeyMap<K, V> {
    fn index_mut(&mut self, handle: usize) -> &mut V {
        let (shard, position) = parts(handle);
        &mut self.shards[shard][position]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Against a `HashMap`, through inserts, lookups by key and by hash,
    /// removals by key and by handle: the same entries, `len` kept, and a
    /// handle found for a key reads that key's value.
    #[test]
    fn holds_what_a_hash_map_holds() {
        let mut map = KeyMap::default();
        let mut model = HashMap::new();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 5_000;
            match step % 5 {
                0 | 1 => {
                    let hash = map.hash(&key);
                    match map.find(hash, &key) {
                        Some(h) => map[h] += 1,
                        None => {
                            let h = map.insert_new(key, 1);
                            assert_eq!(map.find(hash, &key), Some(h));
                        }
                    }
                    *model.entry(key).or_insert(0) += 1;
                }
                2 => assert_eq!(map.swap_remove(&key), model.remove(&key)),
                3 => {
                    if let Some(v) = map.get_mut(&key) {
                        *v += 10;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 10;
                    }
                }
                _ => {
                    let hash = map.hash(&key);
                    if let Some(h) = map.find(hash, &key) {
                        let (k, _) = map.swap_remove_at(h).unwrap();
                        assert_eq!(k, key);
                        model.remove(&key);
                    }
                }
            }
            assert_eq!(map.len(), model.len());
        }
        let held: HashMap<u64, u64> = map.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(held, model);
        for (k, v) in &model {
            assert_eq!(map.get(k), Some(v));
        }
        map.retain(|k, _| k % 2 == 0);
        model.retain(|k, _| k % 2 == 0);
        assert_eq!(map.len(), model.len());
        map.clear();
        assert!(map.is_empty() && map.iter().next().is_none());
    }

    /// The keys spread over the shards: no shard holds more than twice
    /// its share.
    #[test]
    fn keys_spread_over_the_shards() {
        let mut map = KeyMap::default();
        for k in 0..256_000u64 {
            map.insert_new(format!("conv:{k}"), ());
        }
        let largest = map.shards.iter().map(IndexMap::len).max().unwrap();
        assert!(largest < 2_000, "a shard holds {largest} of 256,000 keys");
    }

    /// From any cursor, `len()` steps visit every entry once, skipping
    /// empty shards and wrapping around; removing the visited entries,
    /// highest handle first, removes exactly them.
    #[test]
    fn a_walk_visits_every_entry_once_from_anywhere() {
        let mut map = KeyMap::default();
        for k in 0..1_000u64 {
            map.insert_new(k, k);
        }
        let mut cursor = 0;
        for start in [0, 17, 999] {
            for _ in 0..start {
                map.next_from(&mut cursor);
            }
            let mut seen = HashSet::new();
            for _ in 0..map.len() {
                let h = map.next_from(&mut cursor).unwrap();
                let (k, _) = map.get_at_mut(h).unwrap();
                assert!(seen.insert(*k), "{k} visited twice");
            }
            assert_eq!(seen.len(), 1_000);
        }
        let mut odd: Vec<usize> = Vec::new();
        let mut cursor = 0;
        for _ in 0..map.len() {
            let h = map.next_from(&mut cursor).unwrap();
            if map[h] % 2 == 1 {
                odd.push(h);
            }
        }
        odd.sort_unstable_by(|a, b| b.cmp(a));
        for h in odd {
            let (k, _) = map.swap_remove_at(h).unwrap();
            assert_eq!(k % 2, 1);
        }
        assert_eq!(map.len(), 500);
        assert!(map.iter().all(|(k, _)| k % 2 == 0));
        let mut empty: KeyMap<u64, u64> = KeyMap::default();
        assert_eq!(empty.next_from(&mut cursor), None);
        assert!(empty.get_at_mut(0).is_none());
    }
}
