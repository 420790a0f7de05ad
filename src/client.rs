//! The Rust client: finds the leader, follows `seqd-leader-addr` hints and
//! retries with backoff until an overall deadline.
//!
//! Retrying `Next` is safe for I1: a call that failed in flight may have
//! taken numbers that are never returned (a hole), never numbers that are
//! returned twice. Give a `request_id` to get the same range back instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb::admin_client::AdminClient;
use crate::pb::sequencer_client::SequencerClient;
use crate::pb::{
    BatchItem, CurrentRequest, NextBatchRequest, NextBatchResponse, NextRequest, NextResponse,
    StatusRequest, StatusResponse,
};
use crate::service::{LEADER_ADDR_HEADER, LEADER_ID_HEADER};

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Give up on a call after this long, retries included.
    pub overall_timeout: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// First and largest pause between attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            overall_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0:?}")]
    BadEndpoint(String),
    /// The server answered with an error that retrying cannot fix.
    #[error("{}: {}", .0.code(), .0.message())]
    Rejected(Status),
    /// Every attempt failed until the overall deadline; the last error.
    #[error("gave up after {attempts} attempts: {}: {}", .last.code(), .last.message())]
    Exhausted { attempts: u32, last: Status },
}

impl ClientError {
    /// The gRPC code of the (last) failure, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Rejected(s) | Self::Exhausted { last: s, .. } => Some(s.code()),
            _ => None,
        }
    }
}

/// A client for a seqd cluster. Cheap to share between tasks.
pub struct Client {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Address of the node believed to lead.
    leader: Mutex<Option<String>>,
    /// Node id → endpoint, learned from the nodes' status: a leader hint
    /// names an address as the cluster sees it (e.g. a compose hostname),
    /// which this client may not reach; its id maps to an endpoint it can.
    ids: Mutex<HashMap<u64, String>>,
    opts: ClientOptions,
}

impl Client {
    /// A client for the nodes at `endpoints` (`host:port`). Connections are
    /// made lazily.
    pub fn new(endpoints: &[impl AsRef<str>], opts: ClientOptions) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        let client = Self {
            endpoints: endpoints.clone(),
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            ids: Mutex::new(HashMap::new()),
            opts,
        };
        for e in &endpoints {
            client.channel(e)?;
        }
        Ok(client)
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| ClientError::BadEndpoint(addr.to_string()))?
            .connect_timeout(Duration::from_millis(500))
            .timeout(self.opts.attempt_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn leader_guess(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_leader(&self, addr: Option<String>) {
        *self
            .leader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
    }

    /// Runs `f` against the leader, following hints and retrying.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.opts.overall_timeout;
        let mut backoff = self.opts.backoff_min;
        let mut rotate = 0usize;
        let mut attempts = 0u32;
        loop {
            let target = self
                .leader_guess()
                .unwrap_or_else(|| self.endpoints[rotate % self.endpoints.len()].clone());
            attempts += 1;
            let status = match f(self.channel(&target)?).await {
                Ok(v) => {
                    self.set_leader(Some(target));
                    return Ok(v);
                }
                Err(status) => status,
            };
            if !retryable(&status) {
                return Err(ClientError::Rejected(status));
            }
            let hint = self.follow_hint(&status, &target).await;
            let followed_hint = hint.is_some();
            if hint.is_none() {
                rotate += 1;
            }
            self.set_leader(hint);
            if Instant::now() >= deadline {
                return Err(ClientError::Exhausted {
                    attempts,
                    last: status,
                });
            }
            // A fresh hint is worth trying at once; anything else waits.
            if !followed_hint {
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                backoff = (backoff * 2).min(self.opts.backoff_max);
            }
        }
    }

    /// The endpoint a leader hint points to, if this client can reach it.
    async fn follow_hint(&self, status: &Status, target: &str) -> Option<String> {
        let addr = status
            .metadata()
            .get(LEADER_ADDR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|a| !a.is_empty())?
            .to_string();
        let hinted = if self.endpoints.contains(&addr) {
            Some(addr)
        } else {
            let id: u64 = status
                .metadata()
                .get(LEADER_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())?;
            if !self.lock_ids().contains_key(&id) {
                self.learn_ids().await;
            }
            self.lock_ids().get(&id).cloned()
        };
        hinted.filter(|a| a != target)
    }

    fn lock_ids(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks every endpoint for its node id.
    async fn learn_ids(&self) {
        for e in &self.endpoints {
            let Ok(ch) = self.channel(e) else { continue };
            let mut admin = AdminClient::new(ch);
            let call = admin.status(StatusRequest {});
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(300), call).await {
                self.lock_ids().insert(r.into_inner().id, e.clone());
            }
        }
    }

    /// `count` consecutive numbers for `key`.
    pub async fn next(
        &self,
        namespace: &str,
        key: &str,
        count: u32,
    ) -> Result<NextResponse, ClientError> {
        self.next_with_id(namespace, key, count, "").await
    }

    /// Like [`Client::next`], with an idempotency token.
    pub async fn next_with_id(
        &self,
        namespace: &str,
        key: &str,
        count: u32,
        request_id: &str,
    ) -> Result<NextResponse, ClientError> {
        let req = NextRequest {
            namespace: namespace.to_string(),
            key: key.to_string(),
            count,
            request_id: request_id.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move {
                SequencerClient::new(ch)
                    .next(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Ranges for many keys of one namespace, all or nothing.
    pub async fn next_batch(
        &self,
        namespace: &str,
        items: &[(&str, u32)],
    ) -> Result<NextBatchResponse, ClientError> {
        let req = NextBatchRequest {
            namespace: namespace.to_string(),
            items: items
                .iter()
                .map(|(k, c)| BatchItem {
                    key: k.to_string(),
                    count: *c,
                })
                .collect(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move {
                SequencerClient::new(ch)
                    .next_batch(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// The highest number that may have been handed out for `key`.
    pub async fn current(&self, namespace: &str, key: &str) -> Result<u64, ClientError> {
        let req = CurrentRequest {
            namespace: namespace.to_string(),
            key: key.to_string(),
        };
        self.call(|ch| {
            let req = req.clone();
            async move {
                SequencerClient::new(ch)
                    .current(req)
                    .await
                    .map(|r| r.into_inner().current)
            }
        })
        .await
    }

    /// Status of the node at `addr` (no retries, no leader following).
    pub async fn node_status(&self, addr: &str) -> Result<StatusResponse, ClientError> {
        AdminClient::new(self.channel(addr)?)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Rejected)
    }
}

/// Errors a retry (possibly on another node) can fix.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}
