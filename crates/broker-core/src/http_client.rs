//! The broker's HTTP client, for the worker leg and for callbacks: hyper-util's pooled client
//! (keep-alive per origin, idle connections closed after 30 s) over hyper-rustls, trusting the
//! public authorities and those of `BROKER_EXTRA_CA_FILE`. Its TCP connections are opened by a
//! [`Dial`]: a plain resolve-and-connect for the worker, the callback guard's checked dial for
//! receivers (`crate::callback`), which connects only to the addresses it checked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// The error of a connection attempt or an exchange.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection is kept.
const IDLE_TTL: Duration = Duration::from_secs(30);

/// Opens the TCP connection to a URI's host and port.
pub type Dial = Arc<
    dyn Fn(Uri) -> Pin<Box<dyn Future<Output = Result<TcpStream, BoxError>> + Send>> + Send + Sync,
>;

/// A dial that resolves the host and connects to the first address that answers, each
/// within `timeout`.
pub fn plain_dial(timeout: Duration) -> Dial {
    Arc::new(move |uri: Uri| {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let addresses: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            connect_any(&addresses, timeout).await
        })
    })
}

/// Connects to the first of `addresses` that answers within `timeout`.
pub async fn connect_any(
    addresses: &[std::net::SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, BoxError> {
    let mut last: BoxError = "no address to connect to".into();
    for address in addresses {
        match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e.into(),
            Err(_) => last = "connect timed out".into(),
        }
    }
    Err(last)
}

/// The [`Dial`] as the tower service hyper-rustls wraps.
#[derive(Clone)]
pub struct Dialer(Dial);

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = (self.0)(uri);
        Box::pin(async move { Ok(TokioIo::new(dial.await?)) })
    }
}

/// The certificate authorities a client trusts over TLS: the public ones (the webpki roots),
/// and the extra ones of `BROKER_EXTRA_CA_FILE` (a private CA in front of the worker or a
/// callback receiver).
#[derive(Clone, Default)]
pub struct Trust {
    extra: Arc<[rustls::pki_types::CertificateDer<'static>]>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust {{ extra certificates: {} }}", self.extra.len())
    }
}

impl Trust {
    /// The public authorities and every certificate of `pem` (PEM text); an error when it
    /// holds none, or one that cannot be read.
    pub fn with_extra_pem(pem: &[u8]) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let extra = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        if extra.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        let trust = Self {
            extra: extra.into(),
        };
        // A certificate the TLS library refuses as a trust anchor shows now, not on the first
        // request.
        trust.tls_config()?;
        Ok(trust)
    }

    /// A rustls configuration trusting the webpki roots and the extra authorities.
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for certificate in self.extra.iter() {
            roots
                .add(certificate.clone())
                .map_err(|e| format!("not a usable certificate authority: {e}"))?;
        }
        Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
    }
}

/// A pooled HTTP/1.1 client (http and https). Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<Dialer>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// A client whose connections `dial` opens, keeping up to `max_idle` idle connections per
    /// origin.
    pub fn new(dial: Dial, trust: &Trust, max_idle: usize) -> Result<Self, String> {
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(trust.tls_config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Dialer(dial));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TTL)
            .pool_max_idle_per_host(max_idle)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Self { inner })
    }

    /// Sends `request` and returns the answer once its head has come.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, BoxError> {
        Ok(self.inner.request(request).await?)
    }
}

/// Reads at most `limit` bytes of `body` (the rest is dropped with the body).
pub async fn collect(body: &mut Incoming, limit: usize) -> Result<Vec<u8>, BoxError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Whether `error`, or an error in its chain of sources, is an `E`.
pub fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

/// `Retry-After` in whole seconds, when it is given as a number.
pub fn retry_after<B>(response: &Response<B>) -> Option<u64> {
    response
        .headers()
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
