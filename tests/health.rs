//! The gRPC health protocol: SERVING on a healthy node, NOT_SERVING on a
//! node cut off from the majority, SERVING again once healed.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use seqd::pb::InjectFaultRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(c: &Cluster, id: u64, service: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.node(id).addr))
        .ok()?
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut h = HealthClient::new(ch);
    let r = h
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn wait_health(c: &Cluster, id: u64, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = health(c, id, service).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} {service:?}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_follows_reachability_of_the_majority() {
    let c = Cluster::start(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        wait_health(&c, id, "", ServingStatus::Serving).await;
        wait_health(&c, id, "seqd.v1.Sequencer", ServingStatus::Serving).await;
        wait_health(&c, id, "seqd.v1.Ids", ServingStatus::Serving).await;
    }
    let cut = leader % 3 + 1;
    let mut admin = c.admin(cut).await;
    admin
        .inject_fault(InjectFaultRequest {
            clock_offset_ms: 0,
            isolate: true,
            sync_delay_ms: 0,
        })
        .await
        .unwrap();
    wait_health(&c, cut, "", ServingStatus::NotServing).await;
    wait_health(&c, cut, "seqd.v1.Ids", ServingStatus::NotServing).await;
    // The majority side keeps serving.
    wait_health(&c, leader, "", ServingStatus::Serving).await;
    admin
        .inject_fault(InjectFaultRequest {
            clock_offset_ms: 0,
            isolate: false,
            sync_delay_ms: 0,
        })
        .await
        .unwrap();
    wait_health(&c, cut, "", ServingStatus::Serving).await;
}

/// Lists the services node 1 of `c` names through server reflection, in the
/// version whose generated code is at `$pb`.
macro_rules! listed_services {
    ($c:expr, $($pb:ident)::+) => {{
        use $($pb)::+::server_reflection_request::MessageRequest;
        use $($pb)::+::server_reflection_response::MessageResponse;
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            $c.node(1).addr
        ))
        .expect("an address")
        .connect()
        .await
        .expect("connect");
        let mut client =
            $($pb)::+::server_reflection_client::ServerReflectionClient::new(channel);
        let request = $($pb)::+::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = client
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let reply = replies.message().await.expect("a reply").expect("one reply");
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("not a service list: {other:?}"),
        }
    }};
}

/// Server reflection answers in both versions tools speak (v1, and v1alpha
/// for older grpcurl builds and tools), listing the public services and
/// health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let v1 = listed_services!(c, tonic_reflection::pb::v1);
    let v1alpha = listed_services!(c, tonic_reflection::pb::v1alpha);
    for names in [v1, v1alpha] {
        for want in [
            "seqd.v1.Sequencer",
            "seqd.v1.Ids",
            "seqd.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
    }
}
