//! What a seqd node itself says about the calls it served: its request
//! duration histogram (`seqd_request_duration_seconds`, every RPC and
//! stream batch, from arrival at the handler to the answer), read from
//! `/metrics` before and after a window. Set beside the harness's own
//! latency, it tells the node's share of a tail from the share of the load
//! generator and of waiting for a core.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const METRIC: &str = "seqd_request_duration_seconds_bucket{";

/// A cumulative histogram: (upper bound in seconds, count at or below),
/// ascending bounds, `+Inf` as infinity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, u64)>);

impl Buckets {
    /// Parses every `seqd_request_duration_seconds_bucket` line of a
    /// Prometheus text page, summing over the other labels (every kind of
    /// request). Summing cumulative counts bound by bound is right because
    /// every series has the same bounds (seqd's `metrics::BUCKETS`).
    pub fn parse(page: &str) -> Self {
        let mut sums: Vec<(f64, u64)> = Vec::new();
        for line in page.lines().filter(|l| l.starts_with(METRIC)) {
            let Some((labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(count) = value.parse::<f64>() else {
                continue;
            };
            let Some(le) = labels
                .split(['{', ',', '}'])
                .find_map(|l| l.strip_prefix("le=\""))
                .and_then(|l| l.strip_suffix('"'))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            match sums.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += count as u64,
                None => sums.push((le, count as u64)),
            }
        }
        sums.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(sums)
    }

    /// Adds `other`'s counts bound by bound (several nodes' pages).
    pub fn add(&mut self, other: &Self) {
        for &(le, c) in &other.0 {
            match self.0.iter_mut().find(|(b, _)| *b == le) {
                Some((_, mine)) => *mine += c,
                None => self.0.push((le, c)),
            }
        }
        self.0.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// What was counted after `before` (the same node, later).
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(le, c)| {
                    let then = before
                        .0
                        .iter()
                        .find(|(b, _)| *b == le)
                        .map_or(0, |(_, c)| *c);
                    (le, c.saturating_sub(then))
                })
                .collect(),
        )
    }

    /// Requests counted.
    pub fn total(&self) -> u64 {
        self.0.last().map_or(0, |(_, c)| *c)
    }

    /// The upper bound, in ms, of the bucket holding quantile `q`: at least
    /// that share of requests took no longer (infinity past the last finite
    /// bound). `None` without requests.
    pub fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        self.0
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| le * 1000.0)
    }
}

/// `GET /metrics` from `addr`, the page's text; `None` if the node does
/// not answer within a second.
pub fn scrape(addr: &str) -> Option<String> {
    let timeout = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    // HTTP/1.0: the answer cannot come chunked, and ends with the
    // connection.
    // One write: a request in pieces may find the server closing after
    // the first, which resets the connection.
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, page) = body.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    (status.starts_with("HTTP/1.") && status.split(' ').nth(1) == Some("200"))
        .then(|| page.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# TYPE seqd_request_duration_seconds histogram
seqd_request_duration_seconds_bucket{op="NextBatch",le="0.0001"} 90
seqd_request_duration_seconds_bucket{op="NextBatch",le="0.0005"} 99
seqd_request_duration_seconds_bucket{op="NextBatch",le="0.001"} 100
seqd_request_duration_seconds_bucket{op="NextBatch",le="+Inf"} 100
seqd_request_duration_seconds_bucket{op="NextIds",le="0.0001"} 10
seqd_request_duration_seconds_bucket{op="NextIds",le="0.0005"} 10
seqd_request_duration_seconds_bucket{op="NextIds",le="0.001"} 10
seqd_request_duration_seconds_bucket{op="NextIds",le="+Inf"} 10
seqd_request_duration_seconds_sum{op="NextBatch"} 0.02
seqd_requests_total{op="NextBatch",code="OK"} 100
"#;

    /// Serves one connection with `answer` after reading the whole
    /// request (closing with some of it unread would reset the connection).
    fn serve_once(answer: &'static str) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 256];
            while !request.ends_with(b"\r\n\r\n") {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = conn.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn a_page_is_read_whole_and_only_from_a_200() {
        let ok = serve_once("HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\na\nb c\n");
        assert_eq!(scrape(&ok).as_deref(), Some("a\nb c\n"));
        let missing = serve_once("HTTP/1.0 404 Not Found\r\n\r\nnope");
        assert_eq!(scrape(&missing), None);
    }

    #[test]
    fn buckets_sum_every_kind_of_request() {
        let b = Buckets::parse(PAGE);
        assert_eq!(
            b.0,
            [
                (0.0001, 100),
                (0.0005, 109),
                (0.001, 110),
                (f64::INFINITY, 110)
            ]
        );
        assert_eq!(b.total(), 110);
    }

    #[test]
    fn a_quantile_is_the_bound_of_its_bucket_in_the_window() {
        let before = Buckets::parse(PAGE);
        let mut after = before.clone();
        // 100 more requests: 50 under 0.1 ms, 49 more under 0.5 ms, one
        // over 1 ms.
        after.add(&Buckets(vec![
            (0.0001, 50),
            (0.0005, 99),
            (0.001, 99),
            (f64::INFINITY, 100),
        ]));
        let window = after.since(&before);
        assert_eq!(window.total(), 100);
        assert_eq!(window.quantile_bound_ms(0.5), Some(0.1));
        assert_eq!(window.quantile_bound_ms(0.99), Some(0.5));
        // The slowest one is past every finite bound.
        assert_eq!(window.quantile_bound_ms(0.999), Some(f64::INFINITY));
        assert_eq!(Buckets::default().quantile_bound_ms(0.99), None);
    }
}
