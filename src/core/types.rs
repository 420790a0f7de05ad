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
    key: Box<str>,
}

impl SeqKey {
    /// Checks the key against its namespace's rules.
    pub fn try_new(
        namespaces: &Namespaces,
        ns: NamespaceId,
        key: impl Into<String>,
    ) -> Result<Self, InvalidArgument> {
        let key = key.into();
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
        Ok(Self {
            ns,
            key: key.into_boxed_str(),
        })
    }

    pub fn namespace(&self) -> NamespaceId {
        self.ns
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for SeqKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns.0, self.key)
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
            ns.resolve("nope").unwrap_err(),
            InvalidArgument::UnknownNamespace("nope".into())
        );
        assert_eq!(ns.check_count(id, 0), Err(InvalidArgument::ZeroCount));
        assert!(ns.check_count(id, 1001).is_err());
        assert_eq!(ns.check_count(id, 1000), Ok(1000));
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
