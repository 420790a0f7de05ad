//! Public API requests: whatever bytes a client sends must decode to a
//! checked call or be refused with an error naming the field, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use seqd::config::{Config, Overrides};
use seqd::pb::{CurrentRequest, DecodeRequest, NextBatchRequest, NextRequest};
use seqd::service::sequencer::{parse_current, parse_next, parse_next_batch, read_batch};

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
            // same call, or the same refusal, as the unary RPC's.
            let streamed = read_batch(&namespaces, body, true);
            if let Ok(req) = NextBatchRequest::decode(body) {
                let unary = parse_next_batch(&namespaces, req);
                if let Ok(call) = &unary {
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
                    (Ok((_, s)), Ok(u)) => assert_eq!((&s.items, &s.keys), (&u.items, &u.keys)),
                    (Err(_), Err(_)) => {}
                    // A request id the unary RPC checks before the items.
                    (Err(e), Ok(_)) => assert!(e.message().starts_with("request_id"), "{e:?}"),
                    (Ok(_), Err(e)) => panic!("read from its bytes, refused by prost's: {e}"),
                }
            } else {
                assert!(streamed.is_err(), "read bytes prost refuses");
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
