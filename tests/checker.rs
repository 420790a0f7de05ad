//! The history checker used by the cluster tests must catch violations,
//! or the tests that rely on it prove nothing.

mod common;

use std::time::{Duration, Instant};

use common::{check_dense, check_history, Op};

fn op(key: &str, start_ms: u64, end_ms: u64, first: u64, last: u64, t0: Instant) -> Op {
    Op {
        key: key.into(),
        invoked: t0 + Duration::from_millis(start_ms),
        completed: t0 + Duration::from_millis(end_ms),
        first,
        last,
        epoch: 1,
        replayed: false,
    }
}

#[test]
fn accepts_a_valid_history() {
    let t0 = Instant::now();
    let ops = vec![
        op("a", 0, 10, 1, 2, t0),
        // Concurrent with the first: any order is fine.
        op("a", 5, 8, 5, 5, t0),
        op("a", 11, 12, 6, 6, t0),
        op("b", 0, 1, 1, 1, t0),
    ];
    assert_eq!(check_history(&ops), 5);
}

#[test]
#[should_panic(expected = "I1 violated")]
fn catches_a_duplicate() {
    let t0 = Instant::now();
    check_history(&[op("a", 0, 1, 1, 3, t0), op("a", 0, 1, 3, 4, t0)]);
}

#[test]
#[should_panic(expected = "I2 violated")]
fn catches_a_stale_read_across_leaders() {
    let t0 = Instant::now();
    // The second call started after the first returned, yet got a smaller
    // number: what a deposed leader would do.
    check_history(&[op("a", 0, 1, 10, 10, t0), op("a", 2, 3, 5, 5, t0)]);
}

#[test]
fn accepts_consecutive_dense_numbers() {
    let t0 = Instant::now();
    let ops = vec![
        op("a", 0, 1, 3, 4, t0),
        op("a", 0, 1, 1, 2, t0),
        op("b", 0, 1, 1, 1, t0),
    ];
    assert_eq!(check_dense(&ops), 5);
}

#[test]
#[should_panic(expected = "dense key a skips or repeats")]
fn catches_a_dense_hole() {
    let t0 = Instant::now();
    check_dense(&[op("a", 0, 1, 1, 2, t0), op("a", 2, 3, 4, 4, t0)]);
}

#[test]
#[should_panic(expected = "dense key a skips or repeats")]
fn catches_a_dense_key_that_does_not_start_at_one() {
    let t0 = Instant::now();
    check_dense(&[op("a", 0, 1, 2, 2, t0)]);
}
