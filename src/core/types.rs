//! Value types that carry their checks: built once at the edge, trusted after.

use std::fmt;

/// The highest sequence number any key may reach: `i64::MAX`, so Java and Go
/// `int64` clients never see a negative number (I4).
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// Longest accepted namespace name, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// Longest accepted request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Most items accepted in one batch call.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// How a namespace raises ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ceilings are raised ahead of demand by an adaptive step; calls are
    /// answered from memory. A leader crash leaves a hole (announced by the
    /// epoch).
    Segmented,
    /// Each call raises the ceiling by exactly its count and is answered once
    /// that raise commits: numbers are consecutive.
    Dense,
}

/// A namespace's rules, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub name: String,
    pub mode: Mode,
    /// Smallest and largest segment a refill reserves (segmented mode).
    pub step_min: u64,
    pub step_max: u64,
    /// Target time between two refills of one busy key; steps grow when a key
    /// refills faster than this and shrink when it is idle for much longer.
    pub refill_interval_ms: u64,
    /// Largest `count` one call may ask for.
    pub max_count: u32,
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Highest number a key of this namespace may reach (at most
    /// [`MAX_SEQUENCE`]); beyond it calls fail as exhausted.
    pub max_value: u64,
    /// A key unused for this long leaves the leader's memory (0: never),
    /// after its ceiling is lowered through the log to the last number
    /// handed out, so it continues without a hole when it comes back.
    pub forget_idle_ms: u64,
}

/// Index of a namespace in [`Namespaces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(u32);

impl NamespaceId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The configured namespaces, looked up by name at the edge.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    specs: Vec<NamespaceSpec>,
}

impl Namespaces {
    /// Builds the table. Names MUST be unique; configuration validation
    /// guarantees it.
    pub fn new(specs: Vec<NamespaceSpec>) -> Self {
        Self { specs }
    }

    pub fn spec(&self, id: NamespaceId) -> &NamespaceSpec {
        &self.specs[id.index()]
    }

    pub fn iter(&self) -> impl Iterator<Item = (NamespaceId, &NamespaceSpec)> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| (NamespaceId(i as u32), s))
    }

    /// Resolves a namespace name from a request.
    pub fn resolve(&self, name: &str) -> Result<NamespaceId, InvalidArgument> {
        if name.is_empty() {
            return Err(InvalidArgument::EmptyNamespace);
        }
        self.lookup(name)
            .ok_or_else(|| InvalidArgument::UnknownNamespace(truncate(name, MAX_NAMESPACE_BYTES)))
    }

    /// Finds a namespace by name, `None` when it is not configured.
    pub fn lookup(&self, name: &str) -> Option<NamespaceId> {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .map(|i| NamespaceId(i as u32))
    }

    /// Validates a count against the namespace's maximum.
    pub fn check_count(&self, ns: NamespaceId, count: u32) -> Result<u32, InvalidArgument> {
        let max = self.spec(ns).max_count;
        if count == 0 {
            Err(InvalidArgument::ZeroCount)
        } else if count > max {
            Err(InvalidArgument::CountTooLarge { count, max })
        } else {
            Ok(count)
        }
    }
}

/// A validated (namespace, key) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqKey {
    ns: NamespaceId,
    key: KeyText,
}

/// Longest key kept inside [`SeqKey`] itself.
const INLINE_KEY_BYTES: usize = 22;

/// A key's text: inside the value when it is short (most IM keys are:
/// `conv:1234567`), on the heap otherwise. The allocator finds a key by a
/// hash lookup that compares it with the key stored in the table's entry;
/// inline, that comparison reads the entry it has just loaded instead of
/// following a pointer to another cache line. Each text has one form
/// (inline exactly when it fits), and equality, order and hash are those
/// of its bytes, as for `str`: the same key is always the same entry.
#[derive(Clone)]
enum KeyText {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Heap(Box<str>),
}

impl KeyText {
    fn new(text: String) -> Self {
        Self::inline(&text).unwrap_or_else(|| KeyText::Heap(text.into_boxed_str()))
    }

    fn copied(text: &str) -> Self {
        Self::inline(text).unwrap_or_else(|| KeyText::Heap(text.into()))
    }

    fn inline(text: &str) -> Option<Self> {
        (text.len() <= INLINE_KEY_BYTES).then(|| {
            let mut bytes = [0; INLINE_KEY_BYTES];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            KeyText::Inline {
                len: text.len() as u8,
                bytes,
            }
        })
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            KeyText::Inline { len, bytes } => &bytes[..usize::from(*len)],
            KeyText::Heap(text) => text.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            KeyText::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)])
                .expect("inline key bytes are copied from a str, whole"),
            KeyText::Heap(text) => text,
        }
    }
}

impl PartialEq for KeyText {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for KeyText {}

impl PartialOrd for KeyText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyText {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for KeyText {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes: its bytes and an end marker.
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl SeqKey {
    /// Checks the key against its namespace's rules.
    pub fn try_new(
        namespaces: &Namespaces,
        ns: NamespaceId,
        key: impl Into<String>,
    ) -> Result<Self, InvalidArgument> {
        let key = key.into();
        check_key(namespaces, ns, &key)?;
        Ok(Self {
            ns,
            key: KeyText::new(key),
        })
    }

    /// As [`SeqKey::try_new`], copying the text (no allocation for a key
    /// kept inline), for a caller that keeps its own string.
    pub fn try_copy(
        namespaces: &Namespaces,
        ns: NamespaceId,
        key: &str,
    ) -> Result<Self, InvalidArgument> {
        check_key(namespaces, ns, key)?;
        Ok(Self {
            ns,
            key: KeyText::copied(key),
        })
    }

    pub fn namespace(&self) -> NamespaceId {
        self.ns
    }

    pub fn key(&self) -> &str {
        self.key.as_str()
    }

    /// The key's bytes ([`SeqKey::key`]'s, without checking them again).
    pub fn key_bytes(&self) -> &[u8] {
        self.key.as_bytes()
    }
}

fn check_key(namespaces: &Namespaces, ns: NamespaceId, key: &str) -> Result<(), InvalidArgument> {
    let max = namespaces.spec(ns).max_key_bytes;
    if key.is_empty() {
        return Err(InvalidArgument::EmptyKey);
    }
    if key.len() > max {
        return Err(InvalidArgument::KeyTooLong {
            len: key.len(),
            max,
        });
    }
    Ok(())
}

impl fmt::Display for SeqKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns.0, self.key())
    }
}

/// An idempotency token from a client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `Ok(None)` for the empty string (no token).
    pub fn try_new(id: impl Into<String>) -> Result<Option<Self>, InvalidArgument> {
        let id = id.into();
        if id.is_empty() {
            Ok(None)
        } else if id.len() > MAX_REQUEST_ID_BYTES {
            Err(InvalidArgument::RequestIdTooLong {
                len: id.len(),
                max: MAX_REQUEST_ID_BYTES,
            })
        } else {
            Ok(Some(Self(id.into_boxed_str())))
        }
    }
}

/// A contiguous range of sequence numbers `[first, first + count)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    first: u64,
    count: u32,
}

impl SeqRange {
    /// `None` when the range is empty or would pass [`MAX_SEQUENCE`].
    pub fn try_new(first: u64, count: u32) -> Option<Self> {
        let last = first.checked_add(u64::from(count).checked_sub(1)?)?;
        (first >= 1 && last <= MAX_SEQUENCE).then_some(Self { first, count })
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The last number of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.first + u64::from(self.count) - 1
    }
}

/// Bad input from a client (I6). Each message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidArgument {
    #[error("namespace: must not be empty")]
    EmptyNamespace,
    #[error("namespace: unknown namespace {0:?}")]
    UnknownNamespace(String),
    #[error("key: must not be empty")]
    EmptyKey,
    #[error("key: {len} bytes is longer than the namespace's maximum of {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("count: must be at least 1")]
    ZeroCount,
    #[error("count: {count} is above the namespace's maximum of {max}")]
    CountTooLarge { count: u32, max: u32 },
    #[error("request_id: {len} bytes is longer than the maximum of {max}")]
    RequestIdTooLong { len: usize, max: usize },
    #[error("request_id: already used for other keys or counts")]
    RequestIdReused,
    #[error("items: must not be empty")]
    EmptyBatch,
    #[error("items: {len} items is more than the maximum of {max}")]
    TooManyItems { len: usize, max: usize },
    #[error("items[{index}].key: {key:?} appears more than once")]
    DuplicateKey { index: usize, key: String },
    #[error("items[{index}].{source}")]
    Item {
        index: usize,
        source: Box<InvalidArgument>,
    },
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
pub(crate) fn test_spec(name: &str) -> NamespaceSpec {
    NamespaceSpec {
        name: name.to_string(),
        mode: Mode::Segmented,
        step_min: 100,
        step_max: 10_000,
        refill_interval_ms: 1_000,
        max_count: 1_000,
        max_key_bytes: 32,
        max_value: MAX_SEQUENCE,
        forget_idle_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules_name_the_field() {
        let ns = Namespaces::new(vec![test_spec("conv")]);
        let id = ns.resolve("conv").unwrap();
        assert_eq!(
            SeqKey::try_new(&ns, id, "").unwrap_err().to_string(),
            "key: must not be empty"
        );
        assert!(SeqKey::try_new(&ns, id, "x".repeat(33))
            .unwrap_err()
            .to_string()
            .starts_with("key:"));
        assert!(SeqKey::try_new(&ns, id, "x".repeat(32)).is_ok());
        assert_eq!(
            SeqKey::try_copy(&ns, id, "").unwrap_err(),
            InvalidArgument::EmptyKey
        );
        assert_eq!(
            SeqKey::try_copy(&ns, id, &"x".repeat(33)).unwrap_err(),
            InvalidArgument::KeyTooLong { len: 33, max: 32 }
        );
        assert_eq!(
            ns.resolve("nope").unwrap_err(),
            InvalidArgument::UnknownNamespace("nope".into())
        );
        assert_eq!(ns.check_count(id, 0), Err(InvalidArgument::ZeroCount));
        assert!(ns.check_count(id, 1001).is_err());
        assert_eq!(ns.check_count(id, 1000), Ok(1000));
    }

    fn hash_of(k: &SeqKey) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(k)
    }

    /// Short keys are kept inline and long ones on the heap, and either way
    /// a key is equal to, hashes as and orders as its text: one key, one
    /// entry in the allocator's table, in the order of its text.
    #[test]
    fn keys_compare_hash_and_order_as_their_text_inline_or_not() {
        let mut spec = test_spec("conv");
        spec.max_key_bytes = 64;
        let ns = Namespaces::new(vec![spec]);
        let id = ns.resolve("conv").unwrap();
        let key = |text: &str| SeqKey::try_new(&ns, id, text).unwrap();
        // Around the inline limit, in bytes: multi-byte characters too.
        let mut texts: Vec<String> = (1..=40).map(|n| "k".repeat(n)).collect();
        texts.push(format!("{}é", "a".repeat(INLINE_KEY_BYTES - 2)));
        texts.push(format!("{}é", "a".repeat(INLINE_KEY_BYTES - 1)));
        texts.push(format!("{}\0", "a".repeat(INLINE_KEY_BYTES - 1)));
        texts.push("a".repeat(INLINE_KEY_BYTES - 1));
        texts.push("b".into());
        for t in &texts {
            // Built from an owned string and copied from a borrowed one:
            // one key either way.
            let (a, b) = (key(t), SeqKey::try_copy(&ns, id, t).unwrap());
            assert_eq!(a.key(), t);
            assert_eq!(b.key(), t);
            assert_eq!(a, b);
            assert_eq!(hash_of(&a), hash_of(&b));
            assert_eq!(
                format!("{a:?}"),
                format!("SeqKey {{ ns: {id:?}, key: {t:?} }}")
            );
            for u in &texts {
                assert_eq!(
                    key(t).cmp(&key(u)),
                    t.as_str().cmp(u.as_str()),
                    "{t:?} {u:?}"
                );
                assert_eq!(key(t) == key(u), t == u, "{t:?} {u:?}");
            }
        }
        let inline = |k: &SeqKey| matches!(k.key, KeyText::Inline { .. });
        assert!(inline(&key(&"k".repeat(INLINE_KEY_BYTES))));
        assert!(!inline(&key(&"k".repeat(INLINE_KEY_BYTES + 1))));
        let copied = |t: &str| SeqKey::try_copy(&ns, id, t).unwrap();
        assert!(inline(&copied(&"k".repeat(INLINE_KEY_BYTES))));
        assert!(!inline(&copied(&"k".repeat(INLINE_KEY_BYTES + 1))));
        assert!(!inline(&key(&format!(
            "{}é",
            "a".repeat(INLINE_KEY_BYTES - 1)
        ))));
    }

    #[test]
    fn ranges_never_pass_the_ceiling() {
        assert!(SeqRange::try_new(MAX_SEQUENCE, 1).is_some());
        assert!(SeqRange::try_new(MAX_SEQUENCE, 2).is_none());
        assert!(SeqRange::try_new(0, 1).is_none());
        assert!(SeqRange::try_new(5, 0).is_none());
        assert_eq!(SeqRange::try_new(5, 3).unwrap().last(), 7);
    }
}
