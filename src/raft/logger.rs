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
        // Before the fields are formatted: raft-rs logs every message it
        // sends at debug level with the whole message, a snapshot's
        // megabytes and every entry's bytes included. Formatted and then
        // dropped, that took the node loop seconds per snapshot of a large
        // state (in builds where slog keeps debug records).
        let enabled = match record.level() {
            Level::Critical | Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
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
