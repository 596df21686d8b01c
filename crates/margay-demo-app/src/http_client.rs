//! A minimal HTTP/1.1 GET client: our own resolve and connect (see [`crate::net`]) and hyper's
//! HTTP/1 connection over the socket, so that a failure says exactly which step failed and why.
//! One connection per request (`Connection: close`): every request is a new flow through the
//! dataplane, as the lab's checks want.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::failure::{Failure, FailureKind};
use crate::net::{Deadline, connect_host, within};

/// An HTTP answer, whatever its status.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
    /// The address we were connected to.
    pub remote: SocketAddr,
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub host: String,
    pub port: u16,
    /// What goes in the Host header: the URL's authority as written.
    pub authority: String,
    pub path_and_query: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<Self, Failure> {
        let bad =
            |why: &str| Failure::new(FailureKind::Other, format!("invalid URL {url:?}: {why}"));
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other:?} is not supported, only http"
                )));
            }
            None => return Err(bad("no scheme (write http://HOST/...)")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
        })
    }
}

/// GETs `url`; `timeout` bounds the lookup, then the connection and the whole answer.
pub async fn get(url: &str, timeout: Duration) -> Result<HttpResponse, Failure> {
    let target = HttpTarget::parse(url)?;
    let deadline = Deadline::start(timeout);
    let stream = connect_host(&target.host, target.port, deadline).await?;
    let remote = stream
        .peer_addr()
        .map_err(|e| Failure::io("connected socket", &e))?;
    let what = format!("GET {url} ({remote})");
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| of_hyper(&what, &e))?;
        // Drives the socket; ends when the response is read and the connection closes, or soon
        // after the deadline (which the caller sees first, as a timeout), so that an upstream
        // that never answers leaves no task behind.
        let linger = deadline.at + Duration::from_secs(1);
        tokio::spawn(tokio::time::timeout_at(linger, connection));
        let request = Request::get(target.path_and_query.as_str())
            .header(HOST, target.authority.as_str())
            .header(
                USER_AGENT,
                concat!("margay-demo-app/", env!("CARGO_PKG_VERSION")),
            )
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::new(FailureKind::Other, format!("{what}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| of_hyper(&what, &e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| of_hyper(&what, &e))?
            .to_bytes();
        Ok(HttpResponse {
            status,
            body,
            remote,
        })
    };
    within_result(deadline, &what, exchange).await
}

async fn within_result<T>(
    deadline: Deadline,
    what: &str,
    step: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    within(deadline, what, async { Ok(step.await) }).await?
}

/// Classifies a hyper error by the I/O error under it, if any, and otherwise describes it by its
/// innermost cause (a failed connection surfaces as "canceled" caused by the real error).
fn of_hyper(what: &str, error: &hyper::Error) -> Failure {
    let mut innermost: &(dyn std::error::Error + 'static) = error;
    let mut incomplete = error.is_incomplete_message();
    while let Some(cause) = innermost.source() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Failure::io(what, io);
        }
        incomplete |= cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message);
        innermost = cause;
    }
    if incomplete {
        return Failure::new(
            FailureKind::Reset,
            format!("{what}: connection closed before an answer"),
        );
    }
    Failure::new(FailureKind::Other, format!("{what}: {innermost}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls() {
        let t = HttpTarget::parse("http://summary:80/").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path_and_query.as_str()
            ),
            ("summary", 80, "summary:80", "/")
        );
        let t = HttpTarget::parse("http://database.yaobank.svc.cluster.local").unwrap();
        assert_eq!((t.port, t.path_and_query.as_str()), (80, "/"));
        let t = HttpTarget::parse("http://[fd00::1]:2379/v2/keys?recursive=true").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path_and_query.as_str()),
            ("fd00::1", 2379, "/v2/keys?recursive=true")
        );
        assert!(HttpTarget::parse("https://summary/").is_err());
        assert!(HttpTarget::parse("summary:80").is_err());
        assert!(HttpTarget::parse("/only/a/path").is_err());
    }
}
