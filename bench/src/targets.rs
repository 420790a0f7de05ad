//! The compared systems behind one interface: start, which workloads apply,
//! make callers, check the processes are still up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::cli::{Args, Op, TargetKind, Workload};
use crate::driver::{Caller, Done};
use crate::etcd_target::{EtcdCaller, EtcdServer};
use crate::keys::KeyPicker;
use crate::redis_target::{Persistence, RedisCaller, RedisServer};
use crate::seqd::{SeqdCaller, SeqdCluster};

/// Resolved program paths.
#[derive(Debug, Clone)]
pub struct Programs {
    pub seqd: Option<PathBuf>,
    pub redis: Option<PathBuf>,
    pub etcd: Option<PathBuf>,
}

pub enum Target {
    Seqd(SeqdCluster),
    Redis(RedisServer),
    Etcd(EtcdServer),
}

impl Target {
    /// Starts `kind` in a fresh temporary directory under `base`.
    pub async fn start(
        kind: TargetKind,
        args: &Args,
        programs: &Programs,
        base: &Path,
    ) -> Result<Self> {
        let timeout = Duration::from_secs(args.start_timeout);
        // `main` resolved the programs of every selected target up front.
        let program =
            |p: &Option<PathBuf>| p.clone().expect("program resolved for a selected target");
        Ok(match kind {
            TargetKind::Seqd1
            | TargetKind::Seqd3
            | TargetKind::Seqd3Raw
            | TargetKind::Seqd3Lease => {
                let n = if kind == TargetKind::Seqd1 { 1 } else { 3 };
                Self::Seqd(
                    SeqdCluster::start(
                        &program(&programs.seqd),
                        n,
                        base,
                        args.connections,
                        (kind != TargetKind::Seqd3Raw).then(|| seqd::client::ClientOptions {
                            max_in_flight: args.max_in_flight,
                            rpc_spacing: Duration::from_micros(args.rpc_spacing_us),
                            rpc_fill: args.rpc_fill,
                            ..seqd::client::ClientOptions::default()
                        }),
                        kind == TargetKind::Seqd3Lease,
                        timeout,
                    )
                    .await?,
                )
            }
            TargetKind::RedisNone | TargetKind::RedisAlways => {
                let persistence = if kind == TargetKind::RedisNone {
                    Persistence::None
                } else {
                    Persistence::FsyncAlways
                };
                Self::Redis(
                    RedisServer::start(&program(&programs.redis), persistence, base, timeout)
                        .await?,
                )
            }
            TargetKind::Etcd => Self::Etcd(
                EtcdServer::start(&program(&programs.etcd), base, args.fanout, timeout).await?,
            ),
        })
    }

    /// Why `workload` does not apply to this target, if it does not.
    pub fn unsupported(kind: TargetKind, workload: Workload) -> Option<&'static str> {
        match (kind, workload) {
            (k, Workload::Ids) if !k.is_seqd() => Some("no Snowflake ID service"),
            _ => None,
        }
    }

    /// Gets ready for the next workload: seqd re-checks who leads.
    pub async fn prepare(&mut self, timeout: Duration) -> Result<()> {
        match self {
            Self::Seqd(c) => c.refresh_leader(timeout).await,
            _ => Ok(()),
        }
    }

    pub async fn callers(
        &self,
        op: Op,
        args: &Args,
        pickers: Vec<KeyPicker>,
    ) -> Result<Vec<AnyCaller>> {
        Ok(match self {
            Self::Seqd(c) => c
                .callers(op, &args.namespace, pickers)
                .into_iter()
                .map(AnyCaller::Seqd)
                .collect(),
            Self::Redis(r) => r
                .callers(op, args.connections, pickers)
                .await?
                .into_iter()
                .map(AnyCaller::Redis)
                .collect(),
            Self::Etcd(e) => e
                .callers(op, args.connections, pickers)
                .await?
                .into_iter()
                .map(AnyCaller::Etcd)
                .collect(),
        })
    }

    /// What the target's own nodes count of the calls they served (seqd's
    /// request duration histogram, every node summed): `None` for targets
    /// without one, `Some(None)` if a node's page could not be read.
    pub async fn served(&self) -> Option<Option<crate::served::Buckets>> {
        match self {
            Self::Seqd(c) => {
                // Blocking reads of loopback pages, a few milliseconds.
                Some(tokio::task::block_in_place(|| c.served()))
            }
            Self::Redis(_) | Self::Etcd(_) => None,
        }
    }

    /// The target's processes.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Self::Seqd(c) => c.pids(),
            Self::Redis(r) => vec![r.pid()],
            Self::Etcd(e) => vec![e.pid()],
        }
    }

    /// Errors if a target process has exited (a crash under load must not
    /// pass as a slow run).
    pub fn check_alive(&mut self) -> Result<()> {
        match self {
            Self::Seqd(c) => c.check_alive(),
            Self::Redis(r) => r.check_alive(),
            Self::Etcd(e) => e.check_alive(),
        }
    }
}

/// A caller of any target; an enum rather than a boxed trait object so the
/// hot loop has no allocation per call for dispatch.
pub enum AnyCaller {
    Seqd(SeqdCaller),
    Redis(RedisCaller),
    Etcd(EtcdCaller),
}

impl Caller for AnyCaller {
    async fn call(&mut self) -> Result<Done, String> {
        match self {
            Self::Seqd(c) => c.call().await,
            Self::Redis(c) => c.call().await,
            Self::Etcd(c) => c.call().await,
        }
    }
}
