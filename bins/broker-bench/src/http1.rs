//! The load generator's HTTP/1.1 client: one request and its (streamed) answer per exchange,
//! on pooled keep-alive connections. It is part of the measuring instrument, not of the
//! broker: the bench shares the machine with the processes it measures, and this client
//! costs it less CPU per request than hyper's pooled client, so that less of the machine
//! goes to the load itself. The broker's own client is hyper's (`broker_core::http_client`).
//!
//! What it speaks: `Content-Length`, `chunked` and close-delimited bodies; `Connection: close`;
//! informational (1xx) answers are skipped. A connection goes back to the pool only after its
//! answer was read to the end. A request that fails on a reused connection before any byte
//! of the answer came back is sent once more on a new one (the server closed the idle
//! connection as the request left).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// A connection's buffer to begin with; it grows only for a larger head or chunk-size line.
const INITIAL_BUFFER: usize = 1024;
/// The least free room a read is given.
const MIN_READ: usize = 512;
/// Idle connections kept (unless [`Client::keep_idle`] says otherwise), and for how long.
const MAX_IDLE: usize = 64;
const IDLE_TTL: Duration = Duration::from_secs(30);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where requests go, and how to reach it.
struct Target {
    host: String,
    port: u16,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// A client for one origin. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Client {
    target: Arc<Target>,
    connect_timeout: Duration,
    idle: Arc<Pool>,
}

/// The idle connections of a client and its clones, at most `max` of them, the most recently
/// used at the back. A request takes from the back (the connection least likely to have been
/// closed by the server); a connection given back first closes those at the front that have
/// been idle for [`IDLE_TTL`], so a pool sized for a burst does not keep its sockets open for
/// long after it.
struct Pool {
    idle: Mutex<VecDeque<Conn>>,
    max: usize,
}

impl Pool {
    fn keeping(max: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(VecDeque::new()),
            max,
        })
    }
}

/// Drops the connections at the front of `idle` that have been idle too long.
fn close_stale(idle: &mut VecDeque<Conn>) {
    while idle
        .front()
        .is_some_and(|conn| conn.idle_since.elapsed() >= IDLE_TTL)
    {
        idle.pop_front();
    }
}

struct Conn {
    io: Box<dyn Io>,
    /// Bytes read and not consumed yet: `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    reused: bool,
    idle_since: Instant,
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Body {
    Length(u64),
    /// In a chunk with this much left, or (None) before a chunk-size line.
    Chunked(Option<u64>),
    /// Data ended; the CRLF after a chunk's data is due.
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

/// An answer whose head was read. Its body is read with [`Response::next`].
pub struct Response {
    pub status: u16,
    conn: Option<Conn>,
    body: Body,
    keep_alive: bool,
    idle: Arc<Pool>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body", &self.body)
            .finish()
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Client {
    /// A client for the origin of `url` (`http` or `https`, trusting the public authorities).
    pub fn new(url: &Uri, connect_timeout: Duration) -> Result<Self, String> {
        Self::build(url, connect_timeout)
    }

    fn build(url: &Uri, connect_timeout: Duration) -> Result<Self, String> {
        let host = url
            .host()
            .ok_or_else(|| "no host".to_owned())?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let (tls, default_port) = match url.scheme_str() {
            Some("http") => (None, 80),
            Some("https") => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("{host}: {e}"))?;
                (Some((tls_connector()?, name)), 443)
            }
            _ => return Err("the scheme must be http or https".into()),
        };
        Ok(Self {
            target: Arc::new(Target {
                port: url.port_u16().unwrap_or(default_port),
                host,
                tls,
            }),
            connect_timeout,
            idle: Pool::keeping(MAX_IDLE),
        })
    }

    /// The same client keeping up to `max` idle connections instead of 64 (a drainer keeps as
    /// many as it runs turns at once, a load generator one for each of its clients). Call it
    /// before the first request: the pool is replaced.
    pub fn keep_idle(mut self, max: usize) -> Self {
        self.idle = Pool::keeping(max);
        self
    }

    /// Sends `head` (request line and headers, ending in the empty line) and `body`, and reads
    /// the answer's head.
    pub async fn request(&self, head: &[u8], body: &[u8]) -> io::Result<Response> {
        let mut message = Vec::with_capacity(head.len() + body.len());
        message.extend_from_slice(head);
        message.extend_from_slice(body);
        loop {
            let mut conn = match self.checkout() {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            let reused = conn.reused;
            match conn.exchange(&message).await {
                Ok((status, body, keep_alive)) => {
                    return Ok(Response {
                        status,
                        conn: Some(conn),
                        body,
                        keep_alive,
                        idle: self.idle.clone(),
                    })
                }
                // Nothing came back on a connection the server may have just closed: the
                // request was not read, so it goes again on a new connection.
                Err(Exchange::NoAnswer(_)) if reused => continue,
                Err(Exchange::NoAnswer(e) | Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    /// An idle connection that is still open, if any.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.idle.lock().ok()?;
        while let Some(mut conn) = idle.pop_back() {
            if conn.idle_since.elapsed() < IDLE_TTL && conn.still_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> io::Result<Conn> {
        let target = &self.target;
        let open = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let io: Box<dyn Io> = match &target.tls {
                None => Box::new(tcp),
                Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            };
            Ok::<_, io::Error>(io)
        };
        let io = tokio::time::timeout(self.connect_timeout, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        Ok(Conn {
            io,
            buf: Vec::with_capacity(INITIAL_BUFFER),
            start: 0,
            reused: false,
            idle_since: Instant::now(),
        })
    }
}

/// A TLS connector trusting the webpki roots, speaking HTTP/1.1; built once.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    CONNECTOR.get_or_init(new_tls_connector).clone()
}

fn new_tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

enum Exchange {
    /// Failed before the first byte of the answer.
    NoAnswer(io::Error),
    Failed(io::Error),
}

impl Conn {
    fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Reads more into the buffer; 0 at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(self.buf.capacity().max(MIN_READ));
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Is the idle connection still usable: not closed by the server, nothing unasked sent?
    fn still_open(&mut self) -> bool {
        if self.buffered() > 0 {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    async fn exchange(&mut self, message: &[u8]) -> Result<(u16, Body, bool), Exchange> {
        self.io
            .write_all(message)
            .await
            .map_err(Exchange::NoAnswer)?;
        self.io.flush().await.map_err(Exchange::NoAnswer)?;
        loop {
            let head = self.read_head().await?;
            if (100..200).contains(&head.0) && head.0 != 101 {
                continue;
            }
            return Ok(head);
        }
    }

    /// Reads and parses one response head.
    async fn read_head(&mut self) -> Result<(u16, Body, bool), Exchange> {
        let mut first = true;
        loop {
            if self.buffered() > 0 {
                let mut headers = [httparse::EMPTY_HEADER; 48];
                let mut response = httparse::Response::new(&mut headers);
                match response.parse(&self.buf[self.start..]) {
                    Ok(httparse::Status::Complete(len)) => {
                        let parsed = head_of(&response).map_err(Exchange::Failed)?;
                        self.start += len;
                        return Ok(parsed);
                    }
                    Ok(httparse::Status::Partial) if self.buffered() < MAX_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(Exchange::Failed(invalid("response head too large")))
                    }
                    Err(e) => return Err(Exchange::Failed(invalid(format!("bad response: {e}")))),
                }
            }
            let n = match self.fill().await {
                Ok(n) => n,
                Err(e) if first => return Err(Exchange::NoAnswer(e)),
                Err(e) => return Err(Exchange::Failed(e)),
            };
            if n == 0 {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
                return Err(if first {
                    Exchange::NoAnswer(e)
                } else {
                    Exchange::Failed(e)
                });
            }
            first = false;
        }
    }

    /// Index of the end of the next line (its LF) in the buffer, reading more as needed.
    async fn line(&mut self) -> io::Result<usize> {
        loop {
            if let Some(i) = self.buf[self.start..].iter().position(|b| *b == b'\n') {
                return Ok(self.start + i);
            }
            if self.buffered() > 4096 {
                return Err(invalid("chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(eof());
            }
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the answer ended early")
}

/// Status, `Retry-After`, body framing and keep-alive of a parsed head.
fn head_of(response: &httparse::Response<'_, '_>) -> io::Result<(u16, Body, bool)> {
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            } else if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            {
                keep_alive = true;
            }
        }
    }
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Body::Done
    } else if chunked {
        Body::Chunked(None)
    } else if let Some(n) = length {
        Body::Length(n)
    } else {
        keep_alive = false;
        Body::UntilClose
    };
    Ok((status, body, keep_alive))
}

impl Response {
    /// The next piece of the body, `None` at its end (the connection then goes back to the
    /// pool).
    pub async fn next(&mut self) -> io::Result<Option<&[u8]>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let range = loop {
            match self.body {
                Body::Done => break None,
                Body::Length(0) => self.body = Body::Done,
                Body::Length(left) | Body::Chunked(Some(left)) => {
                    if conn.buffered() == 0 && conn.fill().await? == 0 {
                        return Err(eof());
                    }
                    let take = conn
                        .buffered()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let range = conn.start..conn.start + take;
                    conn.start += take;
                    let left = left - take as u64;
                    self.body = match self.body {
                        Body::Length(_) => Body::Length(left),
                        _ if left == 0 => Body::ChunkEnd,
                        _ => Body::Chunked(Some(left)),
                    };
                    break Some(range);
                }
                Body::Chunked(None) => {
                    let end = conn.line().await?;
                    let size = chunk_size(&conn.buf[conn.start..end])?;
                    conn.start = end + 1;
                    self.body = if size == 0 {
                        Body::Trailers
                    } else {
                        Body::Chunked(Some(size))
                    };
                }
                Body::ChunkEnd => {
                    let end = conn.line().await?;
                    if !conn.buf[conn.start..end].iter().all(|b| *b == b'\r') {
                        return Err(invalid("no CRLF after a chunk"));
                    }
                    conn.start = end + 1;
                    self.body = Body::Chunked(None);
                }
                Body::Trailers => {
                    let end = conn.line().await?;
                    let empty = conn.buf[conn.start..end].iter().all(|b| *b == b'\r');
                    conn.start = end + 1;
                    if empty {
                        self.body = Body::Done;
                    }
                }
                Body::UntilClose => {
                    if conn.buffered() == 0 && conn.fill().await? == 0 {
                        self.body = Body::Done;
                        continue;
                    }
                    let range = conn.start..conn.buf.len();
                    conn.start = conn.buf.len();
                    break Some(range);
                }
            }
        };
        match range {
            Some(range) => Ok(self.conn.as_ref().map(|c| &c.buf[range])),
            None => {
                self.release();
                Ok(None)
            }
        }
    }

    /// The whole body, up to `limit` bytes (the rest is dropped).
    pub async fn collect(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(piece) = self.next().await? {
            let room = limit.saturating_sub(all.len());
            all.extend_from_slice(&piece[..piece.len().min(room)]);
        }
        Ok(all)
    }

    fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.keep_alive || conn.buffered() > 0 {
            return;
        }
        conn.buf.clear();
        conn.start = 0;
        if conn.buf.capacity() > INITIAL_BUFFER * 4 {
            conn.buf = Vec::with_capacity(INITIAL_BUFFER);
        }
        conn.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.idle.lock() {
            close_stale(&mut idle);
            if idle.len() < self.idle.max {
                idle.push_back(conn);
            }
        }
    }
}

/// The size in a chunk-size line (hex, before any `;extension`). The API's transport decodes
/// request bodies with it too.
pub fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .split(|b| *b == b';' || *b == b'\r')
        .next()
        .unwrap_or_default();
    let text = std::str::from_utf8(digits)
        .map_err(|_| invalid("bad chunk size"))?
        .trim();
    if text.is_empty() || text.len() > 15 {
        return Err(invalid("bad chunk size"));
    }
    u64::from_str_radix(text, 16).map_err(|_| invalid("bad chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server on loopback that answers each connection's requests with `answers`, written
    /// in pieces of `piece` bytes; returns the client and how many connections it accepted.
    async fn server(answers: Vec<&'static str>, piece: usize) -> (Client, Arc<Mutex<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(Mutex::new(0usize));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                *count.lock().expect("lock") += 1;
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for answer in answers {
                        // One request: head and a 2-byte body.
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = socket.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        for bytes in answer.as_bytes().chunks(piece) {
                            if socket.write_all(bytes).await.is_err() {
                                return;
                            }
                            let _ = socket.flush().await;
                            tokio::task::yield_now().await;
                        }
                    }
                });
            }
        });
        let url: Uri = format!("http://127.0.0.1:{port}/").parse().expect("url");
        (
            Client::new(&url, Duration::from_secs(2)).expect("client"),
            accepted,
        )
    }

    const HEAD: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n";

    async fn body_of(response: &mut Response) -> String {
        String::from_utf8(response.collect(1 << 20).await.expect("body")).expect("utf8")
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_reads_and_the_connection_is_reused() {
        let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";
        for piece in [1, 3, 7, 1000] {
            let (client, accepted) = server(vec![answer, answer], piece).await;
            for _ in 0..2 {
                let mut response = client.request(HEAD, b"{}").await.expect("request");
                assert_eq!(response.status, 200);
                assert_eq!(body_of(&mut response).await, "hello 0123456789");
            }
            assert_eq!(*accepted.lock().expect("lock"), 1, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn informational_heads_are_skipped_and_length_and_close_are_read() {
        let busy = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy";
        let last = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end";
        let (client, accepted) = server(vec![busy, last], 5).await;
        let mut response = client.request(HEAD, b"{}").await.expect("request");
        assert_eq!(response.status, 429);
        assert_eq!(body_of(&mut response).await, "busy");
        let mut response = client.request(HEAD, b"{}").await.expect("request");
        assert_eq!(response.status, 200);
        assert_eq!(body_of(&mut response).await, "until the end");
        assert_eq!(*accepted.lock().expect("lock"), 1);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_bad_head_is_refused() {
        let (client, _) = server(
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort"],
            100,
        )
        .await;
        let mut response = client.request(HEAD, b"{}").await.expect("request");
        assert!(response.collect(100).await.is_err());

        let (client, _) = server(vec!["HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"], 100).await;
        let err = client.request(HEAD, b"{}").await.expect_err("bad length");
        assert!(err.to_string().contains("content-length"), "{err}");

        let (client, _) = server(
            vec!["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            100,
        )
        .await;
        let mut response = client.request(HEAD, b"{}").await.expect("request");
        let err = response.collect(100).await.expect_err("bad size");
        assert!(err.to_string().contains("chunk size"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_reused() {
        // One answer per connection, then the server closes it.
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (client, accepted) = server(vec![answer], 100).await;
        for _ in 0..3 {
            let mut response = client.request(HEAD, b"{}").await.expect("request");
            assert_eq!(body_of(&mut response).await, "ok");
        }
        assert_eq!(*accepted.lock().expect("lock"), 3);
    }

    #[tokio::test]
    async fn the_pool_keeps_as_many_idle_connections_as_it_is_told() {
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for (keep, kept) in [(None, 3), (Some(2), 2)] {
            let (client, accepted) = server(vec![answer, answer], 100).await;
            let client = match keep {
                Some(n) => client.keep_idle(n),
                None => client,
            };
            // Three requests at once hold three connections; their answers give them back.
            let mut responses = Vec::new();
            for _ in 0..3 {
                responses.push(client.request(HEAD, b"{}").await.expect("request"));
            }
            for mut response in responses {
                assert_eq!(body_of(&mut response).await, "ok");
            }
            assert_eq!(client.idle.idle.lock().expect("lock").len(), kept);
            assert_eq!(*accepted.lock().expect("lock"), 3);
        }
    }

    #[tokio::test]
    async fn a_connection_given_back_closes_the_ones_idle_too_long() {
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (client, _accepted) = server(vec![answer, answer], 100).await;
        let mut responses = Vec::new();
        for _ in 0..3 {
            responses.push(client.request(HEAD, b"{}").await.expect("request"));
        }
        for mut response in responses {
            assert_eq!(body_of(&mut response).await, "ok");
        }
        // The oldest idle connection passes its time; a request takes the newest, and giving
        // it back closes the old one.
        let long_ago = Instant::now()
            .checked_sub(IDLE_TTL)
            .expect("an instant that long ago");
        client.idle.idle.lock().expect("lock")[0].idle_since = long_ago;
        let mut response = client.request(HEAD, b"{}").await.expect("request");
        assert_eq!(body_of(&mut response).await, "ok");
        let idle = client.idle.idle.lock().expect("lock");
        assert_eq!(idle.len(), 2);
        assert!(idle.iter().all(|conn| conn.idle_since > long_ago));
    }

    #[test]
    fn http_and_https_origins_are_taken_and_others_refused() {
        let make = |url: &str| Client::new(&url.parse().expect("url"), Duration::from_secs(1));
        let plain = make("http://worker.internal:8000/api").expect("http");
        assert_eq!(
            (plain.target.port, plain.target.tls.is_some()),
            (8000, false)
        );
        let tls = make("https://worker.example/api").expect("https");
        assert_eq!((tls.target.port, tls.target.tls.is_some()), (443, true));
        let v6 = make("http://[::1]/").expect("ipv6");
        assert_eq!((v6.target.host.as_str(), v6.target.port), ("::1", 80));
        assert!(make("ftp://worker.example/").is_err());
    }

    #[test]
    fn chunk_sizes_parse_hex_and_refuse_junk() {
        assert_eq!(chunk_size(b"1a\r").ok(), Some(26));
        assert_eq!(chunk_size(b"0").ok(), Some(0));
        assert_eq!(chunk_size(b"F;name=v\r").ok(), Some(15));
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"-1").is_err());
        assert!(chunk_size(b"ffffffffffffffffff").is_err());
    }
}
