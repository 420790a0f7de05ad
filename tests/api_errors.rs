//! Bad input gets INVALID_ARGUMENT naming the field and changes nothing
//! (I6); a key at its ceiling fails with RESOURCE_EXHAUSTED, never wraps
//! (I4).

mod common;

use std::time::Duration;

use common::Cluster;
use seqd::pb::{BatchItem, CurrentRequest, NextBatchRequest, NextRequest};
use tonic::Code;

fn next(ns: &str, key: &str, count: u32, request_id: &str) -> NextRequest {
    NextRequest {
        namespace: ns.into(),
        key: key.into(),
        count,
        request_id: request_id.into(),
    }
}

fn batch(ns: &str, items: &[(&str, u32)]) -> NextBatchRequest {
    NextBatchRequest {
        namespace: ns.into(),
        items: items
            .iter()
            .map(|(k, c)| BatchItem {
                key: k.to_string(),
                count: *c,
            })
            .collect(),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_names_the_field_and_changes_nothing() {
    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let mut api = c.sequencer(1).await;
    let first = api
        .next(next("conv", "k", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.first, 1);

    let long_key = "x".repeat(65);
    let long_id = "r".repeat(129);
    let cases: Vec<(NextRequest, &str)> = vec![
        (next("", "k", 1, ""), "namespace:"),
        (next("nope", "k", 1, ""), "namespace:"),
        (next("conv", "", 1, ""), "key:"),
        (next("conv", &long_key, 1, ""), "key:"),
        (next("conv", "k", 0, ""), "count:"),
        (next("conv", "k", 1001, ""), "count:"),
        (next("conv", "k", 1, &long_id), "request_id:"),
    ];
    for (req, field) in cases {
        let desc = format!("{req:?}");
        let err = api.next(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{desc}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{desc}: message {:?} should name {field}",
            err.message()
        );
    }

    let batch_cases: Vec<(NextBatchRequest, &str)> = vec![
        (batch("conv", &[]), "items:"),
        (batch("nope", &[("k", 1)]), "namespace:"),
        (batch("conv", &[("a", 1), ("", 1)]), "items[1].key:"),
        (batch("conv", &[("a", 1), ("b", 0)]), "items[1].count:"),
        (batch("conv", &[("a", 1), ("a", 1)]), "items[1].key:"),
        (
            NextBatchRequest {
                request_id: long_id.clone(),
                ..batch("conv", &[("a", 1)])
            },
            "request_id:",
        ),
    ];
    for (req, field) in batch_cases {
        let desc = format!("{req:?}");
        let err = api.next_batch(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{desc}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{desc}: message {:?} should name {field}",
            err.message()
        );
    }
    let too_many: Vec<(String, u32)> = (0..10_001).map(|i| (format!("k{i}"), 1)).collect();
    let refs: Vec<(&str, u32)> = too_many.iter().map(|(k, c)| (k.as_str(), *c)).collect();
    let err = api.next_batch(batch("conv", &refs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("items:"), "{}", err.message());

    // A batch's request id: the same items get the same ranges again,
    // other items are refused.
    for ns in ["conv", "inbox"] {
        let with_id = |items: &[(&str, u32)]| NextBatchRequest {
            request_id: "batch-1".into(),
            ..batch(ns, items)
        };
        let first = api
            .next_batch(with_id(&[("x", 1), ("y", 2)]))
            .await
            .unwrap()
            .into_inner();
        let again = api
            .next_batch(with_id(&[("x", 1), ("y", 2)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            first.ranges, again.ranges,
            "{ns}: a retry gets the same ranges"
        );
        for other in [
            &[("x", 1), ("y", 3)][..],
            &[("y", 2), ("x", 1)],
            &[("x", 1)],
        ] {
            let err = api.next_batch(with_id(other)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{ns} {other:?}: {err:?}");
            assert!(
                err.message().starts_with("request_id:"),
                "{}",
                err.message()
            );
        }
        let next = api
            .next_batch(batch(ns, &[("x", 1)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            next.ranges[0].first,
            first.ranges[0].first + 1,
            "{ns}: the retry and the refused batches took nothing"
        );
    }

    let err = api
        .current(CurrentRequest {
            namespace: "conv".into(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing changed: the key continues right after the one good call, and
    // the batch members that preceded a bad item were not touched.
    let cur = api
        .current(CurrentRequest {
            namespace: "conv".into(),
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cur.current, 1);
    let a = api
        .current(CurrentRequest {
            namespace: "conv".into(),
            key: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.current, 0);
    let again = api
        .next(next("conv", "k", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.first, 2);

    // Through the client (which sends calls in batches on its stream),
    // the same refusals, naming the call's own fields; the good calls
    // sent beside bad ones are answered.
    let client = c.client();
    let calls = [
        ("conv", "", "key: must not be empty"),
        ("conv", long_key.as_str(), "key: 65 bytes is longer"),
        ("nope", "k", "namespace: unknown namespace"),
        ("conv", "good", ""),
        ("conv", "fine", ""),
    ];
    let answers =
        futures::future::join_all(calls.iter().map(|(ns, key, _)| client.next(ns, key, 1))).await;
    for ((ns, key, refusal), answer) in calls.iter().zip(answers) {
        match answer {
            Ok(r) => assert!(refusal.is_empty(), "{ns}/{key:?} answered {r:?}"),
            Err(seqd::client::ClientError::Rejected(s)) => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert!(
                    !refusal.is_empty() && s.message().starts_with(refusal),
                    "{ns}/{key:?}: {}",
                    s.message()
                );
            }
            Err(e) => panic!("{ns}/{key:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_keys_fail_and_never_wrap() {
    let mut c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    // "tiny" stops at 100.
    let a = client.next("tiny", "t", 50).await.unwrap();
    let b = client.next("tiny", "t", 49).await.unwrap();
    assert_eq!((a.first, b.first), (1, 51));
    let err = client.next("tiny", "t", 2).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let batch_err = client
        .next_batch("tiny", &[("other", 1), ("t", 2)])
        .await
        .unwrap_err();
    assert_eq!(batch_err.code(), Some(Code::ResourceExhausted));
    assert_eq!(
        client.current("tiny", "other").await.unwrap(),
        0,
        "a failed batch takes nothing"
    );
    let last = client.next("tiny", "t", 1).await.unwrap();
    assert_eq!(last.first, 100);
    for _ in 0..3 {
        let err = client.next("tiny", "t", 1).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::ResourceExhausted));
    }
    // Still exhausted after a crash: the ceiling is replicated state.
    c.kill(1);
    c.spawn(1);
    c.wait_leader(Duration::from_secs(20)).await;
    let err = client.next("tiny", "t", 1).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert_eq!(client.current("tiny", "t").await.unwrap(), 100);
}

/// `NextRequest` as it goes on the wire, with its key as raw bytes, so a
/// test can send one that is not UTF-8 (the generated type holds a
/// `String`).
#[derive(Clone, PartialEq, prost::Message)]
struct RawNextRequest {
    #[prost(string, tag = "1")]
    namespace: String,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
    #[prost(uint32, tag = "3")]
    count: u32,
}

/// A key that is not UTF-8 is bad input like any other: INVALID_ARGUMENT
/// naming the field (prost refuses it while decoding, which tonic alone
/// answers INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_that_is_not_utf8_is_invalid_argument() {
    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.node(1).addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let raw = RawNextRequest {
        namespace: "conv".into(),
        key: vec![b'k', 0xff, 0xfe],
        count: 1,
    };
    let err = grpc
        .unary::<_, seqd::pb::NextResponse, _>(
            tonic::Request::new(raw),
            "/seqd.v1.Sequencer/Next".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("a key that is not UTF-8 was accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("key") && err.message().contains("UTF-8"),
        "the message does not name the field: {}",
        err.message()
    );
    // The node goes on serving.
    let mut api = c.sequencer(1).await;
    let first = api
        .next(next("conv", "k", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.first, 1);
}

/// A `NextStream` batch is read from its bytes by the node (not by
/// prost): it answers as the `NextBatch` RPC would (with ranges naming
/// their keys, or packed when asked), refuses a bad batch by name (a key
/// that is not UTF-8 too) and serves the stream's next batch after a
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_batch_is_answered_and_refused_as_the_rpc_would() {
    use prost::Message as _;
    use seqd::pb::NextStreamRequest;

    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let mut api = c.sequencer(1).await;
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut replies = api.next_stream(rx).await.unwrap().into_inner();
    let mut id = 0;
    let mut call = |batch: Vec<u8>, packed_ranges: bool| {
        id += 1;
        tx.unbounded_send(NextStreamRequest {
            id,
            batch: Some(batch.into()),
            packed_ranges,
        })
        .unwrap();
        id
    };
    let mut reply = async |id: u64| {
        let r = replies.message().await.unwrap().expect("a reply");
        assert_eq!(r.id, id);
        r
    };

    let two = batch("conv", &[("a", 1), ("b", 2)]).encode_to_vec();
    let named = reply(call(two.clone(), false)).await.ok.expect("answered");
    let ranges: Vec<(&str, u64, u32)> = named
        .ranges
        .iter()
        .map(|r| (r.key.as_str(), r.first, r.count))
        .collect();
    assert_eq!(ranges, [("a", 1, 1), ("b", 1, 2)]);
    assert!(named.firsts.is_empty() && named.counts.is_empty());
    let packed = reply(call(two, true)).await.ok.expect("answered");
    assert!(packed.ranges.is_empty(), "{packed:?}");
    assert_eq!((packed.firsts, packed.counts), (vec![2, 3], vec![1, 2]));

    // NextBatchRequest { namespace: "conv", items: [{ key: 0xff 0xfe, count: 1 }] }
    let not_utf8 = vec![
        0x0a, 4, b'c', b'o', b'n', b'v', 0x12, 6, 0x0a, 2, 0xff, 0xfe, 0x10, 1,
    ];
    let refused = reply(call(not_utf8, true)).await.error.expect("refused");
    assert_eq!(refused.code, Code::InvalidArgument as i32, "{refused:?}");
    assert!(refused.message.contains("BatchItem.key"), "{refused:?}");
    let twice = batch("conv", &[("a", 1), ("a", 1)]).encode_to_vec();
    let refused = reply(call(twice, true)).await.error.expect("refused");
    assert_eq!(refused.code, Code::InvalidArgument as i32, "{refused:?}");
    assert_eq!(
        refused.message,
        "items[1].key: \"a\" appears more than once"
    );

    // The stream goes on, and the refused batches took nothing.
    let after = reply(call(batch("conv", &[("a", 1)]).encode_to_vec(), true))
        .await
        .ok
        .expect("answered");
    assert_eq!(after.firsts, [3]);
}

/// A stream message that cannot be read ends the stream with its status,
/// but only once the batches sent before it are answered: their numbers
/// are taken (here a dense key's raise commits), and a reply dropped with
/// the stream would leave them a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_stream_message_ends_the_stream_after_the_batches_before_it() {
    use futures::StreamExt as _;
    use prost::Message as _;
    use seqd::pb::{InjectFaultRequest, NextStreamReply, NextStreamRequest};

    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let c = &c;
    let sync_delay = |ms: u32| async move {
        c.admin(1)
            .await
            .inject_fault(InjectFaultRequest {
                clock_offset_ms: 0,
                isolate: false,
                sync_delay_ms: ms,
            })
            .await
            .expect("inject fault");
    };
    // Every fsync of the log takes a second: the dense batch is answered
    // only after its raise is synced.
    sync_delay(1000).await;
    let mut grpc = raw_grpc(c).await;
    let (tx, rx) = futures::channel::mpsc::unbounded::<Encoded>();
    let mut replies = grpc
        .streaming(
            tonic::Request::new(rx.boxed()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/seqd.v1.Sequencer/NextStream"),
            seqd::codec::Codec::<Encoded, NextStreamReply>::default(),
        )
        .await
        .expect("stream opened")
        .into_inner();
    let dense = NextStreamRequest {
        id: 7,
        batch: Some(batch("inbox", &[("k", 3)]).encode_to_vec().into()),
        packed_ranges: true,
    };
    tx.unbounded_send(Encoded(dense.encode_to_vec())).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::metric(
        &c.node(1).metrics_addr,
        "seqd_raft_log_sync_pending_seconds",
    )
    .unwrap_or(0.0)
        <= 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch's raise waited for no fsync"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Field 1 (the id, a varint) sent length-delimited.
    tx.unbounded_send(Encoded(vec![0x0a, 1, 0])).unwrap();

    let answered = replies
        .message()
        .await
        .expect("the batch before is answered");
    let answered = answered.expect("a reply before the stream ends");
    assert_eq!(answered.id, 7);
    let ok = answered.ok.expect("answered with numbers");
    assert_eq!((ok.firsts, ok.counts), (vec![1], vec![3]));
    let ended = replies
        .message()
        .await
        .expect_err("the stream ends with the refusal");
    assert_eq!(ended.code(), Code::Internal, "{ended:?}");
    assert!(ended.message().contains("wire type"), "{ended:?}");

    sync_delay(0).await;
    let mut api = c.sequencer(1).await;
    let next = api
        .next(next("inbox", "k", 1, ""))
        .await
        .expect("next")
        .into_inner();
    assert_eq!(next.first, 4, "the dense key has no hole");
}

/// A message sent as the bytes it is given: a request no client would
/// build, at a cost the test can bear.
#[derive(Clone, Debug, Default, PartialEq)]
struct Encoded(Vec<u8>);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A bare gRPC client of node 1, for requests no generated stub would send.
async fn raw_grpc(c: &Cluster) -> tonic::client::Grpc<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.node(1).addr))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("ready");
    grpc
}

/// Sends `bytes` to node 1 as the request of the unary RPC at `path`.
async fn send_encoded<R: prost::Message + Default + 'static>(
    c: &Cluster,
    path: &'static str,
    bytes: Vec<u8>,
) -> Result<R, tonic::Status> {
    let mut grpc = raw_grpc(c).await;
    grpc.unary(
        tonic::Request::new(Encoded(bytes)),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        seqd::codec::Codec::<Encoded, R>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The most memory node `pid` has held (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmHWM in kB");
    kib << 10
}

/// A `NextBatch` of nearly 64 MiB (the most a node reads) of empty items,
/// 33 million of them against a limit of 10,000, is refused for its size,
/// naming how many came, without the node holding them: decoded whole,
/// they would be a gigabyte of `BatchItem`s. The node serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_batch_is_refused_without_holding_its_items() {
    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    let pid = c.pid(1).expect("node 1 runs");
    let before = peak_rss(pid);

    let conv = [0x0a, 4, b'c', b'o', b'n', b'v'];
    let items = (seqd::client::MAX_MESSAGE_BYTES - conv.len()) / 2;
    let mut bytes = Vec::with_capacity(conv.len() + 2 * items);
    bytes.extend_from_slice(&conv);
    for _ in 0..items {
        // An empty BatchItem as field 2: its key and length.
        bytes.extend_from_slice(&[0x12, 0]);
    }
    let err =
        send_encoded::<seqd::pb::NextBatchResponse>(&c, "/seqd.v1.Sequencer/NextBatch", bytes)
            .await
            .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        format!("items: {items} items is more than the maximum of 10000")
    );
    let grown = peak_rss(pid).saturating_sub(before);
    // The message itself, as received, and buffers for it: a few times
    // 64 MiB at most. 33 million BatchItems would be 1 GiB.
    assert!(
        grown < 400 << 20,
        "the node's peak memory grew by {} MiB",
        grown >> 20
    );

    // Refused before its handler, it is counted as any refused batch.
    let metrics = common::http_get(&c.node(1).metrics_addr, "/metrics").expect("metrics");
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("seqd_requests_total{")
                && l.contains("op=\"NextBatch\"")
                && l.contains("code=\"INVALID_ARGUMENT\"")
        })
        .unwrap_or_else(|| panic!("no refused NextBatch counted:\n{metrics}"));
    assert!(refused.ends_with(" 1"), "{refused}");

    let mut api = c.sequencer(1).await;
    let served = api
        .next_batch(batch("conv", &[("a", 1)]))
        .await
        .expect("served on")
        .into_inner();
    assert_eq!((served.ranges[0].first, served.ranges[0].count), (1, 1));
}

/// An `Ids` request is a few varints: one padded past gRPC's usual 4 MiB
/// (an unknown field) is refused unread, and the node serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ids_request_past_4_mib_is_refused_unread() {
    let c = Cluster::start(1, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_status(1, Duration::from_secs(20), "issuing IDs", |s| s.ids_active)
        .await;
    // NextIdsRequest { count: 1 }, then field 15 (unknown), 5 MiB long.
    let padding = 5 << 20;
    let mut bytes = vec![0x08, 1, 0x7a];
    prost::encoding::encode_varint(padding as u64, &mut bytes);
    bytes.resize(bytes.len() + padding, b'x');
    let err = send_encoded::<seqd::pb::NextIdsResponse>(&c, "/seqd.v1.Ids/NextIds", bytes)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    let ids = c
        .ids(1)
        .await
        .next_ids(seqd::pb::NextIdsRequest { count: 2 })
        .await
        .expect("served on")
        .into_inner();
    assert_eq!(ids.ids.len(), 2, "{ids:?}");
}
