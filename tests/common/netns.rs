//! Real network partitions for real processes: every node runs in its own
//! Linux network namespace with its own address, all plugged into a bridge
//! that lives in a "switch" namespace. The test process (root namespace)
//! reaches the nodes through one more port on that bridge.
//!
//! ```text
//!   root ns: 10.77.S.254 ──┐
//!                          │ switch ns: bridge br0
//!   node 1 ns: 10.77.S.1 ──┤   port p1
//!   node 2 ns: 10.77.S.2 ──┤   port p2
//!   node 3 ns: 10.77.S.3 ──┘   port p3
//! ```
//!
//! The bridge sits in its own namespace so that the host's firewall (Docker
//! sets the FORWARD policy to DROP, and bridged frames may pass through it)
//! never sees node-to-node traffic.
//!
//! Faults lose packets silently, as a broken network does, so both ends wait
//! for timeouts instead of getting an error at once:
//! - [`Net::isolate`] takes a node's switch port down (nobody reaches it,
//!   clients included);
//! - [`Net::drop_link`] makes one node's frames to another go to a MAC
//!   address nobody has (a permanent neighbour entry), one direction only;
//!   since TCP needs the replies, either direction breaks the connections
//!   between the two, while each still reaches the third node and the
//!   clients.
//!
//! Needs root and iproute2 (`ip`).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Net {
    prefix: String,
    subnet: u8,
    nodes: usize,
}

/// A MAC address no interface has (locally administered, unicast).
const NOWHERE_MAC: &str = "02:00:5e:00:de:ad";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (network namespaces need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ip` inside namespace `ns`.
fn ip_in(ns: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all);
}

/// Deletes the namespaces of test processes that are gone (killed, or
/// ended by a CI time limit before `Drop` ran), after killing what still
/// runs in them: their nodes would take cores from this run, and their
/// host-side addresses may share a subnet with this run's.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        // "sq" + pid + a letter + "sw" or "n" + node id.
        let Some(rest) = name.strip_prefix("sq") else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing network namespace {name} of a test process that is gone");
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}

impl Net {
    /// Builds the switch and `nodes` node namespaces. Names and the subnet
    /// come from the process id and a counter, so tests running at once (in
    /// one binary or several) do not collide.
    pub fn create(nodes: usize) -> Self {
        static CREATED: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let net = Self {
            prefix: format!("sq{pid}{}", char::from(b'a' + (n % 26) as u8)),
            subnet: 1 + (pid.wrapping_mul(7).wrapping_add(n) % 250) as u8,
            nodes,
        };
        // A previous process with the same id may have died mid-test; so
        // may others, whose namespaces (and nodes) outlive them.
        net.remove();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_stale);
        let sw = net.switch();
        ip(&["netns", "add", &sw]);
        ip_in(&sw, &["link", "set", "lo", "up"]);
        ip_in(&sw, &["link", "add", "br0", "type", "bridge"]);
        ip_in(&sw, &["link", "set", "br0", "up"]);

        let host = net.host_leg();
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "up0", "netns", &sw,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("10.77.{}.254/24", net.subnet),
            "dev",
            &host,
        ]);
        ip(&["link", "set", &host, "up"]);
        ip_in(&sw, &["link", "set", "up0", "master", "br0", "up"]);

        for id in 1..=nodes as u64 {
            let ns = net.ns(id);
            let port = format!("p{id}");
            ip(&["netns", "add", &ns]);
            ip_in(&ns, &["link", "set", "lo", "up"]);
            ip_in(
                &sw,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            ip_in(&sw, &["link", "set", &port, "master", "br0", "up"]);
            ip_in(
                &ns,
                &["addr", "add", &format!("{}/24", net.ip(id)), "dev", "eth0"],
            );
            ip_in(&ns, &["link", "set", "eth0", "up"]);
        }
        net
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Interface names are at most 15 bytes: "sq" + pid + letter + "h" fits.
    fn host_leg(&self) -> String {
        format!("{}h", self.prefix)
    }

    /// Namespace of node `id` (`ip netns exec <ns> ...` runs in it).
    pub fn ns(&self, id: u64) -> String {
        format!("{}n{id}", self.prefix)
    }

    /// Node `id`'s own address.
    pub fn ip(&self, id: u64) -> String {
        format!("10.77.{}.{id}", self.subnet)
    }

    /// Cuts node `id` off from everyone: its switch port goes down.
    pub fn isolate(&self, id: u64) {
        ip_in(&self.switch(), &["link", "set", &format!("p{id}"), "down"]);
    }

    /// Undoes [`Net::isolate`].
    pub fn rejoin(&self, id: u64) {
        ip_in(&self.switch(), &["link", "set", &format!("p{id}"), "up"]);
    }

    /// Frames from `from` to `to` are lost from now on (one direction).
    pub fn drop_link(&self, from: u64, to: u64) {
        ip_in(
            &self.ns(from),
            &[
                "neigh",
                "replace",
                &self.ip(to),
                "lladdr",
                NOWHERE_MAC,
                "nud",
                "permanent",
                "dev",
                "eth0",
            ],
        );
    }

    /// Undoes [`Net::drop_link`]: the neighbour is looked up afresh.
    pub fn restore_link(&self, from: u64, to: u64) {
        ip_in(
            &self.ns(from),
            &["neigh", "del", &self.ip(to), "dev", "eth0"],
        );
    }

    /// Every port up, every link restored.
    pub fn heal(&self) {
        for id in 1..=self.nodes as u64 {
            self.rejoin(id);
            for to in (1..=self.nodes as u64).filter(|&to| to != id) {
                // Quietly: most links were never dropped.
                let _ = Command::new("ip")
                    .args(["netns", "exec", &self.ns(id), "ip", "neigh", "del"])
                    .args([&self.ip(to), "dev", "eth0"])
                    .output();
            }
        }
    }

    /// Deletes the namespaces (their interfaces go with them); quietly, as
    /// they may not exist.
    fn remove(&self) {
        let mut names: Vec<String> = (1..=self.nodes as u64).map(|id| self.ns(id)).collect();
        names.push(self.switch());
        for name in names {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_leg()])
            .output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}
