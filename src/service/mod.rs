//! gRPC handlers: validate at the edge, call the node, map the outcome.
//! [`status_from`] is the one place node errors become `tonic::Status`.

mod admin;
mod ids;
pub mod sequencer;

pub use admin::AdminService;
pub use ids::IdsService;
pub use sequencer::SequencerService;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::core::InvalidArgument;
use crate::raft::NodeError;
pub use crate::raft::PeerAddrs;

pub use crate::client::{LEADER_ADDR_HEADER, LEADER_ID_HEADER};

/// Tells the call streams the node has stopped: each then ends (its
/// client sees it end and goes on to another node), so the server's
/// graceful shutdown does not wait for clients to close streams they keep
/// open for as long as they live.
#[derive(Debug, Clone)]
pub struct Stopping(tokio::sync::watch::Receiver<bool>);

impl Stopping {
    /// The signal, and what raises it.
    pub fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    /// A signal never raised (its sender is gone).
    pub(crate) fn never() -> Self {
        Self::new().1
    }

    /// `requests` until the signal is raised.
    fn cut<S: futures::Stream>(&self, requests: S) -> impl futures::Stream<Item = S::Item> {
        use futures::StreamExt;
        requests.take_until(self.clone().raised())
    }

    /// Resolves once the signal is raised (never, if its sender is gone
    /// without raising it).
    pub(crate) async fn raised(mut self) {
        if self.0.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A client's call stream (`NextStream`, `NextIdsStream`): counted in
/// its `opened` counter when made, and in its `open` gauge while it lives.
struct OpenStream {
    open: &'static str,
}

impl OpenStream {
    fn new(opened: &'static str, open: &'static str) -> Self {
        metrics::counter!(opened).increment(1);
        metrics::gauge!(open).increment(1.0);
        Self { open }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(self.open).decrement(1.0);
    }
}

/// One public call being served: its latency and outcome are recorded
/// when it ends, as CANCELLED if it ends without an outcome (the client
/// gave up or its deadline passed, and tonic dropped the handler). A call
/// stalled on the cluster is then still counted, and in the histogram.
pub struct Observed {
    op: &'static str,
    start: std::time::Instant,
    done: bool,
}

impl Observed {
    pub fn start(op: &'static str) -> Self {
        Self {
            op,
            start: std::time::Instant::now(),
            done: false,
        }
    }

    pub fn finish<T>(mut self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.record(code);
        self.done = true;
    }

    /// Records nothing: the call is counted elsewhere from here on.
    pub fn dismiss(mut self) {
        self.done = true;
    }

    fn record(&self, code: Code) {
        metrics::histogram!(crate::metrics::REQUEST_SECONDS, "op" => self.op)
            .record(self.start.elapsed().as_secs_f64());
        metrics::counter!(crate::metrics::REQUESTS_TOTAL, "op" => self.op, "code" => code_name(code))
            .increment(1);
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled);
        }
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Metadata carrying the cluster's shared secret (see `node.secret`).
pub const SECRET_HEADER: &str = "seqd-secret";

/// The cluster's shared secret, if one is configured: peer streams and
/// Admin changes must carry it. Kept for the process's life (so that the
/// transport's `Sender` stays `Copy`).
#[derive(Clone, Copy, Default)]
pub struct Secret(Option<&'static str>);

/// Says whether a secret is set, never what it is.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(_) => f.write_str("Secret(set)"),
            None => f.write_str("Secret(none)"),
        }
    }
}

impl Secret {
    /// From the configuration: leaked once, at start.
    pub fn new(secret: Option<&str>) -> Self {
        Self(secret.map(|s| &*Box::leak(s.to_string().into_boxed_str())))
    }

    /// Puts the secret (if any) in `meta`.
    pub fn name_in(&self, meta: &mut tonic::metadata::MetadataMap) {
        if let Some(v) = self.0.and_then(|s| MetadataValue::try_from(s).ok()) {
            meta.insert(SECRET_HEADER, v);
        }
    }

    /// Refuses a caller that does not send the secret, when one is set:
    /// `UNAUTHENTICATED`, naming the metadata (never the secret). The
    /// comparison takes as long whatever the bytes.
    pub fn check(&self, meta: &tonic::metadata::MetadataMap, what: &str) -> Result<(), Status> {
        let Some(ours) = self.0 else {
            return Ok(());
        };
        let theirs = meta
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let differ = theirs.len() != ours.len()
            || theirs
                .iter()
                .zip(ours.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        if differ {
            return Err(Status::unauthenticated(format!(
                "{what} needs the cluster's secret in {SECRET_HEADER} metadata (node.secret, \
                 SEQD_SECRET); it was missing or wrong"
            )));
        }
        Ok(())
    }
}

/// Bad input: nothing was done.
pub fn invalid(e: InvalidArgument) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Maps every node error to a status; leader hints go into metadata.
pub fn status_from(e: NodeError, peers: &PeerAddrs) -> Status {
    match e {
        NodeError::NotLeader { leader: Some(id) } => {
            let addr = peers.get(id).unwrap_or_default();
            let addr = addr.as_str();
            let message = if addr.is_empty() {
                format!("not the leader; the leader is node {id}, whose address this node does not know")
            } else {
                format!("not the leader; the leader is node {id} at {addr}")
            };
            let mut status = Status::new(Code::Unavailable, message);
            // Absent, not empty, when unknown (api.proto): a client that
            // dials whatever the header holds would dial "".
            if let Some(v) = MetadataValue::try_from(addr)
                .ok()
                .filter(|_| !addr.is_empty())
            {
                status.metadata_mut().insert(LEADER_ADDR_HEADER, v);
            }
            status
                .metadata_mut()
                .insert(LEADER_ID_HEADER, MetadataValue::from(id));
            status
        }
        NodeError::NotLeader { leader: None } => {
            Status::unavailable("not the leader, and no leader is known yet")
        }
        NodeError::Exhausted(msg) => Status::resource_exhausted(msg),
        NodeError::RequestIdReused => Status::invalid_argument(e.to_string()),
        NodeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        NodeError::Stopped => Status::unavailable(e.to_string()),
        NodeError::Membership(_) => Status::failed_precondition(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hint names the leader's id, and its address when this node knows
    /// it; the message does not end in a dangling "at".
    #[test]
    fn a_leader_hint_names_the_address_only_when_known() {
        let peers = PeerAddrs::default();
        let hint = |peers: &PeerAddrs| status_from(NodeError::NotLeader { leader: Some(2) }, peers);
        let unknown = hint(&peers);
        assert_eq!(unknown.code(), Code::Unavailable);
        assert_eq!(
            unknown.message(),
            "not the leader; the leader is node 2, whose address this node does not know"
        );
        assert_eq!(unknown.metadata().get(LEADER_ID_HEADER).unwrap(), "2");
        assert!(unknown.metadata().get(LEADER_ADDR_HEADER).is_none());
        peers.set(2, "node2:7000");
        let known = hint(&peers);
        assert_eq!(
            known.message(),
            "not the leader; the leader is node 2 at node2:7000"
        );
        assert_eq!(
            known.metadata().get(LEADER_ADDR_HEADER).unwrap(),
            "node2:7000"
        );
    }
}
