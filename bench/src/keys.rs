//! Key choice: uniform or Zipf over `keys` keys, from a seeded RNG so two
//! runs (and every target in one run) see the same key sequence per caller.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// How keys are drawn; shared by all callers of a run.
#[derive(Debug, Clone)]
pub enum KeyDist {
    Uniform {
        keys: u64,
    },
    /// Cumulative probabilities of ranks 1..=keys; rank r has weight 1/r^s.
    /// Precomputed once so a draw is one binary search.
    Zipf {
        cdf: Arc<Vec<f64>>,
    },
    /// Every key in turn: caller `first` of `step` callers takes keys
    /// first, first + step, ... (wrapping), so together they touch each key
    /// once per `keys` calls (used to prime a target).
    Stride {
        keys: u64,
        first: u64,
        step: u64,
    },
}

impl KeyDist {
    pub fn uniform(keys: u64) -> Self {
        Self::Uniform { keys }
    }

    pub fn zipf(keys: u64, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(keys as usize);
        let mut sum = 0.0;
        for rank in 1..=keys {
            sum += (rank as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        // Rounding may leave the last entry a hair under 1.0; a draw of
        // u in [0, 1) must always find an index.
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Self::Zipf { cdf: Arc::new(cdf) }
    }

    fn len(&self) -> u64 {
        match self {
            Self::Uniform { keys } | Self::Stride { keys, .. } => *keys,
            Self::Zipf { cdf } => cdf.len() as u64,
        }
    }
}

/// One caller's key source.
pub struct KeyPicker {
    dist: KeyDist,
    rng: SmallRng,
    /// Keys taken so far (for Stride).
    taken: u64,
}

impl KeyPicker {
    pub fn new(dist: KeyDist, seed: u64) -> Self {
        Self {
            dist,
            rng: SmallRng::seed_from_u64(seed),
            taken: 0,
        }
    }

    /// A key index in `0..keys`; with Zipf, index 0 is the most popular.
    pub fn index(&mut self) -> u64 {
        match &self.dist {
            KeyDist::Uniform { keys } => self.rng.random_range(0..*keys),
            KeyDist::Zipf { cdf } => {
                let u: f64 = self.rng.random();
                cdf.partition_point(|&c| c <= u) as u64
            }
            KeyDist::Stride { keys, first, step } => {
                let i = (first + self.taken * step) % keys;
                self.taken += 1;
                i
            }
        }
    }

    /// A key name, the same for every target.
    pub fn key(&mut self) -> String {
        key_name(self.index())
    }

    /// `n` distinct keys (n <= keys, checked by the CLI). Redraws repeats:
    /// with Zipf the head keys come up often, but a batch is small next to
    /// the key space, so this ends quickly.
    pub fn distinct_keys(&mut self, n: usize) -> Vec<String> {
        debug_assert!(n as u64 <= self.dist.len());
        // foldhash, and `key_name` without `format!`: this runs in the
        // load generator for every batch call of every target, and with
        // SipHash and `format!` it was 6-9 % of the generator's CPU in
        // `NextBatch ×50` (CPU the targets on the same cores then lack).
        let mut seen = foldhash::HashSet::with_capacity_and_hasher(n, Default::default());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let i = self.index();
            if seen.insert(i) {
                out.push(key_name(i));
            }
        }
        out
    }
}

/// `k` and the index in decimal.
pub fn key_name(index: u64) -> String {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = index;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut name = String::with_capacity(1 + digits.len() - start);
    name.push('k');
    for &d in &digits[start..] {
        name.push(char::from(d));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_cover_every_key_once() {
        let (keys, callers) = (10, 3);
        let mut seen = vec![0; keys as usize];
        for c in 0..callers {
            let dist = KeyDist::Stride {
                keys,
                first: c,
                step: callers,
            };
            let mut p = KeyPicker::new(dist, 0);
            for _ in 0..keys.div_ceil(callers) {
                seen[p.index() as usize] += 1;
            }
        }
        // 3 callers x 4 calls = 12 calls over 10 keys: each key at least
        // once, two of them twice (the wrap).
        assert!(seen.iter().all(|&n| n >= 1), "{seen:?}");
        assert_eq!(seen.iter().sum::<u32>(), 12);
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut p = KeyPicker::new(KeyDist::uniform(7), 3);
        for _ in 0..10_000 {
            assert!(p.index() < 7);
        }
    }

    #[test]
    fn zipf_cdf_is_monotone_and_ends_at_one() {
        let KeyDist::Zipf { cdf } = KeyDist::zipf(1000, 1.0) else {
            unreachable!()
        };
        assert!(cdf.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*cdf.last().unwrap(), 1.0);
    }

    #[test]
    fn zipf_favours_low_ranks_as_expected() {
        // s = 1, 100 keys: P(rank 1) = 1 / H(100) ~ 0.193, P(rank 2) ~ 0.096.
        let mut p = KeyPicker::new(KeyDist::zipf(100, 1.0), 42);
        let n = 200_000;
        let mut counts = [0u32; 100];
        for _ in 0..n {
            counts[p.index() as usize] += 1;
        }
        let f0 = f64::from(counts[0]) / n as f64;
        let f1 = f64::from(counts[1]) / n as f64;
        assert!((f0 - 0.1928).abs() < 0.01, "rank 1 frequency {f0}");
        assert!((f1 - 0.0964).abs() < 0.01, "rank 2 frequency {f1}");
        assert!(counts[99] > 0);
    }

    #[test]
    fn same_seed_same_keys() {
        let mut a = KeyPicker::new(KeyDist::zipf(50, 1.2), 9);
        let mut b = KeyPicker::new(KeyDist::zipf(50, 1.2), 9);
        for _ in 0..100 {
            assert_eq!(a.index(), b.index());
        }
    }

    #[test]
    fn key_names_are_k_and_the_decimal_index() {
        for i in [0, 7, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(key_name(i), format!("k{i}"));
        }
    }

    #[test]
    fn distinct_keys_are_distinct() {
        let mut p = KeyPicker::new(KeyDist::zipf(60, 1.0), 1);
        let keys = p.distinct_keys(50);
        let set: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), 50);
    }
}
