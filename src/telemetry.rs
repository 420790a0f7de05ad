//! Logging set-up: `tracing` with the level from `SEQD_LOG` (or `RUST_LOG`),
//! text or JSON lines.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, at start-up.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("SEQD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,raft=warn,h2=warn,tower=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
