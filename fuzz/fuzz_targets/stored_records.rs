//! Stored records and what replicas send to be stored: a committed entry's
//! command, a snapshot from the leader, and the raw records read back at
//! start. Each is decoded and applied to a real (temporary) RocksDB; bad
//! bytes must give an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            // A committed entry carrying these bytes as its command.
            let dir = tempfile::tempdir().expect("tempdir");
            let disk = seqd::storage::open(dir.path()).expect("open");
            let mut machine = seqd::storage::Machine::open(disk).expect("machine");
            let mut e = Entry::default();
            e.index = machine.applied() + 1;
            e.term = 1;
            e.data = body.to_vec().into();
            let _ = machine.apply(&[e]);
        }
        1 => {
            // A snapshot whose data are these bytes.
            let dir = tempfile::tempdir().expect("tempdir");
            let disk = seqd::storage::open(dir.path()).expect("open");
            let mut store = seqd::storage::RaftStore::open(disk, &[1]).expect("store");
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 10;
            snap.mut_metadata().term = 2;
            snap.mut_metadata().mut_conf_state().voters = vec![1];
            snap.data = body.to_vec().into();
            let _ = store.install_snapshot(&snap);
        }
        _ => {
            let _ = Entry::parse_from_bytes(body);
            let _ = HardState::parse_from_bytes(body);
            let _ = ConfState::parse_from_bytes(body);
        }
    }
});
