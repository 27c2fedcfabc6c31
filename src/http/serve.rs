//! The HTTP listener. `axum::serve` sets no timer, so a half-sent request or
//! a silent connection stays open forever; this accept loop serves each
//! connection with hyper's header-read timeout (which also bounds how long
//! a kept-alive connection may sit idle between requests) and a bound on
//! header size, caps open connections in total and per client address, and
//! shuts down gracefully: every connection task is tracked and awaited.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::ApiError;
use tower::ServiceExt as _;

use crate::budget::{Budget, Taken};
pub use crate::config::ConnLimits;

/// How long shutdown waits for connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` completes, then lets open
/// connections finish (at most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let counts = Counts::new(&limits);
    let tasks = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors, mostly: let some close.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let guard = match counts.admit(addr.ip()) {
            Ok(guard) => guard,
            Err(refusal) => {
                refuse(&tcp, refusal);
                continue;
            }
        };
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        tasks.spawn(connection(
            tcp,
            addr,
            router.clone(),
            limits.clone(),
            closing.clone(),
            guard,
        ));
    }
    drop(listener);
    closing.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "connections still open after the drain period"
        );
    }
}

async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    router: Router,
    limits: ConnLimits,
    closing: CancellationToken,
    _guard: Admitted,
) {
    let service = router.map_request(move |req: Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(addr));
        req
    });
    let service = TowerToHyperService::new(service);
    // HTTP/1.1 only: its header timer runs from the connection's first
    // moment (protocol sniffing for h2c would wait untimed for bytes, and
    // h2 has no idle timeout). Browsers speak h2 only over TLS, i.e. to the
    // reverse proxy in front.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A head that does not fit the read buffer is answered 431.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(128);
    let conn = builder
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            return;
        }
        () = closing.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    if let Err(err) = conn.await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerClient,
}

/// Writes a short error response (without reading the request) and closes.
/// Never blocks: a fresh socket's send buffer has room for it.
fn refuse(tcp: &TcpStream, why: Refusal) {
    let error = match why {
        Refusal::Total => ApiError::Unavailable(
            "too_many_connections",
            "the server has as many open connections as it takes; try again shortly".into(),
        ),
        Refusal::PerClient => ApiError::RateLimited(
            "too_many_connections",
            "this address has as many open connections as one client may have (--max-connections-per-client)"
                .into(),
            std::time::Duration::from_secs(1),
        ),
    };
    // The one envelope, written by hand only because no request was read.
    let body = serde_json::to_string(&error.envelope()).expect("envelopes serialize");
    let status = error.status();
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
    tracing::debug!(?why, "refused a connection");
}

/// The address a limit counts a client by: an IPv4 address, or the /64 of
/// an IPv6 one (one host usually has a whole /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Open connections, in total (under the key `()`) and per client.
struct Counts {
    total: Arc<Budget<()>>,
    per_client: Arc<Budget<IpAddr>>,
}

/// One admitted connection; dropping it frees its places.
type Admitted = (Taken<()>, Taken<IpAddr>);

impl Counts {
    fn new(limits: &ConnLimits) -> Self {
        Self {
            total: Budget::new(limits.max_connections),
            per_client: Budget::new(limits.max_per_client),
        }
    }

    fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let total = self.total.take((), 1).ok_or(Refusal::Total)?;
        let mine = self
            .per_client
            .take(client_key(ip), 1)
            .ok_or(Refusal::PerClient)?;
        Ok((total, mine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_per_client: per,
            header_timeout: Duration::from_secs(1),
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn caps_count_open_connections_and_free_them_on_drop() {
        let counts = Counts::new(&limits(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = counts.admit(a).unwrap();
        let _a2 = counts.admit(a).unwrap();
        assert_eq!(counts.admit(a).err(), Some(Refusal::PerClient));
        let _b1 = counts.admit(b).unwrap();
        assert_eq!(counts.admit(b).err(), Some(Refusal::Total));
        drop(a1);
        let _a3 = counts.admit(a).unwrap();
        drop((_a2, _a3, _b1));
        assert!(counts.total.is_empty());
        assert!(
            counts.per_client.is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(one), client_key(two));
        assert_ne!(client_key(one), client_key(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
