//! `broker-bench`: the broker's benchmark. Starts redis-server, the mock worker, `broker-api` and
//! drainers as real processes (release builds next to this binary), drives load in each
//! delivery mode, checks every answer, and prints one JSON line per run. See
//! `docs/performance.md` for what each scenario measures and the figures.

mod http1;
mod load;
mod probe;
mod report;
mod stack;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use load::{Mode, Receiver, Results, Target};
use serde_json::{json, Value};
use stack::{Running, Stack, StackOptions};

const USAGE: &str = "usage: broker-bench [options] [scenario ...]

scenarios (default: sync callback stream light turns commands):
  sync | callback | stream   closed loop: U conversations x M messages, each conversation
                             sending its next message once the previous result is in
  light                      4 conversations x 500 messages (or --messages), sync: latency
                             at light load
  turns                      the same 4 conversations taking turns, one message in the
                             broker at a time (conversation 0, 1, 2, 3, 0, ...)
  commands                   sync, 50 x 20, with Redis MONITOR: commands sent per message
  sweep                      open loop, sync, at fixed offered rates; --svg draws latency
  wide                       10,000 sync requests waiting at once, 3 s worker, one drainer
                             running all 10,000 turns: peak RSS of broker-api and drainer
  backlog                    per-message cost draining 100,000 messages held by 1,000
                             conversations, then by 100,000 conversations
  admin                      the admin listing of 1,000 waiting conversations among 1,000
                             idle ones, then among 100,000
  soak                       --minutes N (30) at --rate R msg/s (40): sync, stream (20
                             frames) and callback messages, the worker failing 2% of its
                             requests, a drainer restarted every 3 minutes; RSS, Redis
                             memory and keys every 30 s; lost, duplicated and reordered
                             turns at the end
  all                        every scenario above but soak (against a running broker: all
                             but wide, backlog and admin, which need a stack of their own)

options:
  --conversations U   (200)      --messages M  (50)     --worker-ms N  (0)
  --drainers D        (1)        --concurrency C (256, the drainer default)
  --fsync everysec|always  (everysec)
  --rates R1,R2,...   sweep rates in messages/s (500,1000,1500,2000,2500,3000,4000,6000,8000)
  --step-secs S       seconds per sweep rate (4)
  --svg PATH          where the sweep writes its picture
  --backlog N1,N2     conversation counts for backlog (1000,100000)
  --backlog-messages T  messages per backlog run (100000)
  --backlog-rounds R  runs of each backlog count, in mirrored order (A B B A ...) (2)

against a running broker (the bench then starts nothing):
  --api URL           the broker API's base URL; its key from BENCH_API_KEY (default
                      dev-key, the key of `./dev run`)
  --mock URL          the mock worker behind it (required: it checks every answer and the
                      order of the turns, and says how long its turns wait)
  --redis URL         the broker's Redis: command counts, and the commands scenario (optional)
  --pid NAME=PID      a process on this machine whose CPU and peak RSS go in the lines
                      (repeatable; e.g. --pid api=1234 --pid drainer=5678)
  --receiver ADDR     where the callback receiver listens, HOST:PORT the drainer can reach
                      and its BROKER_CALLBACK_ALLOWLIST allows (127.0.0.1:0)
  --worker-ms N       (default: the mock's own MOCK_LATENCY_MS, read from it)";

#[derive(Debug, Clone)]
struct Options {
    conversations: usize,
    messages: usize,
    worker_ms: u64,
    drainers: usize,
    concurrency: usize,
    fsync: String,
    rates: Vec<f64>,
    step_secs: u64,
    svg: Option<String>,
    backlog: Vec<usize>,
    backlog_messages: usize,
    backlog_rounds: usize,
    /// How long `soak` runs, in minutes.
    soak_minutes: u64,
    /// Messages per second `soak` offers.
    soak_rate: f64,
    scenarios: Vec<String>,
    /// Messages per conversation of `light` and `turns`: 500, or `--messages` when given.
    light_messages: usize,
    /// A broker the bench did not start (`--api`), or `None` to start a stack per run.
    running: Option<Running>,
    /// The API key the load sends.
    api_key: String,
    /// Where the callback receiver listens.
    receiver: SocketAddr,
    /// Whether the worker's latency is read from the running mock (no `--worker-ms`).
    worker_ms_from_mock: bool,
    /// Appended to the run's name in message texts and user ids: a running broker's mock
    /// keeps what earlier runs sent, so each bench's conversations must be its own.
    tag: String,
}

impl Options {
    /// The name a run's messages and users carry.
    fn tagged(&self, run: &str) -> String {
        format!("{run}{}", self.tag)
    }
}

/// The scenarios a running broker can serve: `wide` and `backlog` start stacks with their
/// own settings and stop and start the drainers.
const OWN_STACK_ONLY: [&str; 4] = ["wide", "backlog", "admin", "soak"];

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        conversations: 200,
        messages: 50,
        worker_ms: 0,
        drainers: 1,
        concurrency: 256,
        fsync: "everysec".into(),
        rates: vec![
            500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0, 6000.0, 8000.0,
        ],
        step_secs: 4,
        svg: None,
        backlog: vec![1000, 100_000],
        backlog_messages: 100_000,
        backlog_rounds: 2,
        soak_minutes: 30,
        soak_rate: 40.0,
        scenarios: Vec::new(),
        light_messages: 500,
        running: None,
        api_key: stack::API_KEY.into(),
        receiver: SocketAddr::from(([127, 0, 0, 1], 0)),
        worker_ms_from_mock: false,
        tag: String::new(),
    };
    let (mut api, mut mock, mut redis, mut pids) = (None, None, None, Vec::new());
    // Options that configure a stack the bench starts, and the running broker's, as given.
    let (mut stack_set, mut running_set) = (Vec::new(), Vec::new());
    let mut worker_ms_set = false;
    let mut all = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value\n\n{USAGE}"))
        };
        fn number<T: std::str::FromStr>(name: &str, v: &str) -> anyhow::Result<T> {
            v.parse()
                .map_err(|_| anyhow::anyhow!("{name}: not a number: {v:?}"))
        }
        fn list<T: std::str::FromStr>(name: &str, v: &str) -> anyhow::Result<Vec<T>> {
            v.split(',').map(|x| number(name, x.trim())).collect()
        }
        match arg.as_str() {
            "--drainers" | "--concurrency" | "--fsync" => stack_set.push(arg.clone()),
            "--mock" | "--redis" | "--pid" | "--receiver" => running_set.push(arg.clone()),
            "--worker-ms" => worker_ms_set = true,
            _ => {}
        }
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--conversations" => o.conversations = number(&arg, &value(&arg)?)?,
            "--messages" => {
                o.messages = number(&arg, &value(&arg)?)?;
                o.light_messages = o.messages;
            }
            "--worker-ms" => o.worker_ms = number(&arg, &value(&arg)?)?,
            "--drainers" => o.drainers = number(&arg, &value(&arg)?)?,
            "--concurrency" => o.concurrency = number(&arg, &value(&arg)?)?,
            "--fsync" => {
                o.fsync = value(&arg)?;
                if o.fsync != "everysec" && o.fsync != "always" {
                    bail!("--fsync: everysec or always, not {:?}", o.fsync);
                }
            }
            "--rates" => o.rates = list(&arg, &value(&arg)?)?,
            "--step-secs" => o.step_secs = number(&arg, &value(&arg)?)?,
            "--svg" => o.svg = Some(value(&arg)?),
            "--backlog" => o.backlog = list(&arg, &value(&arg)?)?,
            "--backlog-messages" => o.backlog_messages = number(&arg, &value(&arg)?)?,
            "--backlog-rounds" => o.backlog_rounds = number(&arg, &value(&arg)?)?,
            "--minutes" => o.soak_minutes = number::<u64>(&arg, &value(&arg)?)?,
            "--rate" => o.soak_rate = number::<f64>(&arg, &value(&arg)?)?,
            "--api" => api = Some(url(&arg, &value(&arg)?, &["http", "https"])?),
            "--mock" => mock = Some(url(&arg, &value(&arg)?, &["http", "https"])?),
            "--redis" => redis = Some(url(&arg, &value(&arg)?, &["redis", "rediss"])?),
            "--pid" => {
                let (name, pid) = pid(&value(&arg)?)?;
                if pids.iter().any(|(n, _)| *n == name) {
                    bail!("--pid: {name} is named twice");
                }
                pids.push((name, pid));
            }
            "--receiver" => {
                let v = value(&arg)?;
                let addr: SocketAddr = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--receiver: not HOST:PORT: {v:?}"))?;
                if addr.ip().is_unspecified() {
                    bail!("--receiver: {v} is no address a drainer can call back: name the host");
                }
                o.receiver = addr;
            }
            "sync" | "callback" | "stream" | "light" | "turns" | "commands" | "sweep" | "wide"
            | "backlog" | "admin" | "soak" => o.scenarios.push(arg),
            "all" => all = true,
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    match (api, mock) {
        (Some(api), Some(mock)) => {
            if !stack_set.is_empty() {
                bail!(
                    "{}: these set up a stack the bench starts; a running broker (--api) has \
                     its own",
                    stack_set.join(", ")
                );
            }
            o.running = Some(Running {
                api,
                mock,
                redis,
                pids,
            });
            o.api_key = std::env::var("BENCH_API_KEY").unwrap_or_else(|_| "dev-key".into());
            // Unique per bench: the running mock's record keeps earlier runs' conversations.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            o.tag = format!(".{:x}{:x}", std::process::id(), nanos);
            o.worker_ms_from_mock = !worker_ms_set;
        }
        (Some(_), None) => bail!(
            "--api needs --mock: the mock worker behind the broker, whose answers and record \
             check every message"
        ),
        (None, _) if !running_set.is_empty() => bail!(
            "{}: only for a running broker, named with --api",
            running_set.join(", ")
        ),
        (None, _) => {}
    }
    let running = o.running.is_some();
    let has_redis = o.running.as_ref().is_none_or(|r| r.redis.is_some());
    if all {
        o.scenarios.extend(
            [
                "sync", "callback", "stream", "light", "turns", "commands", "sweep", "wide",
                "backlog", "admin",
            ]
            .into_iter()
            .filter(|s| !running || !OWN_STACK_ONLY.contains(s))
            .filter(|s| has_redis || *s != "commands")
            .map(String::from),
        );
    }
    if o.scenarios.is_empty() {
        o.scenarios = ["sync", "callback", "stream", "light", "turns", "commands"]
            .into_iter()
            .filter(|s| has_redis || *s != "commands")
            .map(String::from)
            .collect();
    }
    if running {
        if let Some(s) = o
            .scenarios
            .iter()
            .find(|s| OWN_STACK_ONLY.contains(&s.as_str()))
        {
            bail!("{s} starts a stack with settings of its own: run it without --api");
        }
        if !has_redis && o.scenarios.iter().any(|s| s == "commands") {
            bail!("commands counts with Redis' MONITOR: give the broker's Redis with --redis");
        }
    }
    if o.conversations == 0
        || o.messages == 0
        || o.drainers == 0
        || o.concurrency == 0
        || o.backlog_rounds == 0
    {
        bail!("--conversations, --messages, --drainers, --concurrency and --backlog-rounds must be at least 1");
    }
    Ok(o)
}

/// A URL whose scheme is one of `schemes`.
fn url(name: &str, v: &str, schemes: &[&str]) -> anyhow::Result<String> {
    match v.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => {
            Ok(v.trim_end_matches('/').to_owned())
        }
        _ => bail!(
            "{name}: not a {} URL: {:?}",
            schemes.join(" or "),
            stack::redacted(v)
        ),
    }
}

/// `NAME=PID` of a process on this machine.
fn pid(v: &str) -> anyhow::Result<(String, u32)> {
    let (name, pid) = v
        .split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--pid: not NAME=PID: {v:?}"))?;
    let pid: u32 = pid
        .parse()
        .map_err(|_| anyhow::anyhow!("--pid: not a process id: {pid:?}"))?;
    if name == "bench" {
        bail!("--pid: the name bench is the bench's own");
    }
    if std::fs::metadata(format!("/proc/{pid}/stat")).is_err() {
        bail!("--pid: no process {pid} on this machine");
    }
    Ok((name.to_owned(), pid))
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("broker-bench: {e}");
            std::process::exit(64);
        }
    };
    // 10,000 connections at once need 10,000 descriptors on each side; children inherit it.
    broker_core::limits::raise_open_files();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broker-bench: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(options)) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("broker-bench: some answers were wrong (see the lines above)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("broker-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the scenarios; `Ok(false)` when an answer was wrong.
async fn run(mut o: Options) -> anyhow::Result<bool> {
    let head = if let Some(r) = &o.running {
        let stats = load::mock_stats(&r.mock)
            .await
            .map_err(|e| anyhow::anyhow!("--mock: {e}"))?;
        if o.worker_ms_from_mock {
            o.worker_ms = stats["latency_ms"]
                .as_u64()
                .context("--mock: its stats do not say its latency: give --worker-ms")?;
        }
        // The running broker's Redis and persistence are its own.
        json!({"machine": stack::machine(), "api": r.api, "mock": r.mock,
               "worker_jitter_ms": stats["jitter_ms"],
               "redis": r.redis.as_deref().and_then(stack::running_redis_version)})
    } else {
        json!({"machine": stack::machine(), "redis": stack::redis_version(), "fsync": o.fsync})
    };
    println!("{head}");
    let mut all_right = true;
    for scenario in o.scenarios.clone() {
        let right = match scenario.as_str() {
            "sync" => closed(&o, "sync", Mode::Sync, (o.conversations, o.messages), false).await?,
            "callback" => {
                let load = (o.conversations, o.messages);
                closed(&o, "callback", Mode::Callback, load, false).await?
            }
            "stream" => {
                let load = (o.conversations, o.messages);
                closed(&o, "stream", Mode::Stream, load, false).await?
            }
            "light" => closed(&o, "light", Mode::Sync, (4, o.light_messages), false).await?,
            "turns" => closed(&o, "turns", Mode::Sync, (4, o.light_messages), true).await?,
            "commands" => commands(&o).await?,
            "sweep" => sweep(&o).await?,
            "wide" => wide(&o).await?,
            "backlog" => backlog(&o).await?,
            "admin" => admin_listing(&o).await?,
            "soak" => soak(&o).await?,
            _ => true,
        };
        all_right &= right;
    }
    Ok(all_right)
}

fn stack_options(o: &Options, callback_port: Option<u16>) -> StackOptions {
    StackOptions {
        worker_ms: o.worker_ms,
        drainers: o.drainers,
        concurrency: o.concurrency,
        fsync: o.fsync.clone(),
        callback_port,
        defer_drainers: false,
        chaos: false,
        result_ttl_secs: None,
    }
}

/// A stack for one run: started afresh, or the running broker.
fn stack_for(o: &Options, options: StackOptions) -> anyhow::Result<Stack> {
    match &o.running {
        Some(r) => Ok(Stack::attach(r, options)),
        None => Stack::start(options),
    }
}

/// The load's target on `stack`.
fn target(o: &Options, stack: &Stack, receiver: Option<Receiver>) -> anyhow::Result<Target> {
    Target::new(stack.api_url(), &o.api_key, receiver)
}

async fn receiver_for(o: &Options, mode: Mode) -> anyhow::Result<Option<Receiver>> {
    Ok(if mode == Mode::Callback {
        let r = Receiver::start(o.receiver)
            .await
            .with_context(|| format!("the callback receiver on {}", o.receiver))?;
        Some(r)
    } else {
        None
    })
}

/// Warms connections up with two messages per conversation (not measured).
async fn warm_up(
    o: &Options,
    target: &Target,
    mode: Mode,
    conversations: usize,
) -> anyhow::Result<()> {
    let r = load::closed_loop(target, mode, &o.tagged("warm"), conversations, 2).await;
    if let Some(e) = r.errors.first() {
        let refused = e.contains("status 401") || e.contains("status 403");
        let hint = if o.running.is_some() && refused {
            " (the API refused the key: set BENCH_API_KEY to one of its keys)"
        } else {
            ""
        };
        bail!("warm-up against {} failed: {e}{hint}", target.api());
    }
    Ok(())
}

/// A closed-loop run on a fresh stack: each conversation sends its next message once its
/// last answer is in, all at once, or, `in_turn`, one conversation after the other.
async fn closed(
    o: &Options,
    run: &str,
    mode: Mode,
    (conversations, messages): (usize, usize),
    in_turn: bool,
) -> anyhow::Result<bool> {
    let receiver = receiver_for(o, mode).await?;
    let stack = stack_for(o, stack_options(o, receiver.as_ref().map(Receiver::port)))?;
    let target = target(o, &stack, receiver.clone())?;
    warm_up(o, &target, mode, conversations).await?;
    let name = o.tagged(run);
    let begin = stack.begin()?;
    let mut results = if in_turn {
        load::in_turn(&target, mode, &name, conversations, messages).await
    } else {
        load::closed_loop(&target, mode, &name, conversations, messages).await
    };
    let usage = stack.end(&begin)?;
    results
        .errors
        .extend(load::check_order(stack.mock_url(), &name, conversations, messages).await);
    if let Some(r) = &receiver {
        results.errors.extend(r.unexpected());
    }
    let line = report::line(
        json!({"run": run, "mode": mode.name(), "conversations": conversations,
               "messages": messages, "in_turn": in_turn, "worker_ms": o.worker_ms,
               "drainers": o.drainers, "concurrency": o.concurrency}),
        &results,
        o.worker_ms,
        &usage,
    );
    Ok(report::print(line, &results, &stack))
}

/// Counts the commands each message costs with Redis' `MONITOR`: those the broker sends and
/// those its scripts run.
async fn commands(o: &Options) -> anyhow::Result<bool> {
    let (conversations, messages) = (50, 20);
    let stack = stack_for(o, stack_options(o, None))?;
    let target = target(o, &stack, None)?;
    warm_up(o, &target, Mode::Sync, conversations).await?;
    let url = stack
        .redis_url()
        .context("commands needs the broker's Redis")?;
    let monitor = report::Monitor::start(url).await?;
    let name = o.tagged("cmds");
    let begin = stack.begin()?;
    let mut results = load::closed_loop(&target, Mode::Sync, &name, conversations, messages).await;
    let usage = stack.end(&begin)?;
    let counts = monitor.stop().await;
    results
        .errors
        .extend(load::check_order(stack.mock_url(), &name, conversations, messages).await);
    let n = results.latencies_us.len().max(1) as f64;
    let per = |m: &std::collections::BTreeMap<String, u64>| -> Value {
        m.iter()
            .map(|(k, v)| (k.clone(), json!(report::round(*v as f64 / n, 2))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let sent: u64 = counts.sent.values().sum();
    let scripted: u64 = counts.scripted.values().sum();
    let mut line = report::line(
        json!({"run": "commands", "mode": "sync", "conversations": conversations,
               "messages": messages, "worker_ms": o.worker_ms, "drainers": o.drainers}),
        &results,
        o.worker_ms,
        &usage,
    );
    line["redis_sent_per_msg"] = json!(report::round(sent as f64 / n, 2));
    line["redis_in_scripts_per_msg"] = json!(report::round(scripted as f64 / n, 2));
    line["redis_sent"] = per(&counts.sent);
    line["redis_in_scripts"] = per(&counts.scripted);
    line["note"] = json!("MONITOR slows Redis: throughput and latency of this run are not figures");
    Ok(report::print(line, &results, &stack))
}

/// Open-loop sweep: latency against offered load.
async fn sweep(o: &Options) -> anyhow::Result<bool> {
    let conversations = 2000;
    let stack = stack_for(o, stack_options(o, None))?;
    let target = target(o, &stack, None)?;
    warm_up(o, &target, Mode::Sync, 200).await?;
    let mut points = Vec::new();
    let mut all_right = true;
    for (step, rate) in o.rates.iter().copied().enumerate() {
        let run = o.tagged(&format!("sweep{step}"));
        let begin = stack.begin()?;
        let results = load::open_loop(
            &target,
            Mode::Sync,
            &run,
            conversations,
            rate,
            Duration::from_secs(o.step_secs),
        )
        .await;
        let usage = stack.end(&begin)?;
        let achieved = results.latencies_us.len() as f64 / results.elapsed.as_secs_f64();
        let mut line = report::line(
            json!({"run": "sweep", "mode": "sync", "offered_per_s": rate,
                   "conversations": conversations, "worker_ms": o.worker_ms,
                   "drainers": o.drainers}),
            &results,
            o.worker_ms,
            &usage,
        );
        line["msgs_per_s"] = json!(report::round(achieved, 0));
        points.push(report::Point {
            offered: rate,
            p50: line["added_ms"]["p50"].as_f64().unwrap_or(0.0),
            p90: line["added_ms"]["p90"].as_f64().unwrap_or(0.0),
            p99: line["added_ms"]["p99"].as_f64().unwrap_or(0.0),
        });
        let p99 = line["added_ms"]["p99"].as_f64().unwrap_or(0.0);
        all_right &= report::print(line, &results, &stack);
        if achieved < 0.5 * rate || p99 > 2000.0 {
            println!("{}", json!({"run": "sweep", "saturated_at_per_s": rate}));
            break;
        }
    }
    if let Some(path) = &o.svg {
        std::fs::write(path, report::svg(&points, &stack::machine()))?;
        println!("{}", json!({"run": "sweep", "svg": path}));
    }
    Ok(all_right)
}

/// 10,000 sync requests waiting at once on one API; one drainer running all 10,000 turns.
async fn wide(o: &Options) -> anyhow::Result<bool> {
    let conversations = 10_000;
    let worker_ms = 3000;
    let options = StackOptions {
        worker_ms,
        drainers: 1,
        concurrency: conversations,
        ..stack_options(o, None)
    };
    let stack = Stack::start(options)?;
    let target = target(o, &stack, None)?;
    let begin = stack.begin()?;
    let results = load::closed_loop(&target, Mode::Sync, "wide", conversations, 1).await;
    let usage = stack.end(&begin)?;
    let line = report::line(
        json!({"run": "wide", "mode": "sync", "conversations": conversations, "messages": 1,
               "worker_ms": worker_ms, "drainers": 1, "concurrency": conversations}),
        &results,
        worker_ms,
        &usage,
    );
    Ok(report::print(line, &results, &stack))
}

/// Per-message cost draining the same number of messages held by few or many conversations.
///
/// Each count runs `--backlog-rounds` times, every other round in reverse order (A B B A):
/// the machine's speed drifts by more than the figure measures within a run of a minute, and
/// a drift that is even over the run then moves both counts alike. The ratio is of the means.
async fn backlog(o: &Options) -> anyhow::Result<bool> {
    let mut all_right = true;
    let mut per_message: Vec<(usize, f64)> = Vec::new();
    let order = (0..o.backlog_rounds).flat_map(|round| {
        let mut counts = o.backlog.clone();
        if round % 2 == 1 {
            counts.reverse();
        }
        counts
    });
    for conversations in order {
        let messages = (o.backlog_messages / conversations).max(1);
        let total = conversations * messages;
        let stack = Stack::start(StackOptions {
            defer_drainers: true,
            ..stack_options(o, None)
        })?;
        let target = target(o, &stack, None)?;
        let (empty, _) = stack.redis_memory()?;
        let loaded = Instant::now();
        if let Err(e) = load::preload(&target, "backlog", conversations, messages, 256).await {
            bail!("backlog preload: {e}");
        }
        let preload_s = loaded.elapsed().as_secs_f64();
        let (full, keys) = stack.redis_memory()?;
        let begin = stack.begin()?;
        let started = Instant::now();
        let mut stack = stack;
        stack.start_drainers()?;
        wait_drained(&stack, Duration::from_secs(600)).await?;
        let elapsed = started.elapsed();
        let usage = stack.end(&begin)?;
        let (drained, kept) = stack.redis_memory()?;
        let mut results = Results {
            elapsed,
            ..Results::default()
        };
        results.errors =
            load::check_order(stack.mock_url(), "backlog", conversations, messages).await;
        let per_msg_us = elapsed.as_secs_f64() * 1e6 / total as f64;
        per_message.push((conversations, per_msg_us));
        let mut line = report::line(
            json!({"run": "backlog", "mode": "async", "conversations": conversations,
                   "messages": messages, "worker_ms": o.worker_ms, "drainers": o.drainers,
                   "concurrency": o.concurrency}),
            &results,
            o.worker_ms,
            &usage,
        );
        line["msgs"] = json!(total);
        // Latency is not measured here: a backlog message waits behind the whole backlog.
        line["added_ms"] = Value::Null;
        line["msgs_per_s"] = json!(report::round(total as f64 / elapsed.as_secs_f64(), 0));
        line["drain_us_per_msg"] = json!(report::round(per_msg_us, 1));
        line["preload_s"] = json!(report::round(preload_s, 2));
        // What the queued backlog holds in Redis, per message: with one message per
        // conversation, what an open conversation costs. Then what each finished message
        // keeps for the result TTL (its record and its stream of frames).
        line["redis_bytes_per_queued"] = json!(full.saturating_sub(empty) / total as u64);
        line["redis_key_bytes_queued"] = json!(keys);
        line["redis_bytes_per_finished"] = json!(drained.saturating_sub(empty) / total as u64);
        line["redis_key_bytes_finished"] = json!(kept);
        line["redis_cmds_per_msg"] = json!(report::round(
            usage.commands.values().sum::<u64>() as f64 / total as f64,
            2
        ));
        all_right &= report::print(line, &results, &stack);
    }
    let mean = |count: usize| {
        let runs: Vec<f64> = per_message
            .iter()
            .filter(|(c, _)| *c == count)
            .map(|(_, us)| *us)
            .collect();
        runs.iter().sum::<f64>() / runs.len().max(1) as f64
    };
    if let (Some(&first), Some(&last)) = (o.backlog.first(), o.backlog.last()) {
        if o.backlog.len() > 1 {
            let (few, many) = (mean(first), mean(last));
            println!(
                "{}",
                json!({"run": "backlog", "cost_ratio": report::round(many / few, 2),
                       "of": format!("{last} conversations vs {first}"),
                       "drain_us_per_msg": {first.to_string(): report::round(few, 1),
                                            last.to_string(): report::round(many, 1)},
                       "rounds": o.backlog_rounds})
            );
        }
    }
    Ok(all_right)
}

/// What the admin listing of the 1,000 oldest waiting conversations costs among 1,000 and
/// among 100,000 idle ones (conversations whose messages all finished): the median time of 20
/// listings and the Redis commands they ran, with the drainers paused so that the 1,000 stay
/// waiting. Each count runs twice, in mirrored order (A B B A), as `backlog` does.
async fn admin_listing(o: &Options) -> anyhow::Result<bool> {
    let waiting = 1_000;
    let mut medians: Vec<(usize, f64)> = Vec::new();
    for idle in [1_000, 100_000, 100_000, 1_000] {
        let stack = Stack::start(stack_options(o, None))?;
        let target = target(o, &stack, None)?;
        if let Err(e) = load::preload(&target, "idle", idle, 1, 256).await {
            bail!("admin preload: {e}");
        }
        wait_drained(&stack, Duration::from_secs(600)).await?;
        let client = redis::Client::open(stack.redis_url().context("no Redis")?)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys = broker_core::Keys::new("bt", "0");
        let _: () =
            redis::AsyncCommands::set(&mut conn, keys.paused(), "{\"by\":\"bench\"}").await?;
        if let Err(e) = load::preload(&target, "waiting", waiting, 1, 256).await {
            bail!("admin preload: {e}");
        }
        let path = format!("/admin/v1/conversations?state=waiting&limit={waiting}");
        let commands = || async {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn.clone())
                .await
                .unwrap_or_default();
            info.lines()
                .filter_map(|l| {
                    l.split("calls=")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum::<u64>()
        };
        let before = commands().await;
        let mut times = Vec::new();
        let mut listed = 0;
        for _ in 0..20 {
            let started = Instant::now();
            let (status, body) = target
                .admin_get(&path, stack::ADMIN_KEY)
                .await
                .map_err(anyhow::Error::msg)?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                bail!("admin listing: status {status}");
            }
            let body: Value = serde_json::from_slice(&body)?;
            listed = body["conversations"].as_array().map_or(0, Vec::len);
        }
        // The INFO call itself counts once.
        let per_listing = commands().await.saturating_sub(before + 1) as f64 / times.len() as f64;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        medians.push((idle, median));
        println!(
            "{}",
            json!({"run": "admin", "idle_conversations": idle, "waiting_conversations": waiting,
                   "listed": listed, "listing_ms_median": report::round(median, 2),
                   "listing_ms_max": report::round(times[times.len() - 1], 2),
                   "redis_commands_per_listing": report::round(per_listing, 1)})
        );
        if listed != waiting {
            bail!("the listing showed {listed} of {waiting} waiting conversations");
        }
    }
    let mean = |idle: usize| {
        let runs: Vec<f64> = medians
            .iter()
            .filter(|(i, _)| *i == idle)
            .map(|(_, m)| *m)
            .collect();
        runs.iter().sum::<f64>() / runs.len().max(1) as f64
    };
    println!(
        "{}",
        json!({"run": "admin", "cost_ratio": report::round(mean(100_000) / mean(1_000), 2),
               "of": "listing 1,000 waiting among 100,000 idle vs among 1,000 (means of 2 runs)"})
    );
    Ok(true)
}

/// A long run at a steady rate (`./dev bench soak --minutes N`): 200 conversations, each
/// sending one message at a time in turn by sync, stream (20 progress frames) and callback,
/// every answer checked;
/// the mock worker refuses 2% of its requests (503, 429) and one of two drainers is stopped
/// (SIGTERM) and started again every 3 minutes. Every 30 s a line with the processes' RSS and
/// Redis' memory and key count; at the end the counts.
async fn soak(o: &Options) -> anyhow::Result<bool> {
    let conversations = 200usize;
    let minutes = o.soak_minutes.max(1);
    let receiver = receiver_for(o, Mode::Callback).await?;
    // Finished records expire after 2 minutes: memory and keys level off within the run.
    let options = StackOptions {
        drainers: 2,
        chaos: true,
        result_ttl_secs: Some(120),
        ..stack_options(o, receiver.as_ref().map(Receiver::port))
    };
    let mut stack = Stack::start(options)?;
    let target = std::sync::Arc::new(target(o, &stack, receiver)?);
    let run = o.tagged("soak");
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    // Each conversation sends every `interval`, one message at a time.
    let interval = Duration::from_secs_f64(conversations as f64 / o.soak_rate.max(0.1));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conversations {
        let (target, run) = (target.clone(), run.clone());
        tasks.spawn(async move {
            let mut sent = 0usize;
            let mut failed = Vec::new();
            // Spread over the first interval.
            tokio::time::sleep(interval.mul_f64(c as f64 / conversations as f64)).await;
            while Instant::now() < end {
                let started = Instant::now();
                let (mode, text) = soak_message(&run, c, sent);
                if let Err(e) = load::send(&target, mode, &load::user(&run, c), &text).await {
                    failed.push((sent, format!("c{c} m{sent} ({}): {e}", mode.name())));
                }
                sent += 1;
                tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
            }
            (c, sent, failed)
        });
    }
    let started = Instant::now();
    let mut next_sample = started;
    let mut next_restart = started + Duration::from_secs(180);
    let mut restarts = 0;
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            let (memory, _) = stack.redis_memory()?;
            let keys = stack.redis_keys()?;
            let rss: std::collections::BTreeMap<String, f64> = stack
                .procs
                .iter()
                .map(|p| (p.name.clone(), stack::rss_mib(p.pid())))
                .collect();
            println!(
                "{}",
                json!({"run": "soak", "minute": report::round(started.elapsed().as_secs_f64() / 60.0, 1),
                       "rss_mib": rss, "redis_used_bytes": memory, "redis_keys": keys,
                       "restarts": restarts})
            );
            next_sample += Duration::from_secs(30);
        }
        if Instant::now() >= next_restart {
            stack.restart_drainer(0)?;
            restarts += 1;
            next_restart += Duration::from_secs(180);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sent = vec![0usize; conversations];
    // Messages the broker answered with the worker's refusal (the mock refused every attempt:
    // at 2% a try and three tries, about one in 100,000): answered, not lost, never started.
    let mut refused: Vec<Vec<usize>> = vec![Vec::new(); conversations];
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (c, n, f) = done?;
        sent[c] = n;
        for (i, why) in f {
            if why.contains("WORKER_UNAVAILABLE") {
                refused[c].push(i);
            } else {
                failed.push(why);
            }
        }
    }
    wait_drained(&stack, Duration::from_secs(120)).await?;
    let stats = load::mock_stats(stack.mock_url())
        .await
        .map_err(anyhow::Error::msg)?;
    let (mut duplicated, mut reordered, mut missing) = (0usize, 0usize, 0usize);
    for (c, n) in sent.iter().enumerate() {
        let want: Vec<String> = (0..*n)
            .filter(|i| !refused[c].contains(i))
            .map(|i| soak_message(&run, c, i).1)
            .collect();
        let key = stats["started"]
            .as_object()
            .and_then(|m| {
                m.iter()
                    .find(|(k, _)| k.rsplit(':').next() == Some(&load::user(&run, c)))
            })
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let got = load::texts_of(&key);
        let mut deduped = got.clone();
        deduped.dedup();
        duplicated += got.len() - deduped.len();
        missing += want.iter().filter(|w| !deduped.contains(w)).count();
        let order: Vec<&String> = deduped.iter().filter(|g| want.contains(g)).collect();
        if order.iter().zip(want.iter()).any(|(g, w)| *g != w) {
            reordered += 1;
        }
    }
    let total: usize = sent.iter().sum();
    let violations = stats["violations"].as_array().map_or(0, Vec::len);
    println!(
        "{}",
        json!({"run": "soak", "minutes": minutes, "rate_per_s": o.soak_rate, "accepted": total,
               "answered_wrong_or_not": failed.len(), "lost_turns": missing,
               "answered_worker_unavailable": refused.iter().map(Vec::len).sum::<usize>(),
               "duplicated_turns": duplicated, "reordered_conversations": reordered,
               "concurrency_violations": violations, "drainer_restarts": restarts,
               "first_failures": failed.iter().take(5).collect::<Vec<_>>()})
    );
    Ok(failed.is_empty() && missing == 0 && reordered == 0 && violations == 0)
}

/// How message `i` of conversation `c` of a soak is sent, and its text: sync, stream and
/// callback in turn; a streamed turn sends 20 progress frames 10 ms apart before its answer.
fn soak_message(run: &str, c: usize, i: usize) -> (Mode, String) {
    let mode = [Mode::Sync, Mode::Stream, Mode::Callback][(c + i) % 3];
    let text = load::text(run, c, i);
    if mode == Mode::Stream {
        (mode, format!("{text} [mock:progress=20,gap=10]"))
    } else {
        (mode, text)
    }
}

/// Polls the broker's stats until nothing is queued or running.
async fn wait_drained(stack: &Stack, limit: Duration) -> anyhow::Result<()> {
    let client = redis::Client::open(stack.redis_url().context("no Redis to poll")?)?;
    // The crate's default response timeout (500 ms) is shorter than Redis can take to answer
    // while it drains a 100,000-message backlog on this machine: a full run failed on it.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(limit));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let keys = broker_core::Keys::new("bt", "0");
    let deadline = Instant::now() + limit;
    loop {
        let (queued, processing): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(keys.stats())
            .arg("queued")
            .arg("processing")
            .query_async(&mut conn)
            .await?;
        if queued.unwrap_or(0) <= 0 && processing.unwrap_or(0) <= 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not drained after {limit:?}: {queued:?} queued, {processing:?} running");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
