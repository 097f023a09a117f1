//! Figures: percentiles, the JSON line of a run, command counts from `MONITOR`, and the
//! latency-against-load picture.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::load::Results;
use crate::stack::{Stack, Usage};

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The value at quantile `q` of sorted `v`.
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Commands the bench itself sends to Redis around a measurement; not the broker's cost.
/// (The backlog run's polling `HMGET`s are counted: a few hundred per 100,000 messages.)
const OWN: [&str; 1] = ["info"];

/// The JSON line of a run: `head` plus throughput, added latency, Redis, CPU and memory.
pub fn line(head: Value, results: &Results, worker_ms: u64, usage: &Usage) -> Value {
    let mut sorted = results.latencies_us.clone();
    sorted.sort_unstable();
    let worker_us = worker_ms * 1000;
    let added = |q: f64| {
        round(
            quantile(&sorted, q).saturating_sub(worker_us) as f64 / 1000.0,
            3,
        )
    };
    let n = sorted.len();
    let per_msg = |calls: u64| round(calls as f64 / n.max(1) as f64, 2);
    let broker_commands: BTreeMap<&String, &u64> = usage
        .commands
        .iter()
        .filter(|(name, _)| !OWN.contains(&name.as_str()))
        .collect();
    let total: u64 = broker_commands.values().copied().sum();
    let mut top: Vec<(&&String, &&u64)> = broker_commands.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    let top: serde_json::Map<String, Value> = top
        .into_iter()
        .take(24)
        .map(|(name, calls)| ((*name).clone(), json!(per_msg(**calls))))
        .collect();
    let mut line = head;
    line["msgs"] = json!(n);
    line["errors"] = json!(results.errors.len());
    line["elapsed_s"] = json!(round(results.elapsed.as_secs_f64(), 3));
    line["msgs_per_s"] = json!(round(n as f64 / results.elapsed.as_secs_f64().max(1e-9), 0));
    line["added_ms"] = json!({"p50": added(0.5), "p90": added(0.9), "p99": added(0.99),
                              "max": added(1.0)});
    if !results.late_us.is_empty() {
        // Already in `added_ms`: how much of it passed before the send left.
        let mut late = results.late_us.clone();
        late.sort_unstable();
        let ms = |q: f64| round(quantile(&late, q) as f64 / 1000.0, 3);
        line["send_late_ms"] = json!({"p50": ms(0.5), "p99": ms(0.99), "max": ms(1.0)});
    }
    line["redis_cmds_per_msg"] = json!(per_msg(total));
    line["redis_cmds"] = Value::Object(top);
    // Where Redis' time goes, by command (a script's time includes its commands').
    let mut usec: Vec<(&String, &u64)> = usage
        .usec
        .iter()
        .filter(|(name, _)| !OWN.contains(&name.as_str()))
        .collect();
    usec.sort_by(|a, b| b.1.cmp(a.1));
    line["redis_us_per_msg"] = usec
        .into_iter()
        .take(24)
        .map(|(k, v)| (k.clone(), json!(round(*v as f64 / n.max(1) as f64, 1))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    line["cpu_s"] = usage
        .cpu
        .iter()
        .map(|(k, v)| (k.clone(), json!(round(*v, 2))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    line["peak_rss_mib"] = usage
        .rss
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.map(|v| round(v, 1)))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    // Not finite only if the wake-up probe could not run; JSON has no NaN.
    let probe = |v: f64| v.is_finite().then(|| round(v, 1));
    line["probe"] = json!({"cpu_ms": probe(usage.probe.cpu_ms),
                           "wake_rtt_us": probe(usage.probe.wake_rtt_us)});
    if let Some(rewrites) = usage.aof_rewrites {
        line["aof_rewrites"] = json!(rewrites);
    }
    line
}

/// Prints the line, and the first wrong answers; `false` when there were any.
pub fn print(mut line: Value, results: &Results, stack: &Stack) -> bool {
    if !stack.started() {
        // A running broker's drainers and their concurrency are its own, unknown here.
        if let Some(fields) = line.as_object_mut() {
            fields.remove("drainers");
            fields.remove("concurrency");
        }
        line["running"] = json!(true);
    }
    println!("{line}");
    for e in results.errors.iter().take(5) {
        eprintln!("  wrong: {e}");
    }
    if !results.errors.is_empty() {
        eprintln!("  ({} wrong; {})", results.errors.len(), stack.logs());
    }
    results.errors.is_empty()
}

/// Commands counted by Redis' `MONITOR`, split by who ran them.
#[derive(Debug, Default)]
pub struct Counts {
    /// Sent by clients (the broker's processes).
    pub sent: BTreeMap<String, u64>,
    /// Run by Lua scripts.
    pub scripted: BTreeMap<String, u64>,
}

/// A `MONITOR` connection counting commands until stopped.
pub struct Monitor {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Counts>,
}

impl Monitor {
    /// Starts counting on the Redis at `url` (its password and TLS as for any client).
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        // From its return on, every command is reported.
        let monitor = redis::Client::open(url)?.get_async_monitor().await?;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lines = std::pin::pin!(monitor.into_on_message::<String>());
            let mut counts = Counts::default();
            loop {
                tokio::select! {
                    line = lines.next() => match line {
                        Some(l) => count(&mut counts, &l),
                        None => break,
                    },
                    _ = &mut stopped => break,
                }
            }
            counts
        });
        Ok(Self { stop, task })
    }

    pub async fn stop(self) -> Counts {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// `1700000000.123456 [0 127.0.0.1:5555] "evalsha" "..." ...` or `[0 lua]` for scripts.
fn count(counts: &mut Counts, line: &str) {
    let Some((source, rest)) = line.split_once('[').and_then(|(_, r)| r.split_once(']')) else {
        return;
    };
    let name = rest
        .trim_start()
        .strip_prefix('"')
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if OWN.iter().any(|own| own.starts_with(&name)) || name.is_empty() {
        return;
    }
    let map = if source.ends_with(" lua") {
        &mut counts.scripted
    } else {
        &mut counts.sent
    };
    *map.entry(name).or_insert(0) += 1;
}

/// One step of the sweep.
#[derive(Debug, Clone)]
pub struct Point {
    pub offered: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Added latency (log scale) against offered load, p50/p90/p99, as an SVG.
pub fn svg(points: &[Point], machine: &str) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 150.0, 40.0, 60.0);
    let max_x = points.iter().map(|p| p.offered).fold(1.0, f64::max);
    let (lo, hi) = (0.1f64.log10(), 10_000f64.log10());
    let x = |v: f64| left + (w - left - right) * v / max_x;
    let y = |ms: f64| {
        let l = ms.max(0.1).log10().min(hi);
        h - bottom - (h - top - bottom) * (l - lo) / (hi - lo)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="14">Latency added by the broker against offered load (sync, 0 ms worker, open loop)</text>
"#
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{ms} ms</text>"##,
            w - right,
            left - 6.0,
            y(ms) + 4.0,
            y = y(ms)
        );
    }
    let ticks = 6;
    for i in 0..=ticks {
        let v = max_x * i as f64 / ticks as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{top}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{:.0}</text>"##,
            h - bottom,
            h - bottom + 18.0,
            v,
            x = x(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (messages/s)</text>"#,
        (left + w - right) / 2.0,
        h - 22.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}" font-size="10" fill="#666">{}</text>"##,
        h - 6.0,
        escape(machine)
    );
    type Series = (&'static str, &'static str, fn(&Point) -> f64);
    let series: [Series; 3] = [
        ("p50", "#1f77b4", |p| p.p50),
        ("p90", "#ff7f0e", |p| p.p90),
        ("p99", "#d62728", |p| p.p99),
    ];
    for (i, (name, colour, value)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.offered), y(value(p))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x(p.offered),
                y(value(p))
            );
        }
        let ly = top + 20.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
