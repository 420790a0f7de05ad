//! Peer traffic: a frame from another node (or anything that reaches the
//! peer port) must decode to a Raft message or be refused with an error.
//!
//! Decoded messages are not stepped into a node: Raft trusts its peers (a
//! forged heartbeat committing past the log makes raft-rs panic by design),
//! so the peer port belongs on a private network, as the README says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use seqd::pb::RaftFrame;
use seqd::raft::transport::decode_frame;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = RaftFrame::decode(data) else {
        return;
    };
    if let Ok(msg) = decode_frame(&frame) {
        assert_eq!(msg.from, frame.from);
    }
});
