//! Public API requests: whatever bytes a client sends must decode to a
//! checked call or be refused with an error naming the field, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use seqd::config::{Config, Overrides};
use seqd::core::types::MAX_BATCH_ITEMS;
use seqd::pb::{CurrentRequest, DecodeRequest, NextBatchRequest, NextRequest};
use seqd::service::sequencer::{
    decode_batch_request, decode_next_batch, parse_current, parse_next, read_batch,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let config = Config::load(None, &Overrides::default()).expect("embedded config");
    let namespaces = config.namespaces();
    match which % 4 {
        0 => {
            if let Ok(req) = NextRequest::decode(body) {
                if let Ok(call) = parse_next(&namespaces, req) {
                    let spec = namespaces.spec(call.key.namespace());
                    assert!(call.count >= 1 && call.count <= spec.max_count);
                    assert!(!call.key.key().is_empty());
                    assert!(call.key.key().len() <= spec.max_key_bytes);
                }
            }
        }
        1 => {
            // A NextStream batch is read from its bytes, not by prost: the
            // same call, or the same refusal (code and message), as the
            // unary RPC's.
            let streamed = read_batch(&namespaces, body, true);
            let unary = decode_batch_request(&namespaces, body);
            if let Ok((_, call)) = &unary {
                let keys = call.keys.as_ref().expect("the unary reply names its keys");
                assert!(!call.items.is_empty());
                assert_eq!(call.items.len(), keys.len());
                for ((key, count), sent) in call.items.iter().zip(keys) {
                    assert_eq!(key.key(), sent);
                    let spec = namespaces.spec(key.namespace());
                    assert!(*count >= 1 && *count <= spec.max_count);
                }
            }
            match (&streamed, &unary) {
                (Ok((sid, s)), Ok((uid, u))) => {
                    assert_eq!((sid, &s.items, &s.keys), (uid, &u.items, &u.keys))
                }
                (Err(s), Err(u)) => {
                    assert_eq!((s.code(), s.message()), (u.code(), u.message()))
                }
                _ => panic!("read from its bytes: {streamed:?}; by prost: {unary:?}"),
            }
            // The unary RPC's decode holds at most MAX_BATCH_ITEMS items;
            // below that it is prost's own, refusals and all.
            let bounded = decode_next_batch(body);
            let prost = NextBatchRequest::decode(body).map_err(seqd::codec::decode_error);
            match (&bounded, &prost) {
                (Ok(b), Ok(p)) => assert_eq!(b, p),
                (Err(b), Err(p)) => {
                    assert_eq!((b.code(), b.message()), (p.code(), p.message()))
                }
                (Err(b), Ok(p)) => assert!(
                    p.items.len() > MAX_BATCH_ITEMS
                        && b.message().contains("items is more than the maximum"),
                    "{b:?}"
                ),
                (Ok(_), Err(p)) => panic!("bounded decode took what prost refused: {p:?}"),
            }
        }
        2 => {
            if let Ok(req) = CurrentRequest::decode(body) {
                let _ = parse_current(&namespaces, req);
            }
        }
        _ => {
            if let Ok(req) = DecodeRequest::decode(body) {
                let layout = config.layout().expect("embedded layout");
                if let Some((unix_ms, worker, _)) = layout.decode(req.id) {
                    assert!(unix_ms >= layout.epoch_ms());
                    assert!(worker < layout.max_workers());
                }
            }
        }
    }
});
