//! A client drops its connection to a node that stops answering without
//! closing it (`ClientOptions::keepalive_interval`), and connects afresh
//! once the node answers again.
//!
//! A real node is stopped with SIGSTOP: its kernel still acknowledges what
//! the client sends, so TCP alone would keep the connection, and every
//! stream an attempt timed out on, for as long as the node stays stopped.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Cluster;
use seqd::client::ClientOptions;

/// Local ports of this machine's established TCP connections to `port`
/// (IPv4, `/proc/net/tcp`: `local rem st ...`, addresses as hex
/// `ADDR:PORT`, state 01 ESTABLISHED).
fn connections_to(port: u16) -> HashSet<u16> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            (port_of(remote) == Some(port) && *state == "01")
                .then(|| port_of(local))
                .flatten()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_drops_the_connection_of_a_node_that_stopped_answering() {
    let mut c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let opts = ClientOptions {
        attempt_timeout: Duration::from_millis(300),
        overall_timeout: Duration::from_millis(600),
        ..ClientOptions::default()
    };
    let (interval, timeout) = (opts.keepalive_interval, opts.keepalive_timeout);
    let client = c.client_with(opts);
    assert_eq!(client.next("conv", "k", 1).await.unwrap().first, 1);
    let port: u16 = c.node(1).addr.rsplit(':').next().unwrap().parse().unwrap();
    let first = connections_to(port);
    assert!(!first.is_empty(), "the client's connection to the node");

    c.pause(1).await;
    let stopped = Instant::now();
    // Calls keep failing while the node is stopped; an attempt that times
    // out leaves its stream behind on the connection (the next opens
    // another), and the open streams keep the connection PINGed.
    let within = interval + timeout + Duration::from_secs(5);
    loop {
        let call = client.next("conv", "k", 1).await;
        assert!(call.is_err(), "a stopped node answered: {call:?}");
        let still: Vec<u16> = connections_to(port).intersection(&first).copied().collect();
        if still.is_empty() {
            break;
        }
        assert!(
            stopped.elapsed() < within,
            "{:?} after the node stopped, the client still holds its connection \
             (local ports {still:?}); PINGs every {interval:?} should drop it \
             {timeout:?} after one goes unanswered",
            stopped.elapsed(),
        );
    }
    let dropped_after = stopped.elapsed();

    c.resume(1);
    let resumed = Instant::now();
    let answer = loop {
        match client.next("conv", "k", 1).await {
            Ok(a) => break a,
            Err(e) => assert!(
                resumed.elapsed() < Duration::from_secs(10),
                "no answer 10 s after the node resumed: {e}"
            ),
        }
    };
    assert!(answer.first > 1, "the key goes on: {answer:?}");
    eprintln!("connection dropped {dropped_after:?} after the node stopped");
}
