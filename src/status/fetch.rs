//! Where `carousel status` reads from: the `--metrics-url` forms it accepts, and one GET
//! of it through hyper's HTTP/1 client, under a time limit and a size limit.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::StatusError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest body `fetch` reads: /metrics of 500 000 endpoints is well under it.
pub(crate) const MAX_BODY: usize = 256 << 20;

/// How long `fetch` waits for the whole answer.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain-HTTP URL of a carousel's /metrics: `http://HOST:PORT/PATH`, or `HOST:PORT`
/// for `http://HOST:PORT/metrics`. An IPv6 host is written in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsUrl {
    /// `HOST:PORT`, as it goes into the Host header and to the resolver.
    authority: String,
    /// From the first `/`, with any query.
    path: String,
}

impl FromStr for MetricsUrl {
    type Err = StatusError;

    fn from_str(url: &str) -> Result<Self, StatusError> {
        let bad = |why: &str| StatusError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(bad(
                    "carousel serves /metrics over plain HTTP: use http://HOST:PORT/metrics or HOST:PORT",
                ))
            }
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "{scheme}:// is not HTTP: use http://HOST:PORT/metrics or HOST:PORT"
                )))
            }
            None => url,
        };
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        check_authority(authority).map_err(bad)?;
        let path = match path {
            "" | "/" => "/metrics".to_string(),
            p if p.starts_with('?') => format!("/metrics{p}"),
            p => p.to_string(),
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the path holds a space or a control character"));
        }
        Ok(MetricsUrl {
            authority: authority.to_string(),
            path,
        })
    }
}

/// `HOST:PORT` with a port from 1 to 65535 and a host that is a name, an IPv4 address
/// or an IPv6 address in brackets.
fn check_authority(authority: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (ip, port) = inner
            .split_once(']')
            .ok_or("an IPv6 address lacks its closing ]")?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address in the brackets")?;
        let port = port
            .strip_prefix(':')
            .ok_or("name a port after the brackets, as [::1]:10249")?;
        (ip, port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or("name a port, as 127.0.0.1:10249")?;
        if host.contains(':') {
            return Err("write an IPv6 address in brackets, as [::1]:10249");
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("no host");
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@')
    {
        return Err("not a host name");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port is not a number from 1 to 65535"),
    }
}

impl fmt::Display for MetricsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// GETs `url` and returns the body.
pub async fn fetch(url: &MetricsUrl) -> Result<String, StatusError> {
    fetch_at_most(url, MAX_BODY).await
}

/// `fetch`, refusing a body over `limit` bytes.
pub(crate) async fn fetch_at_most(url: &MetricsUrl, limit: usize) -> Result<String, StatusError> {
    let failed = |source: BoxError| StatusError::Fetch {
        url: url.to_string(),
        source,
    };
    let exchange = async {
        let stream = TcpStream::connect(url.authority.as_str()).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection ends when `sender` is dropped, at the end of this exchange.
        tokio::spawn(connection);
        let request = Request::get(url.path.as_str())
            .header(HOST, url.authority.as_str())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await?
            .to_bytes();
        Ok::<_, BoxError>((status, body))
    };
    let (status, body) = tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer in {FETCH_TIMEOUT:?}").into()))?
        .map_err(|source| match source.is::<LengthLimitError>() {
            true => StatusError::TooLarge {
                url: url.to_string(),
                limit,
            },
            false => failed(source),
        })?;
    if status != StatusCode::OK {
        return Err(StatusError::Status {
            url: url.to_string(),
            status: status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> MetricsUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refused(s: &str) -> String {
        s.parse::<MetricsUrl>().unwrap_err().to_string()
    }

    #[test]
    fn urls_take_the_http_and_the_host_port_forms() {
        assert_eq!(url("http://a:1").to_string(), "http://a:1/metrics");
        assert_eq!(url("http://a:1/").to_string(), "http://a:1/metrics");
        assert_eq!(url("http://a:1/x?y").to_string(), "http://a:1/x?y");
        assert_eq!(
            url("127.0.0.1:10249").to_string(),
            "http://127.0.0.1:10249/metrics"
        );
        assert_eq!(
            url("node-1.example:80/m").to_string(),
            "http://node-1.example:80/m"
        );
        assert_eq!(url("[::1]:10249").to_string(), "http://[::1]:10249/metrics");
        assert_eq!(
            url("http://[fd00::1]:10249/metrics").authority,
            "[fd00::1]:10249"
        );
    }

    #[test]
    fn urls_that_cannot_reach_a_carousel_are_refused_saying_why() {
        assert!(refused("https://a:1/metrics").contains("plain HTTP"));
        assert!(refused("ftp://a:1").contains("ftp:// is not HTTP"));
        assert!(refused("http:///metrics").contains("name a port"));
        assert!(refused("http://:1/metrics").contains("no host"));
        assert!(refused("localhost").contains("name a port"));
        assert!(refused("a:0").contains("1 to 65535"));
        assert!(refused("a:99999").contains("1 to 65535"));
        assert!(refused("::1:10249").contains("in brackets"));
        assert!(refused("[::1]").contains("after the brackets"));
        assert!(refused("[zz]:1").contains("IPv6"));
        assert!(refused("user@a:1").contains("not a host name"));
        assert_eq!(
            refused("https://a:1"),
            "https://a:1: carousel serves /metrics over plain HTTP: use http://HOST:PORT/metrics or HOST:PORT"
        );
    }

    /// A one-shot HTTP server on port 0 that answers `response` and hands back the
    /// request it read.
    async fn answering(response: String) -> (String, tokio::task::JoinHandle<String>) {
        answering_at("127.0.0.1:0", response).await
    }

    /// `answering`, on `addr`.
    async fn answering_at(
        addr: &str,
        response: String,
    ) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before its request ended");
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (addr.to_string(), served)
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn fetch_gets_the_metrics_path_and_returns_the_body() {
        let (authority, served) = answering(ok("carousel_up 1\n")).await;
        let body = fetch(&url(&authority)).await.unwrap();
        assert_eq!(body, "carousel_up 1\n");
        let request = served.await.unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_lowercase()
                .contains(&format!("host: {authority}")),
            "{request}"
        );
    }

    #[tokio::test]
    async fn fetch_reaches_an_ipv6_address_in_brackets() {
        let (authority, served) = answering_at("[::1]:0", ok("carousel_up 1\n")).await;
        assert!(authority.starts_with("[::1]:"), "{authority}");
        assert_eq!(fetch(&url(&authority)).await.unwrap(), "carousel_up 1\n");
        let request = served.await.unwrap().to_lowercase();
        assert!(request.contains(&format!("host: {authority}")), "{request}");
    }

    #[tokio::test]
    async fn fetch_names_a_status_other_than_ok() {
        let (authority, _served) =
            answering("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into()).await;
        let error = fetch(&url(&format!("http://{authority}/nope")))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("answered 404 Not Found"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn fetch_refuses_a_body_over_its_limit() {
        let (authority, _served) = answering(ok(&"x".repeat(2000))).await;
        let error = fetch_at_most(&url(&format!("http://{authority}/")), 1000)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("http://{authority}/metrics answered more than 1000 bytes")
        );
    }

    #[tokio::test]
    async fn fetch_names_a_server_that_is_not_there() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = format!("http://{}/metrics", listener.local_addr().unwrap());
        drop(listener);
        let error = fetch(&url(&at)).await.unwrap_err();
        assert!(
            error.to_string().starts_with(&format!("cannot read {at}")),
            "{error}"
        );
    }
}
