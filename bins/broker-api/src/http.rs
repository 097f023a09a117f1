//! The API's HTTP/1.1 transport. It reads each request off its socket, hands it to the
//! actix-web `App` (routing, extractors, middleware and handlers stay actix-web's), and writes
//! the answer back.
//!
//! Why not actix-http's own dispatcher: it keeps an 8 KB read buffer, an 8 KB write buffer and
//! a header map with room for 16 headers for each connection, for as long as the connection
//! lives, and a sync request holds its connection for its whole turn. With 10,000 sync
//! requests waiting that was 227 MiB. Here a connection that waits for its answer holds no
//! buffer: the head is read into a buffer that lives while it is read, the request keeps only
//! its head's bytes, its header map sized to its headers and its body, and the answer is
//! written from one buffer dropped once sent.
//!
//! What it speaks: HTTP/1.0 and 1.1, keep-alive, pipelined requests (answered in order),
//! `Content-Length` and chunked request bodies, `Expect: 100-continue`, chunked streaming
//! answers (SSE). What it refuses, with the API's JSON error body and the connection closed:
//! a malformed head (400), a head over 32 KiB or with more than 64 headers (431), a body over
//! `BROKER_MAX_BODY_BYTES` (413), both `Content-Length` and `Transfer-Encoding` or differing
//! lengths (400, against request smuggling), a transfer coding other than chunked (501), an
//! expectation other than `100-continue` (417), a head not complete in time (408).

use std::cell::Cell;
use std::future::poll_fn;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_http::Request;
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, Service, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, Uri, Version};
use actix_web::{HttpResponse, ResponseError};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use crate::ApiError;

/// The longest request head (request line and headers) taken.
pub const MAX_HEAD: usize = 32 * 1024;
/// The most headers a request may carry.
pub const MAX_HEADERS: usize = 64;
/// The first read of a head asks for this much; the buffer doubles while the head is longer.
/// A request's buffer is made for it and dropped once it is read (a connection that waits
/// holds none), so its size matters: up to 1,032 bytes glibc hands it out of its per-thread
/// cache, above that out of its bins, which cost the API about 1,000 instructions a request
/// at 2,048. A chat request, head and body, is usually well under 1 KiB; a longer one is read
/// in more than one read.
const FIRST_READ: usize = 1024;
/// The most glibc's per-thread cache hands out (see `FIRST_READ`).
const ALLOCATOR_CACHE: usize = 1032;
const _: () = assert!(FIRST_READ <= ALLOCATOR_CACHE);
/// Bodies up to this size are copied out of the read buffer; longer ones take it over.
const COPY_BODY: usize = 4096;
/// How long a refusal may take to write before the connection is dropped anyway.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// A streamed answer's bytes ready at once are written when they reach this much.
const STREAM_WRITE: usize = 64 * 1024;

/// The most a refused request's unread bytes are read and dropped before closing.
const DRAIN_LIMIT: usize = 256 * 1024;

/// The transport's time and size limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request's head must be complete this long after its first byte (or after the
    /// connection opened, for its first request).
    pub head_timeout: Duration,
    /// An idle kept-alive connection is closed after this.
    pub keep_alive: Duration,
    /// A body read that makes no progress for this long ends the connection.
    pub body_idle: Duration,
    /// The largest request body taken (`BROKER_MAX_BODY_BYTES`).
    pub max_body: usize,
}

impl Limits {
    /// actix-web's defaults for the head and keep-alive, and the configured body limit.
    pub fn new(max_body: usize) -> Self {
        Self {
            head_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            body_idle: Duration::from_secs(30),
            max_body,
        }
    }
}

/// Why a request is not served: answered with an error and the connection closed, or just
/// closed (the client went away or sent nothing).
#[derive(Debug)]
enum Refusal {
    Silent,
    Answer(ApiError),
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self::Answer(e)
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

/// How an answer is written.
#[derive(Debug, Clone, Copy)]
struct How {
    /// The client asked to keep the connection (HTTP/1.1 unless `close`; 1.0 with `keep-alive`).
    keep_alive: bool,
    /// A `HEAD` request: the head alone.
    head_only: bool,
    /// An HTTP/1.0 client, told explicitly when the connection stays open.
    http10: bool,
}

/// A parsed request head, owning its bytes.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Serves one connection until the client closes it, a refusal ends it, it stays idle past
/// the keep-alive, or the API stops while it is idle. Requests are answered one at a time.
pub fn serve<S, B>(
    io: TcpStream,
    app: Rc<S>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // Answers go out at once: with Nagle's algorithm a response written while the client has
    // not yet acknowledged the previous one waits for its delayed ACK (~40 ms).
    let _ = io.set_nodelay(true);
    let peer = io.peer_addr().ok();
    // Built here, not in the async fn, so that the future holds one copy of it.
    let conn = Conn {
        io,
        buf: Vec::new(),
        limits,
        peer,
        stop,
    };
    conn.run(app)
}

/// The actix request for a parsed head and its body.
fn request(head: Head, body: Bytes, peer: Option<SocketAddr>) -> Request {
    let mut request = if body.is_empty() {
        Request::new()
    } else {
        Request::with_payload(Payload::from(body))
    };
    let h = request.head_mut();
    h.method = head.method;
    h.uri = head.uri;
    h.version = head.version;
    h.headers = head.headers;
    h.peer_addr = peer;
    request
}

struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed: part of a head, of a body, or a pipelined request.
    /// Empty, without an allocation, while a request is served.
    buf: Vec<u8>,
    limits: Limits,
    peer: Option<SocketAddr>,
    /// Set when the API stops: idle connections close.
    stop: watch::Receiver<bool>,
}

impl Conn {
    /// Serves requests one at a time until the connection should close.
    async fn run<S, B>(mut self, app: Rc<S>)
    where
        S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
        B: MessageBody + 'static,
    {
        let mut first = true;
        // Reading a request and writing its answer are boxed, each for its turn: this future,
        // which lives as long as the connection, then holds little more than the app's future
        // while the answer is awaited (see `the_connection_future_holds_only_the_wait`).
        loop {
            if poll_fn(|cx| app.poll_ready(cx)).await.is_err() {
                return;
            }
            let Some((request, mut how)) = Box::pin(self.next_request(first)).await else {
                return;
            };
            first = false;
            // While the API stops, each answer closes its connection.
            how.keep_alive &= !*self.stop.borrow();
            let response = match app.call(request).await {
                Ok(response) => response.into_parts().1.map_into_left_body(),
                Err(e) => e.error_response().map_into_right_body(),
            };
            match Box::pin(self.respond(response, how)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// The next request and how to answer it. `None` when the connection should close: the
    /// client closed it or sent nothing in time, the API is stopping, or the request was
    /// refused (and answered).
    async fn next_request(&mut self, first: bool) -> Option<(Request, How)> {
        let idle_for = if first {
            self.limits.head_timeout
        } else {
            self.limits.keep_alive
        };
        if self.buf.is_empty() && !self.idle(idle_for, first).await {
            return None;
        }
        // A refusal is rare: boxed, so that it does not make this future, boxed for every
        // request, larger than glibc's per-thread cache takes (1,032 bytes).
        let head = match self.read_head().await {
            Ok(head) => head?,
            Err(refusal) => return Box::pin(self.refuse(refusal)).await,
        };
        let body = match self.read_body(&head).await {
            Ok(body) => body,
            Err(refusal) => return Box::pin(self.refuse(refusal)).await,
        };
        if self.buf.is_empty() {
            // What the read left behind is not held while the request is served.
            self.buf = Vec::new();
        }
        let how = How {
            keep_alive: head.keep_alive,
            head_only: head.method == Method::HEAD,
            http10: head.version == Version::HTTP_10,
        };
        Some((request(head, body, self.peer), how))
    }

    /// Waits, holding no buffer, for the first bytes of the next request and reads them.
    /// False when the connection should close: nothing came within `wait`, the client closed
    /// it, or the API is stopping.
    ///
    /// A connection's first request is waited for even while the API stops: the client
    /// connected before the listener closed.
    async fn idle(&mut self, wait: Duration, first: bool) -> bool {
        let deadline = Instant::now() + wait;
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                ready = timeout_at(deadline, self.io.readable()) => {
                    if !matches!(ready, Ok(Ok(()))) {
                        return false;
                    }
                }
                // A dropped sender means the API is gone: stop as well.
                _ = stop.wait_for(|stopping| *stopping), if !first => return false,
            }
            // Readiness can be left over from the last read: only bytes end the wait.
            self.buf.reserve(FIRST_READ);
            match self.io.try_read_buf(&mut self.buf) {
                Ok(0) => return false,
                Ok(_) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.buf = Vec::new();
                }
                Err(_) => return false,
            }
        }
    }

    /// Reads more bytes into `buf`, asking for at least `want`. False at the end of the stream.
    async fn fill(&mut self, want: usize) -> io::Result<bool> {
        self.buf.reserve(want);
        loop {
            self.io.readable().await?;
            match self.io.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and parses the next head. `None` when the client closed between requests.
    async fn read_head(&mut self) -> Result<Option<Head>, Refusal> {
        let deadline = Instant::now() + self.limits.head_timeout;
        // Bytes already searched for the head's end: a head that comes in many small pieces
        // is parsed once it is whole, not again after each piece.
        let mut searched: usize = 0;
        loop {
            if !self.buf.is_empty() {
                let from = searched.saturating_sub(3);
                searched = self.buf.len();
                let ended = self.buf[from..]
                    .windows(2)
                    .any(|pair| pair == b"\n\n" || pair == b"\n\r");
                if ended {
                    if let Some((head, len)) = parse_head(&self.buf, self.limits.max_body)? {
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(ApiError::HeadTooLarge(format!(
                        "the request head is larger than {MAX_HEAD} bytes"
                    ))
                    .into());
                }
            }
            let want = if self.buf.is_empty() {
                FIRST_READ
            } else {
                self.buf.len().min(MAX_HEAD - self.buf.len())
            };
            match timeout_at(deadline, self.fill(want)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) | Ok(Err(_)) if self.buf.is_empty() => return Ok(None),
                Ok(Ok(false)) | Ok(Err(_)) => return Err(Refusal::Silent),
                Err(_) if self.buf.is_empty() => return Ok(None),
                Err(_) => {
                    return Err(ApiError::RequestTimeout(format!(
                        "the request head did not arrive within {:?}",
                        self.limits.head_timeout
                    ))
                    .into())
                }
            }
        }
    }

    /// Reads more of a body: a read that makes no progress within `body_idle`, or the end of
    /// the stream, ends the connection.
    async fn fill_body(&mut self, want: usize) -> Result<(), Refusal> {
        match timeout(self.limits.body_idle, self.fill(want.min(64 * 1024))).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(Refusal::Silent),
        }
    }

    /// Reads a request's whole body.
    async fn read_body(&mut self, head: &Head) -> Result<Bytes, Refusal> {
        if head.expect_continue && head.framing != Framing::Empty && self.buf.is_empty() {
            self.io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| Refusal::Silent)?;
        }
        match head.framing {
            Framing::Empty => Ok(Bytes::new()),
            Framing::Length(n) => {
                while self.buf.len() < n {
                    self.fill_body(n - self.buf.len()).await?;
                }
                Ok(self.take(n))
            }
            Framing::Chunked => self.read_chunked().await,
        }
    }

    /// The first `n` bytes of `buf`, as a body.
    fn take(&mut self, n: usize) -> Bytes {
        if n <= COPY_BODY {
            let body = Bytes::copy_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
            return body;
        }
        let rest = self.buf.split_off(n);
        let mut body = std::mem::replace(&mut self.buf, rest);
        body.shrink_to_fit();
        Bytes::from(body)
    }

    /// Decodes a chunked body, its extensions and trailers skipped.
    async fn read_chunked(&mut self) -> Result<Bytes, Refusal> {
        let max = self.limits.max_body;
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size = broker_core::http1::chunk_size(&self.buf[..line])
                .map_err(|_| ApiError::Invalid("malformed chunked body: bad chunk size".into()))?;
            self.buf.drain(..line + 2);
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let line = self.line().await?;
                    self.buf.drain(..line + 2);
                    if line == 0 {
                        return Ok(Bytes::from(body));
                    }
                }
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|size| body.len().saturating_add(*size) <= max)
                .ok_or_else(|| too_large(max))?;
            while self.buf.len() < size + 2 {
                self.fill_body(size + 2 - self.buf.len()).await?;
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err(ApiError::Invalid(
                    "malformed chunked body: no CRLF after a chunk".into(),
                )
                .into());
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// The length of the line at the start of `buf`, without its CRLF, reading until it is there.
    async fn line(&mut self) -> Result<usize, Refusal> {
        let mut searched = 0;
        loop {
            if let Some(at) = self.buf[searched..].windows(2).position(|w| w == b"\r\n") {
                return Ok(searched + at);
            }
            searched = self.buf.len().saturating_sub(1);
            if self.buf.len() > 4096 {
                return Err(ApiError::Invalid(
                    "malformed chunked body: a line over 4096 bytes".into(),
                )
                .into());
            }
            self.fill_body(64).await?;
        }
    }

    /// Writes an answer. True when the connection may serve another request.
    async fn respond<B: MessageBody>(
        &mut self,
        response: HttpResponse<B>,
        how: How,
    ) -> io::Result<bool> {
        let (head, body) = response.into_parts();
        let keep_alive = how.keep_alive && head.head().keep_alive();
        // 1xx, 204 and 304 answers carry no body and no length (RFC 9110, 8.6 and 15).
        let status = head.status();
        let bodiless = status.is_informational()
            || status == actix_web::http::StatusCode::NO_CONTENT
            || status == actix_web::http::StatusCode::NOT_MODIFIED;
        let size = if bodiless {
            BodySize::None
        } else {
            body.size()
        };
        // Room for the head and a small body: the answer is written from one buffer, which
        // then does not grow while it is filled.
        let body_room = match size {
            BodySize::Sized(n) => usize::try_from(n).unwrap_or(0).min(ALLOCATOR_CACHE),
            _ => 0,
        };
        let mut out = Vec::with_capacity(256 + body_room);
        write_head(&mut out, head.head(), size, keep_alive, how.http10);
        drop(head);
        if how.head_only || bodiless {
            self.io.write_all(&out).await?;
            return Ok(keep_alive);
        }
        match size {
            BodySize::None | BodySize::Sized(0) => self.io.write_all(&out).await?,
            BodySize::Sized(_) => match body.try_into_bytes() {
                Ok(bytes) => {
                    out.extend_from_slice(&bytes);
                    self.io.write_all(&out).await?;
                }
                Err(body) => write_body(&mut self.io, out, body, false).await?,
            },
            BodySize::Stream => write_body(&mut self.io, out, body, true).await?,
        }
        Ok(keep_alive)
    }

    /// Answers a refusal, if it has an answer, and closes. Always `None`: no request to serve.
    async fn refuse<T>(&mut self, refusal: Refusal) -> Option<T> {
        let Refusal::Answer(error) = refusal else {
            return None;
        };
        tracing::debug!(error = %error, "request refused by the transport");
        let _ = timeout(
            REFUSAL_WRITE,
            self.respond(
                error.error_response(),
                How {
                    keep_alive: false,
                    head_only: false,
                    http10: false,
                },
            ),
        )
        .await;
        // Read what the client still sends before closing: closing with unread bytes would
        // reset the connection and could destroy the answer before the client reads it.
        let _ = self.io.shutdown().await;
        let _ = timeout(REFUSAL_WRITE, async {
            let mut drained = 0;
            let mut sink = vec![0u8; 4096];
            while drained < DRAIN_LIMIT {
                match tokio::io::AsyncReadExt::read(&mut self.io, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
        None
    }
}

/// Writes `out` (the head) and a body as it comes, chunked or as is. What the body has
/// ready goes out in one write, as soon as it has no more ready: an SSE answer's frames
/// are sent the moment they are produced, and frames produced together (a turn's last
/// frames and the end of the body) leave in one packet instead of one each.
async fn write_body<W, B>(io: &mut W, mut out: Vec<u8>, body: B, chunked: bool) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: MessageBody,
{
    enum Step<E> {
        Piece(Result<Bytes, E>),
        Flush,
        End,
    }
    let mut body = pin!(body);
    loop {
        let step = poll_fn(|cx| match body.as_mut().poll_next(cx) {
            Poll::Ready(Some(piece)) => Poll::Ready(Step::Piece(piece)),
            Poll::Ready(None) => Poll::Ready(Step::End),
            Poll::Pending if out.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(Step::Flush),
        })
        .await;
        match step {
            Step::Piece(piece) => {
                let piece = match piece {
                    Ok(piece) => piece,
                    Err(e) => {
                        // What came before the failure still goes out, as it would have
                        // piece by piece; the body then ends without its closing chunk.
                        let _ = io.write_all(&out).await;
                        return Err(io::Error::other(e.into().to_string()));
                    }
                };
                if piece.is_empty() {
                    continue;
                }
                if chunked {
                    let _ = write!(out, "{:x}\r\n", piece.len());
                    out.extend_from_slice(&piece);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(&piece);
                }
                // A body that always has more ready is still written as it goes.
                if out.len() >= STREAM_WRITE {
                    io.write_all(&out).await?;
                    out.clear();
                }
            }
            Step::Flush => {
                io.write_all(&out).await?;
                out.clear();
            }
            Step::End => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                if !out.is_empty() {
                    io.write_all(&out).await?;
                }
                return Ok(());
            }
        }
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::TooLarge(format!("the body is larger than {max} bytes"))
}

/// Parses a complete head at the start of `buf`: `None` while it is incomplete.
fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<(Head, usize)>, ApiError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::HeadTooLarge(format!(
                "the request has more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(ApiError::Invalid(format!("malformed HTTP request: {e}"))),
    };
    // The head's bytes, kept once: the URI and header values are slices of them.
    let raw = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let slice = |part: &[u8]| {
        let at = part.as_ptr() as usize - base;
        raw.slice(at..at + part.len())
    };
    let method = parsed.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| ApiError::Invalid(format!("malformed HTTP request: method {method:?}")))?;
    let path = parsed.path.unwrap_or_default();
    let uri = Uri::from_maybe_shared(slice(path.as_bytes()))
        .map_err(|e| ApiError::Invalid(format!("malformed HTTP request: target: {e}")))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut expect_continue = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ApiError::Invalid(format!("malformed header name {:?}", h.name)))?;
        let value = HeaderValue::from_maybe_shared(slice(h.value))
            .map_err(|_| ApiError::Invalid(format!("malformed value of header {}", h.name)))?;
        let text = std::str::from_utf8(h.value).unwrap_or("").trim();
        match name.as_str() {
            "content-length" => {
                let n = text
                    .parse::<u64>()
                    .ok()
                    .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| ApiError::Invalid(format!("bad Content-Length {text:?}")))?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if length.is_some_and(|before| before != n) {
                    return Err(ApiError::Invalid("differing Content-Length headers".into()));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                if version == Version::HTTP_10 {
                    return Err(ApiError::Invalid(
                        "Transfer-Encoding in an HTTP/1.0 request".into(),
                    ));
                }
                if chunked || !text.eq_ignore_ascii_case("chunked") {
                    return Err(ApiError::NotImplemented(format!(
                        "transfer coding {text:?} is not supported: send chunked or a Content-Length"
                    )));
                }
                chunked = true;
            }
            "connection" => {
                for token in text.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            "expect" => {
                if !text.eq_ignore_ascii_case("100-continue") {
                    return Err(ApiError::ExpectationFailed(format!(
                        "expectation {text:?} is not supported"
                    )));
                }
                expect_continue = true;
            }
            _ => {}
        }
        headers.append(name, value);
    }
    let framing = match (length, chunked) {
        (Some(_), true) => {
            return Err(ApiError::Invalid(
                "both Content-Length and Transfer-Encoding".into(),
            ))
        }
        (Some(n), false) if n > max_body => return Err(too_large(max_body)),
        (Some(0), false) | (None, false) => Framing::Empty,
        (Some(n), false) => Framing::Length(n),
        (None, true) => Framing::Chunked,
    };
    Ok(Some((
        Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

/// Writes the status line and headers of an answer, with its framing and date.
fn write_head(
    out: &mut Vec<u8>,
    head: &actix_web::dev::ResponseHead,
    size: BodySize,
    keep_alive: bool,
    http10: bool,
) {
    use std::io::Write as _;
    let status = head.status;
    let reason = head
        .reason
        .or_else(|| status.canonical_reason())
        .unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16());
    for (name, value) in head.headers.iter() {
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "date"
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match size {
        BodySize::None => {}
        BodySize::Sized(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        BodySize::Stream => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(&http_date());
    out.extend_from_slice(b"\r\n\r\n");
}

thread_local! {
    /// The `Date` header's value, formatted once a second.
    static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
}

/// Now as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date() -> [u8; 29] {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cache| {
        let (at, text) = cache.get();
        if at == secs {
            return text;
        }
        let mut text = [0; 29];
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == text.len() {
            text.copy_from_slice(formatted.as_bytes());
        }
        cache.set((secs, text));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_service::{IntoServiceFactory, ServiceFactory};
    use actix_web::body::BodyStream;
    use actix_web::dev::AppConfig;
    use actix_web::{web, App};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const MAX_BODY: usize = 1000;

    async fn echo(body: web::Bytes) -> HttpResponse {
        HttpResponse::Ok().body(body)
    }

    async fn pieces() -> HttpResponse {
        let parts = [Bytes::from_static(b"one "), Bytes::from_static(b"two")];
        HttpResponse::Ok().streaming(futures_util::stream::iter(
            parts.into_iter().map(Ok::<_, actix_web::Error>),
        ))
    }

    /// Keeps each write it is given, whole.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_streamed_answer_writes_what_is_ready_at_once_and_the_rest_when_it_comes() {
        // Everything ready: the head, both chunks and the end in one write.
        let ready = futures_util::stream::iter(
            [Bytes::from_static(b"one "), Bytes::from_static(b"two")]
                .map(Ok::<_, actix_web::Error>),
        );
        let mut io = Writes::default();
        write_body(
            &mut io,
            b"HEAD\r\n\r\n".to_vec(),
            BodyStream::new(ready),
            true,
        )
        .await
        .expect("write");
        assert_eq!(
            io.0,
            [b"HEAD\r\n\r\n4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n".to_vec()]
        );

        // A piece that comes later: what was ready goes out before it, without waiting.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        tx.send(Bytes::from_static(b"first")).expect("send");
        let later = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|piece| (Ok::<_, actix_web::Error>(piece), rx))
        });
        let mut io = Writes::default();
        let mut writing = Box::pin(async move {
            write_body(
                &mut io,
                b"HEAD\r\n\r\n".to_vec(),
                BodyStream::new(later),
                true,
            )
            .await
            .map(|()| io)
        });
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(std::future::Future::poll(writing.as_mut(), &mut cx).is_pending());
        tx.send(Bytes::from_static(b"second")).expect("send");
        drop(tx);
        let io = writing.await.expect("write");
        assert_eq!(
            io.0,
            [
                b"HEAD\r\n\r\n5\r\nfirst\r\n".to_vec(),
                b"6\r\nsecond\r\n0\r\n\r\n".to_vec()
            ]
        );

        // A body that fails: what it gave before goes out, without the closing chunk.
        let failing = futures_util::stream::iter([
            Ok(Bytes::from_static(b"kept")),
            Err(actix_web::error::ErrorInternalServerError("gone")),
        ]);
        let mut io = Writes::default();
        let written = write_body(
            &mut io,
            b"HEAD\r\n\r\n".to_vec(),
            BodyStream::new(failing),
            true,
        )
        .await;
        assert!(written.is_err());
        assert_eq!(io.0, [b"HEAD\r\n\r\n4\r\nkept\r\n".to_vec()]);
    }

    /// Serves a small app on a local port with short timeouts; the sender stops it.
    async fn server() -> (SocketAddr, watch::Sender<bool>) {
        let app = App::new()
            .route("/echo", web::post().to(echo))
            .route("/pieces", web::get().to(pieces))
            .route(
                "/nothing",
                web::get().to(|| async { HttpResponse::NoContent().finish() }),
            )
            .into_factory()
            .new_service(AppConfig::default())
            .await
            .expect("the test app builds");
        let app = Rc::new(app);
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            keep_alive: Duration::from_millis(300),
            body_idle: Duration::from_millis(300),
            max_body: MAX_BODY,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop) = watch::channel(false);
        actix_web::rt::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                actix_web::rt::spawn(serve(io, app.clone(), limits, stop.clone()));
            }
        });
        (addr, stop_tx)
    }

    /// Sends `request` on a new connection and reads until the server closes it (or 5 s pass).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut io = TcpStream::connect(addr).await.expect("connect");
        io.write_all(request).await.expect("write");
        read_to_close(&mut io).await
    }

    async fn read_to_close(io: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the server did not close: {:?}",
            String::from_utf8_lossy(&out)
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads until `text` has arrived (or 5 s pass).
    async fn read_until(io: &mut TcpStream, text: &str) -> String {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&out).contains(text) {
            let mut piece = [0u8; 1024];
            match timeout_at(deadline, io.read(&mut piece)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&piece[..n]),
                other => panic!(
                    "{text:?} never came ({other:?}): {:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn statuses(answer: &str) -> Vec<&str> {
        answer
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &answer[at + 9..at + 12])
            .collect()
    }

    #[actix_web::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (addr, _stop) = server().await;
        let answer = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nfirstPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecond",
        )
        .await;
        assert_eq!(statuses(&answer), ["200", "200"], "{answer}");
        let first = answer.find("first").expect("first body");
        let second = answer.find("second").expect("second body");
        assert!(first < second, "{answer}");
        assert!(answer.contains("content-length: 5\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.contains("\r\ndate: "), "{answer}");
    }

    #[actix_web::test]
    async fn a_kept_connection_serves_again_and_closes_when_idle_or_stopped() {
        let (addr, stop) = server().await;
        let mut io = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..2 {
            io.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
                .await
                .expect("write");
            read_until(&mut io, "\r\n\r\nhi").await;
        }
        // Idle past the keep-alive: closed.
        assert_eq!(read_to_close(&mut io).await, "");

        // HTTP/1.0 is kept only when asked, and told so.
        let mut io = TcpStream::connect(addr).await.expect("connect");
        io.write_all(
            b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await
        .expect("write");
        let answer = read_until(&mut io, "\r\n\r\nhi").await;
        assert!(answer.contains("connection: keep-alive\r\n"), "{answer}");
        // Stopping closes the idle connection before its keep-alive ends.
        stop.send(true).expect("stop");
        let closed = timeout(Duration::from_millis(200), read_to_close(&mut io)).await;
        assert_eq!(closed.ok().as_deref(), Some(""));
        let answer = exchange(addr, b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
            "{answer}"
        );
    }

    #[actix_web::test]
    async fn chunked_bodies_continue_and_streamed_answers() {
        let (addr, _stop) = server().await;
        let answer = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nabc0123456789"), "{answer}");

        let mut io = TcpStream::connect(addr).await.expect("connect");
        io.write_all(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let interim = read_until(&mut io, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        io.write_all(b"body").await.expect("write");
        let answer = read_to_close(&mut io).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("body"),
            "{answer}"
        );

        // A head and body written in small pieces.
        let mut io = TcpStream::connect(addr).await.expect("connect");
        io.set_nodelay(true).expect("nodelay");
        let whole = b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\npiece";
        for piece in whole.chunks(7) {
            io.write_all(piece).await.expect("write");
            io.flush().await.expect("flush");
        }
        let answer = read_to_close(&mut io).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("piece"),
            "{answer}"
        );

        let answer = exchange(addr, b"GET /pieces HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(
            answer.contains("transfer-encoding: chunked\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\n4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"),
            "{answer}"
        );
        let answer = exchange(addr, b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
        assert!(
            !answer.contains("content-length"),
            "a 204 has no length: {answer}"
        );
        let answer = exchange(addr, b"HEAD /pieces HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(
            answer.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {answer}"
        );
    }

    #[actix_web::test]
    async fn bad_requests_are_refused_with_a_json_error_and_closed() {
        let (addr, _stop) = server().await;
        let big_head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let too_long = format!(
            "POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
            MAX_BODY + 1,
            "x".repeat(MAX_BODY + 1)
        );
        let cases: [(&[u8], &str, &str); 10] = [
            (b"GARBAGE\r\n\r\n", "400", "malformed HTTP request"),
            (
                b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
                "400",
                "differing Content-Length",
            ),
            (
                b"POST /echo HTTP/1.1\r\nContent-Length: -2\r\n\r\n",
                "400",
                "bad Content-Length",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "501",
                "not supported",
            ),
            (
                b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "400",
                "bad chunk size",
            ),
            (
                b"POST /echo HTTP/1.1\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx",
                "417",
                "magic",
            ),
            (too_long.as_bytes(), "413", "larger than 1000 bytes"),
            (big_head.as_bytes(), "431", "larger than 32768 bytes"),
            (many.as_bytes(), "431", "more than 64 headers"),
        ];
        for (request, status, text) in cases {
            let answer = exchange(addr, request).await;
            assert_eq!(statuses(&answer), [status], "{answer}");
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
            let body: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
            assert!(
                body["message"].as_str().unwrap_or_default().contains(text),
                "{answer}"
            );
        }
        // A chunked body over the limit is cut off once it passes it.
        let chunked = format!(
            "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n1\r\nx\r\n0\r\n\r\n",
            "y".repeat(1000)
        );
        assert_eq!(statuses(&exchange(addr, chunked.as_bytes()).await), ["413"]);
    }

    #[actix_web::test]
    async fn a_head_that_stalls_times_out_and_a_silent_connection_closes() {
        let (addr, _stop) = server().await;
        let answer = exchange(addr, b"POST /echo HTTP/1.1\r\nContent-").await;
        assert_eq!(statuses(&answer), ["408"], "{answer}");
        // Nothing sent at all: closed without an answer.
        assert_eq!(exchange(addr, b"").await, "");
        // A body that stops coming: closed.
        let answer = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await;
        assert_eq!(answer, "");
    }

    /// The connection's future lives as long as the connection; while its request is served
    /// it should hold little more than the app's own future (boxed phases, see `Conn::run`).
    /// 376 bytes with a 16-byte app future when written; with the read phase inline it would be
    /// over 1,200, so the 512 allowed leaves room for compiler changes without hiding that.
    #[actix_web::test]
    async fn the_connection_future_holds_only_the_wait() {
        let app = Rc::new(
            App::new()
                .route("/echo", web::post().to(echo))
                .into_factory()
                .new_service(AppConfig::default())
                .await
                .expect("the test app builds"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let io = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let call = std::mem::size_of_val(&app.call(Request::new()));
        let (_stop_tx, stop) = watch::channel(false);
        let serving = serve(io, app, Limits::new(MAX_BODY), stop);
        let size = std::mem::size_of_val(&serving);
        assert!(
            size <= call + 512,
            "serve's future is {size} bytes, the app's call {call}"
        );
    }

    /// The phases boxed for every request stay within glibc's per-thread cache (1,032
    /// bytes): above it each allocation takes malloc's slow path and sweeps the fast bins,
    /// which cost the API about 7 µs per sync message under load when reading a request
    /// boxed 1,232 bytes.
    #[actix_web::test]
    async fn the_boxed_phases_fit_the_allocator_cache() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let io = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (_stop_tx, stop) = watch::channel(false);
        let mut conn = Conn {
            io,
            buf: Vec::new(),
            limits: Limits::new(MAX_BODY),
            peer: None,
            stop,
        };
        let reading = std::mem::size_of_val(&conn.next_request(false));
        assert!(reading <= 1024, "next_request's future is {reading} bytes");
        let response = HttpResponse::Ok().finish().map_into_left_body::<()>();
        let how = How {
            keep_alive: true,
            head_only: false,
            http10: false,
        };
        let writing = std::mem::size_of_val(&conn.respond(response, how));
        assert!(writing <= 1024, "respond's future is {writing} bytes");
    }
}
