//! The real `broker-api` binary against hostile HTTP clients on raw sockets: bodies sent
//! without a key are never read, malformed framing is refused, HTTP/1.0 gets no chunked
//! answer, a client opening thousands of streams is held to the connection limit, and the
//! API's memory stays flat through it all.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_tests::{binary, test_env, TestRedis, API_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The API binary, its port read from its "listening" log line.
struct Api {
    child: Child,
    port: u16,
}

impl Api {
    fn start(redis: &TestRedis, extra: &[(&str, &str)]) -> Self {
        let mut env = test_env(redis.url(), "http://127.0.0.1:1", extra);
        env.push(("LOG_LEVEL".into(), "info".into()));
        env.push(("BROKER_API_WORKERS".into(), "1".into()));
        let mut child = Command::new(binary("broker-api"))
            .env_clear()
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let port = loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "broker-api exited before listening"
            );
            if line.contains("broker-api listening") {
                let at = line.find("127.0.0.1:").unwrap() + "127.0.0.1:".len();
                let digits: String = line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                break digits.parse().unwrap();
            }
        };
        // Keep draining its logs so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        Self { child, port }
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Its open file descriptors.
    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// A figure of its `/metrics`, if it answers within 10 s.
    async fn metric(&self, name: &str) -> Option<u64> {
        let mut io = self.connect().await;
        io.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut io, Duration::from_secs(10)).await;
        answer
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).await.unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until the peer closes or `limit` passes; what came.
async fn read_all(io: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes` in pieces until done or the peer stops taking them; how many went.
async fn write_until_refused(io: &mut TcpStream, bytes: &[u8]) -> usize {
    let mut sent = 0;
    for piece in bytes.chunks(64 * 1024) {
        match tokio::time::timeout(Duration::from_secs(5), io.write_all(piece)).await {
            Ok(Ok(())) => sent += piece.len(),
            _ => break,
        }
    }
    sent
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

const POST: &str = "POST /api/v1/message HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_without_a_key_are_refused_before_they_are_read() {
    let redis = TestRedis::start().await;
    let api = Api::start(&redis, &[]);
    let before = api.rss_kib();

    // Four 30 MiB uploads: each is answered 401 from its head alone, and the connection is
    // closed long before the body could be sent.
    let body = vec![b'x'; 30 << 20];
    for _ in 0..4 {
        let mut io = api.connect().await;
        io.write_all(format!("{POST}Content-Length: {}\r\n\r\n", body.len()).as_bytes())
            .await
            .unwrap();
        let answer = read_all(&mut io, Duration::from_secs(10)).await;
        assert_eq!(status_of(&answer), 401, "{answer}");
        assert!(answer.contains("\"code\":\"UNAUTHORIZED\""), "{answer}");
        let sent = write_until_refused(&mut io, &body).await;
        assert!(
            sent < body.len(),
            "the API read a whole 30 MiB body without a key"
        );
    }

    // 500 connections that declare a body and trickle two bytes of it.
    let mut trickling = Vec::new();
    for _ in 0..500 {
        let mut io = api.connect().await;
        io.write_all(format!("{POST}Content-Length: 100000\r\n\r\n{{\"").as_bytes())
            .await
            .unwrap();
        trickling.push(io);
    }
    for io in &mut trickling {
        let answer = read_all(io, Duration::from_secs(10)).await;
        assert_eq!(status_of(&answer), 401, "{answer}");
    }
    drop(trickling);

    // A chunked body without a key: refused from its head, its chunks never decoded.
    let mut io = api.connect().await;
    io.write_all(format!("{POST}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_all(&mut io, Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    let chunks = b"1\r\na\r\n".repeat(4 << 20);
    let sent = write_until_refused(&mut io, &chunks).await;
    assert!(
        sent < chunks.len(),
        "the API decoded 24 MiB of chunks without a key"
    );

    // Oversized trailers without a key: never read either.
    let mut io = api.connect().await;
    io.write_all(format!("{POST}Transfer-Encoding: chunked\r\n\r\n0\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_all(&mut io, Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    let trailers =
        b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(128 << 10);
    let sent = write_until_refused(&mut io, &trailers).await;
    assert!(
        sent < trailers.len(),
        "the API read 8 MiB of trailers without a key"
    );

    let after = api.rss_kib();
    assert!(
        after < before + 32 * 1024,
        "the API grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_bodies_are_bounded_and_decoded_in_one_pass() {
    let redis = TestRedis::start().await;
    let api = Api::start(
        &redis,
        &[
            ("BROKER_MAX_BODY_BYTES", "8388608"),
            ("BROKER_BODY_TIMEOUT_SECS", "2"),
        ],
    );
    let keyed = format!("{POST}X-API-Key: {API_KEY}\r\n");

    // A declared body over the limit: 413 from the head.
    let mut io = api.connect().await;
    io.write_all(format!("{keyed}Content-Length: 9000000\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_all(&mut io, Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(answer.contains("PAYLOAD_TOO_LARGE"), "{answer}");

    // One 2 MiB chunk, then 2 MiB of one-byte chunks: read, found not to be JSON, answered.
    let mut io = api.connect().await;
    let mut request = format!("{keyed}Transfer-Encoding: chunked\r\n\r\n200000\r\n").into_bytes();
    request.extend(std::iter::repeat_n(b'a', 0x200000));
    request.extend_from_slice(b"\r\n");
    request.extend(b"1\r\na\r\n".repeat(2 << 20));
    request.extend_from_slice(b"0\r\n\r\n");
    let (mut rd, mut wr) = io.split();
    let (_, answer) = tokio::join!(wr.write_all(&request), async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.contains("VALIDATION_ERROR"), "{answer}");

    // A body that never ends: cut at the body deadline with a 408.
    let mut io = api.connect().await;
    io.write_all(format!("{keyed}Content-Length: 1000\r\n\r\n{{\"user_id\"").as_bytes())
        .await
        .unwrap();
    let answer = read_all(&mut io, Duration::from_secs(20)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("REQUEST_TIMEOUT"), "{answer}");

    // Trailers that never end: the same deadline ends them, and nothing of them is kept.
    let before = api.rss_kib();
    let mut io = api.connect().await;
    io.write_all(format!("{keyed}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n").as_bytes())
        .await
        .unwrap();
    let trailers =
        b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(128 << 10);
    let sent = write_until_refused(&mut io, &trailers).await;
    let answer = read_all(&mut io, Duration::from_secs(20)).await;
    assert_eq!(
        status_of(&answer),
        408,
        "{answer} after {sent} bytes of trailers"
    );
    assert!(api.rss_kib() < before + 16 * 1024);
}

#[tokio::test]
async fn malformed_framing_is_refused() {
    let redis = TestRedis::start().await;
    let api = Api::start(&redis, &[]);
    let keyed = format!("{POST}X-API-Key: {API_KEY}\r\n");
    let chunked = format!("{keyed}Transfer-Encoding: chunked\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a chunk size with a sign", format!("{chunked}+b\r\n{{}}\r\n0\r\n\r\n").into()),
        ("a chunk size after a space", format!("{chunked} b\r\n{{}}\r\n0\r\n\r\n").into()),
        ("a chunk size line cut by a bare CR", format!("{chunked}b\rzz\r\n0\r\n\r\n").into()),
        ("a non-ASCII space after chunked", {
            let mut r = format!("{keyed}Transfer-Encoding: chunked").into_bytes();
            r.extend_from_slice(b"\xa0\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
            r
        }),
        ("a transfer coding other than chunked", format!("{keyed}Transfer-Encoding: gzip\r\n\r\n").into()),
        (
            "both Content-Length and Transfer-Encoding",
            format!("{keyed}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into(),
        ),
        (
            "two different lengths",
            format!("{keyed}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}").into(),
        ),
        (
            "an HTTP/1.1 request without Host",
            b"GET /health HTTP/1.1\r\n\r\n".to_vec(),
        ),
    ];
    for (what, request) in cases {
        let mut io = api.connect().await;
        io.write_all(&request).await.unwrap();
        let answer = read_all(&mut io, Duration::from_secs(10)).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer}");
    }
}

const MESSAGE: &str = r#"{"user_id":"u1","client_id":"c","message":"hi"}"#;

#[tokio::test]
async fn http10_clients_get_no_chunked_answer() {
    let redis = TestRedis::start().await;
    let api = Api::start(&redis, &[]);
    for request in [
        "GET /health HTTP/1.0\r\n\r\n".to_owned(),
        // A streamed answer (the message's SSE, its `queued` frame first; no drainer runs).
        format!(
            "POST /api/v1/message HTTP/1.0\r\nX-API-Key: {API_KEY}\r\nAccept: text/event-stream\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{MESSAGE}",
            MESSAGE.len()
        ),
        "GET /metrics HTTP/1.0\r\n\r\n".to_owned(),
    ] {
        let mut io = api.connect().await;
        io.write_all(request.as_bytes()).await.unwrap();
        let answer = read_all(&mut io, Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        let head = answer
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert!(!head.contains("transfer-encoding"), "{request}: {answer}");
        assert!(!head.contains("100 continue"), "{request}: {answer}");
    }
    // `Expect: 100-continue` is HTTP/1.1's: a 1.0 client is not sent an interim answer.
    let mut io = api.connect().await;
    io.write_all(
        format!("POST /api/v1/message HTTP/1.0\r\nX-API-Key: {API_KEY}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{{}}")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_all(&mut io, Duration::from_secs(10)).await;
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert_eq!(status_of(&answer), 400, "{answer}");
}

/// A keyed client opening 3,000 streams at once, each a message of its own conversation: the
/// API serves at most `BROKER_MAX_CONNECTIONS` connections per worker thread; the others wait
/// in the listen backlog, unanswered, holding nothing of the API's. When the client goes,
/// every descriptor and reader is given back, and every message that was queued stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_thousands_of_streams_is_held_to_the_connection_limit() {
    const LIMIT: usize = 1000;
    const STREAMS: usize = 3000;
    broker_core::limits::raise_open_files();
    let redis = TestRedis::start().await;
    // A gone reader is noticed at the next keepalive it is sent.
    let api = Api::start(
        &redis,
        &[
            ("BROKER_MAX_CONNECTIONS", &LIMIT.to_string()),
            ("BROKER_SSE_KEEPALIVE_MS", "500"),
        ],
    );
    let (files_before, rss_before) = (api.open_files(), api.rss_kib());
    let opened = futures_util::future::join_all((0..STREAMS).map(|i| {
        let api = &api;
        async move {
            let mut io = api.connect().await;
            let body = format!(r#"{{"user_id":"many{i}","client_id":"c","message":"hi"}}"#);
            io.write_all(
                format!(
                    "POST /api/v1/message HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n\
                     Accept: text/event-stream\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            // The head of its answer, if it comes within 5 s.
            let mut head = [0u8; 12];
            let answered = tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut head))
                .await
                .is_ok_and(|r| r.is_ok());
            if answered {
                assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
            }
            (io, answered)
        }
    }))
    .await;
    let answered = opened.iter().filter(|(_, a)| *a).count();
    let (files, rss) = (api.open_files(), api.rss_kib());
    eprintln!(
        "{STREAMS} streams opened: {answered} answered; the API held {} more descriptors and \
         {} KiB more memory",
        files - files_before,
        rss.saturating_sub(rss_before)
    );
    assert_eq!(
        answered, LIMIT,
        "one worker thread serves BROKER_MAX_CONNECTIONS"
    );
    assert!(
        files <= files_before + LIMIT + 16,
        "{files_before} -> {files}"
    );
    assert!(
        rss < rss_before + 64 * 1024,
        "{rss_before} KiB -> {rss} KiB"
    );
    drop(opened);
    // The client gone: its connections, then the requests it left in the backlog, are done
    // with; nothing stays held, and what was enqueued is still queued (no drainer runs).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let files = api.open_files();
        let readers = api.metric("broker_sse_readers").await;
        if files <= files_before + 16 && readers == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held: {files} descriptors (from {files_before}), {readers:?} readers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let enqueued = api.metric("broker_messages_enqueued_total").await.unwrap();
    let queued = api.metric("broker_messages_queued").await.unwrap();
    assert!(enqueued >= LIMIT as u64, "{enqueued} enqueued");
    eprintln!("the client gone: {enqueued} messages enqueued, {queued} still queued");
    assert_eq!(queued, enqueued, "every message enqueued is still queued");
}
