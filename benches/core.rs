//! Micro-benchmarks of the hot paths: a segmented `Next` answered from
//! memory, a 100-member group fan-out, Snowflake issuing, and a request's
//! decode + check and its reply's encode (what the service does per call
//! besides waiting for the node).

mod common;

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message as _;
use seqd::core::{
    Allocation, Allocator, CeilingSource, Issuer, Layout, Namespaces, SeqKey, SeqRange,
};
use seqd::pb::{BatchItem, NextBatchRequest, NextRequest, NextResponse};
use seqd::raft::Grant;
use seqd::service::sequencer::{
    batch_response, decode_next_batch, parse_next, parse_next_batch, read_batch, BatchCall,
};

use common::namespaces;

/// Applied ceilings, as the state machine would report them.
#[derive(Default)]
struct Applied(HashMap<SeqKey, u64>);

impl CeilingSource for Applied {
    fn committed_ceiling(&self, key: &SeqKey) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

/// Allocates, applying refills at once, as a leader with a fast log would.
fn run(a: &mut Allocator, db: &mut Applied, items: &[(SeqKey, u32)], now: u64) {
    loop {
        match a.allocate(items, db) {
            Ok(Allocation::Granted(r)) => {
                black_box(r);
                break;
            }
            Ok(Allocation::Wait) | Ok(Allocation::Reserved(_)) => {}
            Err(e) => panic!("{e}"),
        }
        apply(a, db, now);
    }
    apply(a, db, now);
}

fn apply(a: &mut Allocator, db: &mut Applied, now: u64) {
    for r in a.take_raises(now) {
        db.0.insert(r.key.clone(), r.ceiling);
        a.on_ceiling_applied(&r.key, r.ceiling);
    }
}

/// An allocator leading term 1 and serving.
fn serving(ns: &Namespaces) -> Allocator {
    let mut a = Allocator::new(ns.clone());
    a.become_leader(1);
    a.start_serving(1);
    a
}

fn bench(c: &mut Criterion) {
    let ns = namespaces();
    let id = ns.resolve("conv").unwrap();
    let keys: Vec<SeqKey> = (0..10_000)
        .map(|i| SeqKey::try_new(&ns, id, format!("conv:{i}")).unwrap())
        .collect();

    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    g.bench_function("next_hot_key", |b| {
        let mut a = serving(&ns);
        let mut db = Applied::default();
        let items = [(keys[0].clone(), 1)];
        let mut now = 0;
        b.iter(|| {
            now += 1;
            run(&mut a, &mut db, &items, now / 1000)
        });
    });
    g.bench_function("next_10k_keys", |b| {
        let mut a = serving(&ns);
        let mut db = Applied::default();
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let items = [(keys[i % keys.len()].clone(), 1)];
            run(&mut a, &mut db, &items, (i / 1000) as u64)
        });
    });
    // Calls coalesced into one batch, on keys spread over a million in
    // memory: the map is far larger than the caches, so each key's lookup
    // misses them (as on a node holding a million conversations).
    g.throughput(Throughput::Elements(16));
    g.bench_function("batch_of_16_among_1m_keys", |b| {
        let mut a = serving(&ns);
        let mut db = Applied::default();
        // `cargo test` runs each benchmark once (without `--bench`) only
        // to see that it works: a smaller map spares the test suite the
        // million keys' set-up (~15 s in a debug build).
        let n = if std::env::args().any(|a| a == "--bench") {
            1_000_000
        } else {
            10_000
        };
        let many: Vec<SeqKey> = (0..n)
            .map(|i| SeqKey::try_new(&ns, id, format!("conv:{i}")).unwrap())
            .collect();
        for key in &many {
            run(&mut a, &mut db, &[(key.clone(), 1)], 0);
        }
        // A fixed pseudo-random walk (an LCG), the same for every build:
        // as many keys drawn as the map holds, so the batches touch most of
        // it. (Until session 40, 4,096 batches: 65,536 keys, a few MB that
        // the host's L3 may hold, so the figures of sessions 29-39 may
        // understate a miss.)
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let batches: Vec<Vec<(SeqKey, u32)>> = (0..n / 16)
            .map(|_| {
                let mut batch: Vec<(SeqKey, u32)> = Vec::with_capacity(16);
                while batch.len() < 16 {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let key = &many[(x >> 33) as usize % many.len()];
                    if batch.iter().all(|(k, _)| k != key) {
                        batch.push((key.clone(), 1));
                    }
                }
                batch
            })
            .collect();
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            run(
                &mut a,
                &mut db,
                &batches[i % batches.len()],
                (i / 100) as u64,
            )
        });
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("next_batch_100_members", |b| {
        let mut a = serving(&ns);
        let mut db = Applied::default();
        let items: Vec<(SeqKey, u32)> = keys[..100].iter().map(|k| (k.clone(), 1)).collect();
        let mut now = 0;
        b.iter(|| {
            now += 1;
            run(&mut a, &mut db, &items, now / 100)
        });
    });
    g.finish();

    // Snowflake: one call per millisecond of 4,096 IDs (the layout's limit
    // per worker). IDs/s here is an upper bound for one node's issuing.
    let layout = Layout::try_new(1_704_067_200_000, 41, 10, 12).unwrap();
    let mut g = c.benchmark_group("snowflake");
    for batch in [1u64, 64, 4096] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(format!("issue_{batch}"), |b| {
            let start = 1_800_000_000_000u64;
            let mut issuer = Issuer::new(layout, 1_000, 3_000);
            issuer.assign_worker(1, 0);
            issuer.own_fence(u64::MAX / 2);
            let mut out = Vec::with_capacity(batch as usize);
            let mut issued = 0u64;
            b.iter(|| {
                // The wall clock advances one ms per 4,096 IDs.
                let now = start + issued / 4096;
                out.clear();
                issuer.issue(now, now - start, batch, &mut out).unwrap();
                issued += batch;
                black_box(&out);
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let next = NextRequest {
        namespace: "conv".into(),
        key: "conv:1234567".into(),
        count: 1,
        request_id: String::new(),
    }
    .encode_to_vec();
    g.bench_function("next_request_decode_check", |b| {
        b.iter(|| {
            let req = NextRequest::decode(black_box(next.as_slice())).unwrap();
            black_box(parse_next(&ns, req).unwrap());
        });
    });
    g.bench_function("next_response_encode", |b| {
        let mut buf = Vec::with_capacity(64);
        b.iter(|| {
            buf.clear();
            NextResponse {
                first: black_box(1_234_567),
                count: 1,
                epoch: 3,
                replayed: false,
            }
            .encode(&mut buf)
            .unwrap();
            black_box(&buf);
        });
    });
    let batch = NextBatchRequest {
        namespace: "conv".into(),
        items: (0..100)
            .map(|i| BatchItem {
                key: format!("conv:{i}"),
                count: 1,
            })
            .collect(),
        request_id: String::new(),
    }
    .encode_to_vec();
    g.throughput(Throughput::Elements(100));
    // The unary RPC's decode (its codec's, which holds no more items than
    // a batch may have) and check.
    g.bench_function("next_batch_100_decode_check", |b| {
        b.iter(|| {
            let req = decode_next_batch(black_box(batch.as_slice())).unwrap();
            black_box(parse_next_batch(&ns, req).unwrap());
        });
    });
    // A batch's work on the node outside the allocator: decode, check,
    // answer with every key as sent, encode.
    let grant = Grant {
        ranges: (0..100)
            .map(|i| SeqRange::try_new(1_000 + i, 1).unwrap())
            .collect(),
        epoch: 3,
        replayed: false,
    };
    let mut out = Vec::with_capacity(4096);
    g.bench_function("next_batch_100_decode_check_answer_encode", |b| {
        b.iter(|| {
            let req = decode_next_batch(black_box(batch.as_slice())).unwrap();
            let BatchCall { items, keys } = parse_next_batch(&ns, req).unwrap();
            black_box(&items);
            out.clear();
            batch_response(keys, &grant).encode(&mut out).unwrap();
            black_box(&out);
        });
    });
    // The same batch on a `NextStream`, read from its bytes, from the
    // seqd client (which takes its ranges packed, without keys).
    g.bench_function("stream_batch_100_read_check", |b| {
        b.iter(|| black_box(read_batch(&ns, black_box(batch.as_slice()), false).unwrap()));
    });
    // And answered: packed, for the seqd client; as ranges naming their
    // keys, for another client.
    for (name, echo_keys) in [
        ("stream_batch_100_read_check_answer_encode", false),
        ("stream_batch_100_read_check_answer_encode_keys", true),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let (_, BatchCall { items, keys }) =
                    read_batch(&ns, black_box(batch.as_slice()), echo_keys).unwrap();
                black_box(&items);
                out.clear();
                batch_response(keys, &grant).encode(&mut out).unwrap();
                black_box(&out);
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
