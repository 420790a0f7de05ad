//! Wiring: storage and Raft node, gRPC services, ordered shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use std::sync::Arc;

use crate::config::Config;
use crate::core::{Clock as _, Issuer, SystemClock};
use crate::pb::admin_server::AdminServer;
use crate::pb::ids_server::IdsServer;
use crate::pb::peer_server::PeerServer;
use crate::pb::sequencer_server::SequencerServer;
use crate::raft::transport::MAX_PEER_MESSAGE;
use crate::raft::{spawn, Faults, IdState, NodeHandle, NodeParams, NodeTesting};
use crate::service::{AdminService, IdsService, PeerAddrs, SequencerService, Stopping};
use crate::storage::StorageError;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics exporter on {addr}: {message}")]
    Metrics { addr: String, message: String },
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the Raft node stopped on its own: {0}")]
    NodeStopped(String),
}

/// Binds the configured address and runs until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let addr = config.node.listen.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    serve(config, listener, shutdown).await
}

/// Runs a node on an already bound listener until `shutdown` resolves, then
/// hands leadership over (trimming first, so no hole opens) and stops.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    if let Some(addr) = &config.metrics.listen {
        let parsed = addr.parse().map_err(|_| ServerError::Metrics {
            addr: addr.clone(),
            message: "not an ip:port address".into(),
        })?;
        crate::metrics::install(parsed).map_err(|e| ServerError::Metrics {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
        tracing::info!(listen = %addr, "serving Prometheus metrics at /metrics");
    }
    let namespaces = config.namespaces();
    let peers: Vec<(u64, String)> = config
        .peers
        .iter()
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    // Filled by the node as it opens (configured and recorded addresses).
    let addrs = PeerAddrs::default();
    let layout = config
        .layout()
        .map_err(|e| StorageError::corrupt("snowflake layout", e))?;
    let clock = Arc::new(SystemClock::new(config.testing.clock_offset_ms));
    let now = clock.now_ms();
    tracing::info!(
        years_left = format!("{:.1}", layout.years_left(now)),
        epoch_ms = layout.epoch_ms(),
        "snowflake layout"
    );
    let ids = Arc::new(IdState::new(
        Issuer::new(
            layout,
            config.snowflake.max_rollback_ms,
            config.snowflake.fence_ahead_ms,
        )
        .with_trust_forward_ms(config.snowflake.trust_forward_step_ms)
        .with_max_ahead_of_cluster_ms(config.snowflake.max_ahead_of_cluster_ms),
        clock.clone(),
    ));
    let faults = Arc::new(Faults::default());
    let secret = crate::service::Secret::new(config.node.secret.as_ref().map(|s| s.expose()));
    let (node, peer_service, node_task) = spawn(
        NodeParams {
            id: config.node.id,
            voters: config.voter_ids(),
            peers,
            addrs: addrs.clone(),
            data_dir: config.node.data_dir.clone(),
            raft: config.raft.clone(),
            namespaces: namespaces.clone(),
            join: config.node.join,
            snowflake: config.snowflake.clone(),
            ids: ids.clone(),
            faults: faults.clone(),
            // Never 0, which worker records use for "no boot of ours".
            boot: rand::random::<u64>() | 1,
            secret,
            testing: NodeTesting {
                stop_in_snapshot_install: config.testing.stop_in_snapshot_install,
                ..NodeTesting::default()
            },
        },
        &tokio::runtime::Handle::current(),
    )?;
    tracing::info!(
        node_id = config.node.id,
        listen = %config.node.listen,
        data_dir = %config.node.data_dir.display(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "seqd serving"
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(node.clone(), health));
    // v1, and v1alpha for older grpcurl builds and tools that speak only it.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (stopping_tx, stopping) = Stopping::new();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .add_service(
            SequencerServer::new(SequencerService::new(
                node.clone(),
                namespaces,
                addrs.clone(),
                stopping.clone(),
            ))
            .max_decoding_message_size(crate::client::MAX_MESSAGE_BYTES),
        )
        // gRPC's usual 4 MiB for requests: an Ids request is a few
        // varints (only its replies, which the client reads, are large).
        .add_service(IdsServer::new(IdsService::new(
            ids.clone(),
            config.snowflake.max_count,
            stopping.clone(),
        )))
        .add_service(AdminServer::new(AdminService::new(
            node.clone(),
            addrs,
            clock,
            faults,
            config.testing.allow_fault_injection,
            secret,
        )))
        .add_service(
            PeerServer::new(peer_service.stop_with(stopping.clone()))
                .max_decoding_message_size(MAX_PEER_MESSAGE),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha);
    // Nagle off on accepted sockets: a reply written as headers then body
    // would otherwise wait on the client's delayed ACK (~40 ms). The
    // builder's tcp_nodelay applies only to listeners tonic binds itself.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    let mut node_task = node_task;

    tokio::select! {
        // The loop ends before shutdown only when it failed: raft-rs
        // refused this node's state (it panics, as for a node that lost its
        // log and came back as a voter), or its storage did. Serving on
        // without it would answer nothing and hold connections a
        // supervisor should see fail: the process stops, non-zero.
        ended = &mut node_task => {
            let why = match ended {
                Err(e) if e.is_panic() => "its loop panicked (the log above says why)".to_string(),
                Err(e) => e.to_string(),
                Ok(()) => "its loop returned".to_string(),
            };
            tracing::error!(reason = %why, "raft node stopped; stopping seqd");
            health_task.abort();
            return Err(ServerError::NodeStopped(why));
        }
        _ = shutdown => {
            tracing::info!("shutdown requested: handing over leadership");
            node.shutdown().await;
            // Clients keep their call streams open as long as they live:
            // ended here, they go on to another node, and the server's
            // graceful stop need not wait for them.
            let _ = stopping_tx.send(true);
            let _ = stop_tx.send(());
            match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
                Ok(Ok(result)) => result?,
                Ok(Err(join)) => tracing::error!(error = %join, "gRPC server task failed"),
                Err(_) => tracing::warn!("gRPC server did not stop in time"),
            }
        }
        result = &mut server => {
            node.shutdown().await;
            match result {
                Ok(r) => r?,
                Err(join) => tracing::error!(error = %join, "gRPC server task failed"),
            }
        }
    }
    health_task.abort();
    // The node's loop has returned (or will, now that every handle is gone).
    drop(node);
    if let Err(e) = node_task.await {
        // A loop that panicked during the handover: stopped, but not cleanly.
        return Err(ServerError::NodeStopped(e.to_string()));
    }
    tracing::info!("seqd stopped");
    Ok(())
}

/// Keeps the gRPC health status current. The node serves ("" and
/// `seqd.v1.Sequencer`) when it knows a leader and has applied what it knows
/// to be committed; `seqd.v1.Ids` when, in addition, it holds an active
/// worker id. A node cut off from the majority loses its leader within an
/// election timeout, and with it SERVING.
async fn report_health(node: NodeHandle, health: HealthReporter) {
    const MAX_APPLY_LAG: u64 = 100;
    let mut last = None;
    loop {
        let (cluster, ids) = match node.status().await {
            Ok(s) => {
                let caught_up = s.applied_index + MAX_APPLY_LAG >= s.commit_index;
                let cluster = s.leader_id != 0 && caught_up && (s.leader_id != s.id || s.serving);
                (cluster, cluster && s.ids_active)
            }
            Err(_) => (false, false),
        };
        if last != Some((cluster, ids)) {
            let status = |up: bool| {
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            health.set_service_status("", status(cluster)).await;
            health
                .set_service_status("seqd.v1.Sequencer", status(cluster))
                .await;
            health.set_service_status("seqd.v1.Ids", status(ids)).await;
            tracing::info!(serving = cluster, ids = ids, "health changed");
            last = Some((cluster, ids));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
