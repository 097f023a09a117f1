//! `GET /health` of a drainer, for Fly's checks: 200 while the process runs, with figures.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use broker_core::clock::now_ms;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = crate::flag_set(&mut stop) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(req: &Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.uri().path() != "/health" {
        return json(StatusCode::NOT_FOUND, r#"{"error":"not found","code":"NOT_FOUND","message":"only GET /health is served here"}"#.into());
    }
    let last = shared.last_heartbeat.load(Ordering::SeqCst);
    let redis_connected = shared.healthy_since.load(Ordering::SeqCst) != 0;
    let draining = shared.draining.load(Ordering::SeqCst);
    let status = match (redis_connected, draining) {
        (_, true) => "draining",
        (true, false) => "healthy",
        (false, false) => "degraded",
    };
    let body = serde_json::json!({
        "status": status,
        "drainer_id": shared.id(),
        "redis_connected": redis_connected,
        "running_turns": shared.running.lock().map(|r| r.values().sum::<u32>()).unwrap_or(0),
        "last_heartbeat_ms_ago": if last == 0 { None } else { Some(now_ms().saturating_sub(last)) },
        "version": env!("CARGO_PKG_VERSION"),
    });
    json(StatusCode::OK, body.to_string())
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
