//! The processes under test: redis-server, the mock worker, `broker-api` and drainers, each a
//! real process started from the binaries next to this one, with its CPU time and peak RSS read
//! from `/proc`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use broker_core::local_redis::free_port;

use crate::probe::Probe;

/// The API key and callback secret the bench gives the broker.
pub const API_KEY: &str = "bench-key";
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

/// A running stack. Dropping it stops every process.
pub struct Stack {
    pub dir: PathBuf,
    pub redis_port: u16,
    pub api_port: u16,
    pub mock_port: u16,
    options: StackOptions,
    bin_dir: PathBuf,
    pub procs: Vec<Proc>,
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
        let mut stack = Self {
            dir,
            redis_port: free_port()?,
            api_port: 0,
            mock_port: 0,
            options,
            bin_dir,
            procs: Vec::new(),
        };
        stack.start_redis()?;
        stack.mock_port = stack.start_serving("mock", |stack, port| {
            let mut mock = Command::new(stack.bin_dir.join("mock-worker"));
            mock.env("MOCK_HOST", "127.0.0.1")
                .env("MOCK_PORT", port.to_string())
                .env("MOCK_LATENCY_MS", stack.options.worker_ms.to_string());
            mock
        })?;
        stack.api_port = stack.start_serving("api", |stack, port| {
            let mut api = Command::new(stack.bin_dir.join("broker-api"));
            stack.broker_env(&mut api).env("PORT", port.to_string());
            api
        })?;
        if !stack.options.defer_drainers {
            stack.start_drainers()?;
        }
        Ok(stack)
    }

    fn start_redis(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.redis_port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--dir")
        .arg(&self.dir)
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
            if let Ok(client) = redis::Client::open(self.redis_url()) {
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

    /// Starts the drainer processes.
    pub fn start_drainers(&mut self) -> anyhow::Result<()> {
        for i in 0..self.options.drainers {
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
        let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn broker_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("REDIS_URL", self.redis_url())
            .env("HOST", "127.0.0.1")
            .env("BROKER_API_KEY", API_KEY)
            .env(
                "WORKER_BASE_URL",
                format!("http://127.0.0.1:{}", self.mock_port),
            )
            .env("BROKER_CALLBACK_SECRET", CALLBACK_SECRET)
            .env(
                "BROKER_CALLBACK_ALLOWLIST",
                match self.options.callback_port {
                    Some(p) => format!("127.0.0.1:{p}"),
                    None => "127.0.0.1".into(),
                },
            )
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
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        // A bench killed by a signal drops nothing: its processes would stay behind, holding
        // ports and a core. The kernel stops each of them when the thread that started it
        // ends, and these are all started from the main thread (the runtime is
        // current-thread).
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe; its result is checked, nothing is allocated.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
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

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis_port)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Starts a measurement: probes the machine's speed (while the stack is idle), then
    /// resets Redis' command counts and every process's peak RSS.
    pub fn begin(&self) -> anyhow::Result<Sample> {
        let probe = crate::probe::probe();
        let mut c = redis::Client::open(self.redis_url())?.get_connection()?;
        redis::cmd("CONFIG").arg("RESETSTAT").query::<()>(&mut c)?;
        let pids = self.pids();
        for pid in pids.values() {
            // "5" resets VmHWM (the peak RSS) to the current RSS.
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
        Ok(Sample {
            cpu: pids
                .iter()
                .map(|(n, p)| (n.clone(), cpu_seconds(*p)))
                .collect(),
            aof_rewrites: aof_rewrites(&mut c)?,
            probe,
        })
    }

    fn pids(&self) -> BTreeMap<String, u32> {
        let mut pids: BTreeMap<String, u32> = self
            .procs
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
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
            rss.insert(name, peak_rss_mib(pid));
        }
        let mut c = redis::Client::open(self.redis_url())?.get_connection()?;
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut c)?;
        let rewrites = aof_rewrites(&mut c)?;
        Ok(Usage {
            cpu,
            rss,
            commands: command_stat(&info, "calls="),
            usec: command_stat(&info, "usec="),
            aof_rewrites: rewrites
                .zip(begin.aof_rewrites)
                .map(|(end, begin)| end.saturating_sub(begin)),
            probe: begin.probe,
        })
    }

    /// What Redis holds now: `used_memory` in bytes, and `MEMORY USAGE` of one key of each
    /// kind the broker keeps per queued message (the first `SCAN` finds for each pattern).
    pub fn redis_memory(&self) -> anyhow::Result<(u64, BTreeMap<&'static str, u64>)> {
        let mut c = redis::Client::open(self.redis_url())?.get_connection()?;
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

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Broker processes first, Redis last.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time at the start of a measurement, Redis's count of AOF rewrites, and the machine's
/// speed just before.
pub struct Sample {
    cpu: BTreeMap<String, f64>,
    aof_rewrites: Option<u64>,
    probe: Probe,
}

/// What a measurement cost.
pub struct Usage {
    pub cpu: BTreeMap<String, f64>,
    pub rss: BTreeMap<String, f64>,
    /// Calls per command name from `INFO commandstats`, commands run inside scripts included.
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
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
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

/// Raises this process's open-file limit to its hard limit (children inherit it): 10,000
/// connections at once need 10,000 descriptors on each side.
pub fn raise_fd_limit() {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit get a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
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
            dir,
            redis_port: 0,
            api_port: 0,
            mock_port: 0,
            options: StackOptions {
                worker_ms: 0,
                drainers: 1,
                concurrency: 1,
                fsync: "everysec".into(),
                callback_port: None,
                defer_drainers: true,
            },
            bin_dir: PathBuf::new(),
            procs: Vec::new(),
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
