//! Redis as a target: `INCR` / `INCRBY` per key, what many IM servers use
//! for conversation sequences. Run without persistence, and with an
//! append-only file fsync'd on every write.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use redis::aio::MultiplexedConnection;
use tempfile::TempDir;

use crate::cli::Op;
use crate::driver::{Caller, Done};
use crate::keys::KeyPicker;
use crate::process::{free_ports, ChildGuard};

/// Redis persistence settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `--save "" --appendonly no`: memory only.
    None,
    /// `--appendonly yes --appendfsync always`: the AOF is fsync'd before a
    /// write's reply is sent (one fsync per event-loop round).
    FsyncAlways,
}

/// A running redis-server; killed before its directory is removed.
pub struct RedisServer {
    child: ChildGuard,
    url: String,
    _dir: TempDir,
}

impl RedisServer {
    pub async fn start(
        bin: &Path,
        persistence: Persistence,
        base: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("seqcompare-redis-")
            .tempdir_in(base)
            .with_context(|| format!("cannot create a temp dir in {}", base.display()))?;
        let port = free_ports(1)?[0];
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--daemonize", "no", "--logfile", ""]);
        match persistence {
            Persistence::None => cmd.args(["--save", "", "--appendonly", "no"]),
            Persistence::FsyncAlways => cmd.args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]),
        };
        let child = ChildGuard::spawn(
            "redis-server",
            cmd,
            dir.path(),
            dir.path().join("redis.log"),
        )?;
        let mut server = Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        };
        server.wait_ready(persistence, timeout).await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.child.check_alive()
    }

    /// Waits until it answers, then checks it runs with the persistence we
    /// asked for (a wrong flag would silently change what a row means).
    async fn wait_ready(&mut self, persistence: Persistence, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut conn = loop {
            self.child.check_alive()?;
            match self.connect().await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "redis-server not answering at {} within {timeout:?}: {e}",
                        self.url
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let appendonly = config_get(&mut conn, "appendonly").await?;
        let fsync = config_get(&mut conn, "appendfsync").await?;
        let want = match persistence {
            Persistence::None => ("no", None),
            Persistence::FsyncAlways => ("yes", Some("always")),
        };
        if appendonly != want.0 || want.1.is_some_and(|f| f != fsync) {
            bail!(
                "redis-server runs with appendonly={appendonly} appendfsync={fsync}, not the \
                 configuration asked for ({want:?})"
            );
        }
        Ok(())
    }

    async fn connect(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(conn)
    }

    /// One caller per picker. Callers share `connections` multiplexed
    /// connections (redis-rs pipelines concurrent commands on one), as an
    /// async Redis client is normally used.
    pub async fn callers(
        &self,
        op: Op,
        connections: usize,
        pickers: Vec<KeyPicker>,
    ) -> Result<Vec<RedisCaller>> {
        let mut conns = Vec::with_capacity(connections);
        for _ in 0..connections {
            conns.push(self.connect().await?);
        }
        Ok(pickers
            .into_iter()
            .enumerate()
            .map(|(i, keys)| RedisCaller {
                op,
                keys,
                conn: conns[i % conns.len()].clone(),
            })
            .collect())
    }
}

async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> Result<String> {
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .with_context(|| format!("CONFIG GET {name}"))?;
    Ok(v.get(1).cloned().unwrap_or_default())
}

pub struct RedisCaller {
    op: Op,
    keys: KeyPicker,
    conn: MultiplexedConnection,
}

impl Caller for RedisCaller {
    async fn call(&mut self) -> Result<Done, String> {
        let numbers = match self.op {
            Op::Next { count } => {
                let mut cmd = if count == 1 {
                    redis::cmd("INCR")
                } else {
                    redis::cmd("INCRBY")
                };
                cmd.arg(self.keys.key());
                if count != 1 {
                    cmd.arg(count);
                }
                let _: i64 = cmd
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| e.to_string())?;
                u64::from(count)
            }
            Op::Batch { fanout } => {
                // MULTI/EXEC: all-or-nothing like seqd's NextBatch, and one
                // round trip like a plain pipeline.
                let mut pipe = redis::pipe();
                pipe.atomic();
                for key in self.keys.distinct_keys(fanout) {
                    pipe.cmd("INCR").arg(key);
                }
                let v: Vec<i64> = pipe
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| e.to_string())?;
                v.len() as u64
            }
            Op::Ids { .. } => return Err("Redis has no ID workload".into()),
        };
        Ok(Done {
            numbers,
            retries: 0,
        })
    }
}
