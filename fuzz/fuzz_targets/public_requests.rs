//! Public API requests: whatever bytes a client sends must decode to a
//! checked call or be refused with an error naming the field, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use seqd::config::{Config, Overrides};
use seqd::pb::{CurrentRequest, DecodeRequest, NextBatchRequest, NextRequest};
use seqd::service::sequencer::{parse_current, parse_next, parse_next_batch};

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
            if let Ok(req) = NextBatchRequest::decode(body) {
                if let Ok(call) = parse_next_batch(&namespaces, req) {
                    assert!(!call.items.is_empty());
                    assert_eq!(call.items.len(), call.keys.len());
                    for ((key, count), sent) in call.items.iter().zip(&call.keys) {
                        assert_eq!(key.key(), sent);
                        let spec = namespaces.spec(key.namespace());
                        assert!(*count >= 1 && *count <= spec.max_count);
                    }
                }
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
