//! `GET /metrics`: Prometheus (OpenMetrics) text written by prometheus-client from one snapshot
//! of the figures the scripts and drainers keep in Redis (O(1) in users): gauges of the
//! queues, counters, failures by code, and the drainers' histograms of queue wait, turn time,
//! end-to-end time per mode, callback delivery time and attempts.

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use broker_core::metrics::{read_histograms, Histogram, HISTOGRAMS};
use broker_core::queue::{HealthFigures, Operations};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::AppState;

/// The counters of the stats hash: (field, metric name without `_total`, help).
const COUNTERS: &[(&str, &str, &str)] = &[
    (
        "enqueued_total",
        "broker_messages_enqueued",
        "messages accepted",
    ),
    (
        "completed_total",
        "broker_messages_completed",
        "messages answered by the worker",
    ),
    (
        "failed_total",
        "broker_messages_failed",
        "messages that failed for good",
    ),
    (
        "cancelled_total",
        "broker_messages_cancelled",
        "messages cancelled while queued",
    ),
    (
        "redriven_total",
        "broker_messages_redriven",
        "failed messages an operator sent back to their conversation",
    ),
    (
        "deduplicated_total",
        "broker_requests_deduplicated",
        "requests answered for an earlier message with the same client_message_id",
    ),
    (
        "rejected_full_total",
        "broker_requests_rejected_full",
        "requests refused because the conversation queue was full",
    ),
    (
        "callbacks_delivered_total",
        "broker_callbacks_delivered",
        "callbacks their receiver accepted",
    ),
    (
        "callbacks_failed_total",
        "broker_callbacks_failed",
        "callbacks that went to the dead list (refused, or out of retry budget)",
    ),
    (
        "released_total",
        "broker_conversations_released",
        "conversations given back to ready (shutdown, reconcile, reap)",
    ),
];

/// One scrape's figures.
#[derive(Debug)]
struct Snapshot {
    redis_up: bool,
    stats: HashMap<String, i64>,
    health: Option<HealthFigures>,
    operations: Option<Operations>,
    now_ms: u64,
    sync_waiters: usize,
    sse_readers: usize,
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut gauge = |name: &str, help: &str, value: i64| -> Result<(), std::fmt::Error> {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)
        };
        gauge(
            "broker_redis_up",
            "1 when Redis answered this scrape",
            i64::from(self.redis_up),
        )?;
        gauge(
            "broker_sync_waiters",
            "sync requests waiting on this API process",
            self.sync_waiters as i64,
        )?;
        gauge(
            "broker_sse_readers",
            "SSE clients reading a message's events on this API process",
            self.sse_readers as i64,
        )?;
        let (Some(health), Some(operations)) = (&self.health, &self.operations) else {
            return Ok(());
        };
        gauge(
            "broker_drainers_alive",
            "drainers with a recent heartbeat",
            health.drainers_alive as i64,
        )?;
        gauge(
            "broker_active_queues",
            "conversations with queued or running work",
            health.active_queues,
        )?;
        gauge(
            "broker_messages_processing",
            "turns running at the worker",
            health.processing,
        )?;
        gauge(
            "broker_messages_queued",
            "messages waiting for their turn",
            health.queued,
        )?;
        gauge(
            "broker_held_conversations",
            "conversations held by an operator",
            operations.held as i64,
        )?;
        gauge(
            "broker_drainers_paused",
            "1 while an operator has paused the drainers",
            i64::from(operations.paused.is_some()),
        )?;
        let oldest = operations
            .oldest_enqueued_at
            .map_or(0.0, |at| self.now_ms.saturating_sub(at) as f64 / 1000.0);
        encoder
            .encode_descriptor(
                "broker_oldest_message_age_seconds",
                "age of the oldest unfinished (waiting or running) message",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&oldest)?;
        for (field, name, help) in COUNTERS {
            let value = self.stats.get(*field).copied().unwrap_or(0).max(0) as u64;
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        let mut codes: Vec<(&str, u64)> = self
            .stats
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("failed_code:")
                    .map(|c| (c, (*v).max(0) as u64))
            })
            .collect();
        codes.sort();
        let mut family = encoder.encode_descriptor(
            "broker_failures",
            "messages that failed for good, by code",
            None,
            MetricType::Counter,
        )?;
        for (code, value) in codes {
            family
                .encode_family(&[("code", code)])?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        let histograms = read_histograms(&self.stats);
        for (name, _, help) in HISTOGRAMS {
            let metric = format!(
                "broker_{name}{}",
                if name.ends_with("attempts") {
                    ""
                } else {
                    "_ms"
                }
            );
            let mut family =
                encoder.encode_descriptor(&metric, help, None, MetricType::Histogram)?;
            for (_, label, h) in histograms.iter().filter(|(n, _, _)| n == name) {
                let Histogram {
                    buckets,
                    sum,
                    count,
                } = h;
                family
                    .encode_family(&[("mode", label.as_str())])?
                    .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
            }
        }
        Ok(())
    }
}

/// `GET /metrics`: `503` (with `broker_redis_up 0`) when Redis does not answer.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let read = async {
        Ok::<_, broker_core::queue::QueueError>((
            state.queue.stats().await?,
            state.queue.health(state.dead_after).await?,
            state.queue.operations().await?,
        ))
    };
    let mut snapshot = Snapshot {
        redis_up: false,
        stats: HashMap::new(),
        health: None,
        operations: None,
        now_ms: broker_core::clock::now_ms(),
        sync_waiters: state.sync_waiters(),
        sse_readers: state.sse_readers(),
    };
    match read.await {
        Ok((stats, health, operations)) => {
            snapshot.redis_up = true;
            snapshot.stats = stats;
            snapshot.health = Some(health);
            snapshot.operations = Some(operations);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: redis unreachable"),
    }
    let up = snapshot.redis_up;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "metrics: encoding failed");
        return HttpResponse::InternalServerError().finish();
    }
    let mut response = if up {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(out)
}
