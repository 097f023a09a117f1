//! The real binaries of the workspace as child processes, and the checks made on what the
//! mock worker saw of them.

#[allow(unused_imports)]
use super::*;

/// A real binary of this workspace, started with `env`; killed on drop.
pub struct Process {
    pub child: Child,
    pub name: &'static str,
}

impl Process {
    pub fn start(name: &'static str, env: &[(&str, &str)]) -> Self {
        Self::start_logging(name, env, Stdio::null())
    }

    /// [`Process::start`] with its standard output (its log lines) sent to `stdout`.
    pub fn start_logging(name: &'static str, env: &[(&str, &str)], stdout: Stdio) -> Self {
        let path = binary(name);
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        Self { child, name }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status (up to `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        self.wait(limit)
    }

    /// Waits for the process to exit (up to `limit`).
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where cargo put a workspace binary (next to the test executable's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the suite with `cargo test --workspace` (it builds the binaries), or `cargo build --bins` first",
        path.display()
    );
    path
}

/// Starts a real `broker-drainer` process.
pub fn start_drainer_process(env: &[(String, String)]) -> Process {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Process::start("broker-drainer", &pairs)
}

/// Checks a conversation's turn-start log against the order its messages were sent:
/// every turn starts after its predecessor, a cut turn may run again right away, nothing is
/// skipped or reordered, and every message ran.
pub fn assert_fifo(conversation: &str, started: &[String], sent: &[String]) {
    let mut expected = 0usize;
    let mut last: Option<&String> = None;
    for text in started {
        if Some(text) == last {
            continue; // the same turn again (at-least-once after a crash)
        }
        assert_eq!(
            sent.get(expected),
            Some(text),
            "{conversation}: turn {text:?} started out of order; started {started:?}"
        );
        expected += 1;
        last = Some(text);
    }
    assert_eq!(
        expected,
        sent.len(),
        "{conversation}: not every message ran; started {started:?}"
    );
}
