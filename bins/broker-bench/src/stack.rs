//! The processes under test: redis-server, the mock worker, `broker-api` and drainers, each a
//! real process started from the binaries next to this one, with its CPU time and peak RSS read
//! from `/proc`; or a broker already running, which the bench only measures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use broker_core::local_redis::free_port;

use crate::probe::Probe;

/// The API key and callback secret the bench gives the broker.
pub const API_KEY: &str = "bench-key";
/// The admin key of the stacks the bench starts (`admin`).
pub const ADMIN_KEY: &str = "bench-admin-key";
pub const CALLBACK_SECRET: &str = "bench-callback-secret";

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub worker_ms: u64,
    pub drainers: usize,
    pub concurrency: usize,
    /// `everysec` (the deploy guide's "lose at most ~1 s") or `always`.
    pub fsync: String,
    /// Where the bench's callback receiver listens, allow-listed for callbacks.
    pub callback_port: Option<u16>,
    /// Start the drainers later, with [`Stack::start_drainers`].
    pub defer_drainers: bool,
    /// The mock worker refuses 2% of its requests with a 503 and 2% with a busy 429.
    pub chaos: bool,
    /// `BROKER_RESULT_TTL_SECS` and `BROKER_DEDUP_TTL_SECS` when set: a soak shows memory
    /// levelling off once finished records expire.
    pub result_ttl_secs: Option<u64>,
}

/// A broker the bench did not start (`--api` and its options): it drives load at it and
/// measures what it can reach.
#[derive(Debug, Clone)]
pub struct Running {
    /// The broker API's base URL.
    pub api: String,
    /// The mock worker behind the broker: its record checks the order of the turns, and it
    /// says how long its turns wait.
    pub mock: String,
    /// The broker's Redis, for command counts (`INFO commandstats`, `MONITOR`); optional.
    pub redis: Option<String>,
    /// Processes on this machine whose CPU time and peak RSS go in the lines, by name.
    pub pids: Vec<(String, u32)>,
}

/// One started process.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stack under test. Dropping one the bench started stops every process of it.
pub struct Stack {
    /// Where started processes keep their logs and Redis its files; `None` when the bench
    /// started nothing.
    dir: Option<PathBuf>,
    redis_url: Option<String>,
    api_url: String,
    mock_url: String,
    options: StackOptions,
    bin_dir: PathBuf,
    pub procs: Vec<Proc>,
    /// Processes the bench did not start, measured by pid.
    measured: Vec<(String, u32)>,
}

impl Stack {
    pub fn start(options: StackOptions) -> anyhow::Result<Self> {
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .to_owned();
        for bin in ["broker-api", "broker-drainer", "mock-worker"] {
            if !bin_dir.join(bin).exists() {
                bail!(
                    "{} is missing: build it first (`./dev bench` builds everything in release)",
                    bin_dir.join(bin).display()
                );
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "broker-bench-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let redis_port = free_port()?;
        let mut stack = Self {
            dir: Some(dir),
            redis_url: Some(format!("redis://127.0.0.1:{redis_port}/")),
            api_url: String::new(),
            mock_url: String::new(),
            options,
            bin_dir,
            procs: Vec::new(),
            measured: Vec::new(),
        };
        stack.start_redis(redis_port)?;
        let mock_port = stack.start_serving("mock", |stack, port| {
            let mut mock = Command::new(stack.bin_dir.join("mock-worker"));
            mock.env("MOCK_HOST", "127.0.0.1")
                .env("MOCK_PORT", port.to_string())
                .env("MOCK_LATENCY_MS", stack.options.worker_ms.to_string());
            if stack.options.chaos {
                mock.env("MOCK_RATE_5XX", "0.02")
                    .env("MOCK_RATE_429", "0.02");
            }
            mock
        })?;
        stack.mock_url = format!("http://127.0.0.1:{mock_port}");
        let api_port = stack.start_serving("api", |stack, port| {
            let mut api = Command::new(stack.bin_dir.join("broker-api"));
            stack.broker_env(&mut api).env("PORT", port.to_string());
            api
        })?;
        stack.api_url = format!("http://127.0.0.1:{api_port}");
        if !stack.options.defer_drainers {
            stack.start_drainers()?;
        }
        Ok(stack)
    }

    /// A broker already running: nothing is started, and dropping it stops nothing.
    pub fn attach(running: &Running, options: StackOptions) -> Self {
        Self {
            dir: None,
            redis_url: running.redis.clone(),
            api_url: running.api.clone(),
            mock_url: running.mock.clone(),
            options,
            bin_dir: PathBuf::new(),
            procs: Vec::new(),
            measured: running.pids.clone(),
        }
    }

    /// The directory of a started stack.
    fn dir(&self) -> anyhow::Result<&PathBuf> {
        self.dir
            .as_ref()
            .context("the bench started nothing of a running broker")
    }

    fn start_redis(&mut self, port: u16) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir()?)
            .args(["--appendonly", "yes", "--appendfsync", &self.options.fsync])
            .args([
                "--save",
                "",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ]);
        self.spawn("redis", &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.redis_url().unwrap_or_default()) {
                if let Ok(mut c) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server did not start (is it installed?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops drainer `i` gracefully (SIGTERM: its running turns finish) and starts it again.
    pub fn restart_drainer(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("drainer{i}");
        if let Some(at) = self.procs.iter().position(|p| p.name == name) {
            let mut proc = self.procs.remove(at);
            let _ = Command::new("kill")
                .args(["-TERM", &proc.pid().to_string()])
                .status();
            let _ = proc.child.wait();
        }
        self.start_drainer(i)
    }

    /// Starts the drainer processes.
    pub fn start_drainers(&mut self) -> anyhow::Result<()> {
        for i in 0..self.options.drainers {
            self.start_drainer(i)?;
        }
        Ok(())
    }

    fn start_drainer(&mut self, i: usize) -> anyhow::Result<()> {
        {
            self.start_serving(&format!("drainer{i}"), |stack, port| {
                let mut cmd = Command::new(stack.bin_dir.join("broker-drainer"));
                stack
                    .broker_env(&mut cmd)
                    .env("PORT", port.to_string())
                    .env("DRAINER_ID", format!("bench-{i}"))
                    .env("DRAINER_CONCURRENCY", stack.options.concurrency.to_string());
                cmd
            })?;
        }
        Ok(())
    }

    /// Starts `name` (built by `command` for a port) and waits until it answers `GET /health`
    /// with a 200. A port found free can be taken by another socket before the process binds
    /// it, so a process that exits before it answers is started again on a new port, three
    /// times in all. Errors name the process and end with its log.
    fn start_serving(
        &mut self,
        name: &str,
        command: impl Fn(&Self, u16) -> Command,
    ) -> anyhow::Result<u16> {
        let mut exits = Vec::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = command(self, port);
            self.spawn(name, &mut cmd)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if healthy(port) {
                    return Ok(port);
                }
                let exited = match self.procs.last_mut() {
                    Some(p) => p.child.try_wait()?,
                    None => None,
                };
                if let Some(status) = exited {
                    exits.push(format!("port {port}: {status}"));
                    self.procs.pop();
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{name} did not answer GET /health on port {port} within 20 s; its log \
                         ends:\n{}",
                        self.log_tail(name)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!(
            "{name} exited before it answered GET /health ({}); its log ends:\n{}",
            exits.join(", "),
            self.log_tail(name)
        )
    }

    /// The last lines of a process's log.
    fn log_tail(&self, name: &str) -> String {
        let log = match &self.dir {
            Some(dir) => {
                std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
            }
            None => String::new(),
        };
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn broker_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("REDIS_URL", self.redis_url().unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("BROKER_API_KEY", API_KEY)
            .env("BROKER_ADMIN_KEYS", format!("bench={ADMIN_KEY}"))
            .env("WORKER_BASE_URL", &self.mock_url)
            .env("BROKER_CALLBACK_SECRET", CALLBACK_SECRET)
            .env(
                "BROKER_CALLBACK_ALLOWLIST",
                match self.options.callback_port {
                    Some(p) => format!("127.0.0.1:{p}"),
                    None => "127.0.0.1".into(),
                },
            )
            .envs(self.options.result_ttl_secs.iter().flat_map(|ttl| {
                [
                    ("BROKER_RESULT_TTL_SECS", ttl.to_string()),
                    ("BROKER_DEDUP_TTL_SECS", ttl.to_string()),
                ]
            }))
            // 10,000 sync requests waiting at once must not time out while they wait.
            .env("BROKER_SYNC_TIMEOUT_SECS", "120")
            .env("BROKER_MAX_QUEUE_DEPTH", "100000")
            // The API shares this machine's cores with four other processes: one thread is
            // woken less often than one per core (docs/performance.md, item 24). A
            // BROKER_API_WORKERS in the environment wins.
            .env(
                "BROKER_API_WORKERS",
                std::env::var("BROKER_API_WORKERS").unwrap_or_else(|_| "1".into()),
            )
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir()?.join(format!("{name}.log")))?;
        // A bench killed by a signal drops nothing: its processes would stay behind, holding
        // ports and a core. The kernel stops each of them when the thread that started it
        // ends, and these are all started from the main thread (the runtime is
        // current-thread).
        // A bench killed between fork and that prctl has already gone: the child sees it
        // adopted by another parent and does not start.
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2) and getppid(2), which are async-signal-safe; nothing is allocated.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(())
    }

    /// The broker's Redis, when the bench knows it.
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url.as_deref()
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    pub fn mock_url(&self) -> &str {
        &self.mock_url
    }

    /// Whether the bench started this stack (and so may start and stop parts of it).
    pub fn started(&self) -> bool {
        self.dir.is_some()
    }

    /// A connection to the broker's Redis, when the bench knows it.
    fn redis(&self) -> anyhow::Result<Option<redis::Connection>> {
        self.redis_url()
            .map(|url| {
                redis::Client::open(url)
                    .and_then(|c| c.get_connection())
                    .with_context(|| format!("connect to the broker's Redis at {}", redacted(url)))
            })
            .transpose()
    }

    /// Starts a measurement: probes the machine's speed (while the stack is idle), then
    /// reads Redis' command counts and resets every process's peak RSS. (The counts are
    /// read, not reset: the Redis of a running broker may be watched by others.)
    pub fn begin(&self) -> anyhow::Result<Sample> {
        let probe = crate::probe::probe();
        let redis = match self.redis()? {
            Some(mut c) => Some(RedisSample::read(&mut c)?),
            None => None,
        };
        let pids = self.pids();
        let mut rss_reset = Vec::new();
        for (name, pid) in &pids {
            // "5" resets VmHWM (the peak RSS) to the current RSS. Only the owner of a
            // process may: another user's would report its peak since it started.
            if std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok() {
                rss_reset.push(name.clone());
            }
        }
        Ok(Sample {
            cpu: pids
                .iter()
                .map(|(n, p)| (n.clone(), cpu_seconds(*p)))
                .collect(),
            rss_reset,
            redis,
            probe,
        })
    }

    fn pids(&self) -> BTreeMap<String, u32> {
        let mut pids: BTreeMap<String, u32> = self
            .procs
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
            .chain(self.measured.iter().cloned())
            .collect();
        pids.insert("bench".into(), std::process::id());
        pids
    }

    /// Ends a measurement: CPU seconds and peak RSS per process, Redis commands by name.
    pub fn end(&self, begin: &Sample) -> anyhow::Result<Usage> {
        let mut cpu = BTreeMap::new();
        let mut rss = BTreeMap::new();
        for (name, pid) in self.pids() {
            let before = begin.cpu.get(&name).copied().unwrap_or(0.0);
            cpu.insert(name.clone(), cpu_seconds(pid) - before);
            let reset = begin.rss_reset.contains(&name);
            rss.insert(name, reset.then(|| peak_rss_mib(pid)));
        }
        let (commands, usec, aof_rewrites) = match (self.redis()?, &begin.redis) {
            (Some(mut c), Some(before)) => {
                let after = RedisSample::read(&mut c)?;
                (
                    difference(&after.calls, &before.calls),
                    difference(&after.usec, &before.usec),
                    after
                        .aof_rewrites
                        .zip(before.aof_rewrites)
                        .map(|(end, begin)| end.saturating_sub(begin)),
                )
            }
            _ => Default::default(),
        };
        Ok(Usage {
            cpu,
            rss,
            commands,
            usec,
            aof_rewrites,
            probe: begin.probe,
        })
    }

    /// Where the processes' logs are, for a run with wrong answers.
    pub fn logs(&self) -> String {
        match &self.dir {
            Some(dir) => format!("process logs in {} until the stack stops", dir.display()),
            None => "see the running broker's logs".into(),
        }
    }

    /// What Redis holds now: `used_memory` in bytes, and `MEMORY USAGE` of one key of each
    /// kind the broker keeps per queued message (the first `SCAN` finds for each pattern).
    /// The number of keys in the broker's Redis (`DBSIZE`).
    pub fn redis_keys(&self) -> anyhow::Result<u64> {
        let mut c = self.redis()?.context("the broker's Redis is not known")?;
        Ok(redis::cmd("DBSIZE").query(&mut c)?)
    }

    pub fn redis_memory(&self) -> anyhow::Result<(u64, BTreeMap<&'static str, u64>)> {
        let mut c = self.redis()?.context("the broker's Redis is not known")?;
        let info: String = redis::cmd("INFO").arg("memory").query(&mut c)?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|n| n.trim().parse().ok())
            .context("INFO memory: no used_memory")?;
        let mut keys = BTreeMap::new();
        for (kind, pattern) in [
            ("conv", "*:conv:*"),
            ("queue", "*:q:*"),
            ("message", "*:msg:*"),
            ("events", "*:events:*"),
        ] {
            if let Some(key) = first_key(&mut c, pattern)? {
                let bytes: Option<u64> =
                    redis::cmd("MEMORY").arg("USAGE").arg(&key).query(&mut c)?;
                if let Some(bytes) = bytes {
                    keys.insert(kind, bytes);
                }
            }
        }
        Ok((used, keys))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Broker processes first, Redis last.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// CPU time at the start of a measurement, the processes whose peak RSS was reset, Redis'
/// counts, and the machine's speed just before.
pub struct Sample {
    cpu: BTreeMap<String, f64>,
    rss_reset: Vec<String>,
    redis: Option<RedisSample>,
    probe: Probe,
}

/// Redis' counts at one moment: calls and microseconds per command (`INFO commandstats`),
/// and AOF rewrites (`INFO persistence`; Redis 7.0 and later).
struct RedisSample {
    calls: BTreeMap<String, u64>,
    usec: BTreeMap<String, u64>,
    aof_rewrites: Option<u64>,
}

impl RedisSample {
    fn read(c: &mut redis::Connection) -> anyhow::Result<Self> {
        let info: String = redis::cmd("INFO").arg("commandstats").query(c)?;
        Ok(Self {
            calls: command_stat(&info, "calls="),
            usec: command_stat(&info, "usec="),
            aof_rewrites: aof_rewrites(c)?,
        })
    }
}

/// `after - before` per name, leaving out what did not change.
fn difference(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, n)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// A Redis URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// What a measurement cost.
pub struct Usage {
    pub cpu: BTreeMap<String, f64>,
    /// Peak RSS in MiB over the measurement; `None` for a process whose peak the bench could
    /// not reset (another user's).
    pub rss: BTreeMap<String, Option<f64>>,
    /// Calls per command name from `INFO commandstats`, commands run inside scripts included;
    /// empty when the broker's Redis is not known.
    pub commands: BTreeMap<String, u64>,
    /// Microseconds Redis spent per command name (a script's time includes its commands').
    pub usec: BTreeMap<String, u64>,
    /// AOF rewrites Redis started during the measurement: each forks a child that copies the
    /// whole dataset, on the same two cores. `None` when Redis does not count them (< 7.0).
    pub aof_rewrites: Option<u64>,
    /// How fast the machine was just before the measurement.
    pub probe: Probe,
}

/// The first key `SCAN` finds matching `pattern`, if any.
fn first_key(c: &mut redis::Connection, pattern: &str) -> anyhow::Result<Option<String>> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(c)?;
        if let Some(key) = keys.into_iter().next() {
            return Ok(Some(key));
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

/// `aof_rewrites` of `INFO persistence` (Redis 7.0 and later).
fn aof_rewrites(c: &mut redis::Connection) -> anyhow::Result<Option<u64>> {
    let info: String = redis::cmd("INFO").arg("persistence").query(c)?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("aof_rewrites:"))
        .and_then(|n| n.trim().parse().ok()))
}

/// Whether something on `port` answers `GET /health` with a 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks / per_second.max(1) as f64
}

/// Peak resident set size in MiB, from `VmHWM` in `/proc/<pid>/status`.
/// A process's resident memory now, MiB.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/<pid>/status` (given in kB), MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One figure (`calls=` or `usec=`) of the `cmdstat_<name>:calls=<n>,usec=<n>,...` lines of
/// `INFO commandstats`.
fn command_stat(info: &str, figure: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let value = rest
                .split(',')
                .find_map(|f| f.strip_prefix(figure))?
                .parse()
                .ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

/// The machine, for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, {mem:.0} GiB, Linux {kernel}")
}

/// The version a running Redis reports (`INFO server`).
pub fn running_redis_version(url: &str) -> Option<String> {
    let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
}

pub fn redis_version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with("v="))
                .map(|w| w.trim_start_matches("v=").to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_stack() -> Stack {
        let dir = std::env::temp_dir().join(format!(
            "broker-bench-test-{}-{}",
            std::process::id(),
            free_port().expect("a free port")
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Stack {
            dir: Some(dir),
            redis_url: None,
            api_url: String::new(),
            mock_url: String::new(),
            options: StackOptions {
                worker_ms: 0,
                drainers: 1,
                concurrency: 1,
                fsync: "everysec".into(),
                callback_port: None,
                defer_drainers: true,
                chaos: false,
                result_ttl_secs: None,
            },
            bin_dir: PathBuf::new(),
            procs: Vec::new(),
            measured: Vec::new(),
        }
    }

    #[test]
    fn a_process_that_exits_before_it_answers_is_tried_three_times_and_named() {
        let mut stack = empty_stack();
        let tries = std::cell::Cell::new(0);
        let err = stack
            .start_serving("flaky", |_, port| {
                tries.set(tries.get() + 1);
                let mut cmd = Command::new("sh");
                cmd.args(["-c", &format!("echo cannot bind {port}; exit 3")]);
                cmd
            })
            .expect_err("nothing answered");
        assert_eq!(tries.get(), 3);
        let text = err.to_string();
        assert!(
            text.starts_with("flaky exited before it answered GET /health"),
            "{text}"
        );
        assert_eq!(text.matches("exit status: 3").count(), 3, "{text}");
        assert!(text.contains("its log ends:\ncannot bind "), "{text}");
        assert!(stack.procs.is_empty(), "the exited tries are not kept");
    }
}
