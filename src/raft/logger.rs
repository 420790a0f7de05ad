//! Routes raft-rs's slog records into `tracing`, so the node has one log.

use slog::{Drain, Level, OwnedKVList, Record, KV};

struct TracingDrain;

/// Collects a record's key-value pairs into one string.
struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "raft", fields = %fields.0, "{msg}")
            }
            Level::Warning => tracing::warn!(target: "raft", fields = %fields.0, "{msg}"),
            Level::Info => tracing::info!(target: "raft", fields = %fields.0, "{msg}"),
            Level::Debug => tracing::debug!(target: "raft", fields = %fields.0, "{msg}"),
            Level::Trace => tracing::trace!(target: "raft", fields = %fields.0, "{msg}"),
        }
        Ok(())
    }
}

pub(crate) fn raft_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => node_id))
}
