//! Free loopback ports for processes started by tests and benchmarks.
//! (Also compiled into the seqd package's integration tests, by path.)

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out, where the kernel's ephemeral range leaves room.
const LOWEST: u32 = 10_000;

/// `n` distinct TCP ports on 127.0.0.1, free now and below the kernel's
/// ephemeral range. A port from that range (what binding port 0 gives)
/// can be taken, between this check and the child's bind, by any outgoing
/// connection: a node connecting to its peers while another node is still
/// starting. The kernel never picks a port below the range for a
/// connection, so only a program binding that very port can take it.
/// The listeners stay open until all `n` are picked, and ports are tried
/// in turn from a random start, so one process does not hand the same
/// port out twice while others remain.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(65_536);
    let low = LOWEST.min(first_ephemeral / 2).max(1_024);
    let span = first_ephemeral.saturating_sub(low).max(1);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        seed() % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut held = Vec::with_capacity(n);
    for _ in 0..span {
        if held.len() == n {
            break;
        }
        let port = low + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "fewer than {n} free loopback ports in {low}..{}",
                low + span
            ),
        ));
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Differs between processes started together (process id) and over time.
fn seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}
