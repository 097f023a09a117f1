//! Where log lines go: standard output, a few at a time.
//!
//! Written one `write(2)` per line, the API's and the drainer's lines (one or two per
//! message at `info`) cost each process a system call per message, and the reader of
//! standard output (a log shipper's pipe in production, a file in the benchmark) a wake-up or
//! a file append per line. In the benchmark's sync run the path into the file was 4.5 % of
//! the API's and the drainer's CPU samples; written in batches, 1.2 % (docs/performance.md,
//! item 33). A pipe's reader is woken once per batch instead of once per line.
//!
//! So a line is appended to a buffer in memory, and a thread of its own writes what has
//! gathered at most [`LINGER`] after the first line of a batch, in one call. The order of the
//! lines is kept. Nothing waits for the writer thread: the line's own thread only appends
//! (and wakes the writer when the buffer was empty and the writer sleeps; while lines keep
//! coming, the writer wakes on its own timer, once per batch). When the buffer holds [`MAX_HELD`] bytes
//! (the reader of standard output is not keeping up), the line's thread writes the batch
//! itself, so a slow reader holds up the logging threads as a direct write did, and the
//! memory held stays bounded.
//!
//! [`flush`] writes what is held at once: it is called when a binary's `main` ends (the guard
//! of `telemetry::init`), before `process::exit`, and from the panic hook. A process killed
//! with SIGKILL loses the lines of its last [`LINGER`].

use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, Thread};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a batch gathers lines after its first one.
pub const LINGER: Duration = Duration::from_millis(5);

/// The bytes held before the logging thread writes the batch itself.
pub const MAX_HELD: usize = 256 * 1024;

/// Lines on their way to a sink.
pub struct Batch {
    /// The lines not yet handed to the writer.
    lines: Mutex<Vec<u8>>,
    /// Held while a batch is written, so that batches leave in the order they were taken.
    writing: Mutex<()>,
    /// The writer thread, started with the first line; `None` when it could not be started
    /// (each line is then written by its own thread).
    writer: OnceLock<Option<Thread>>,
    sink: fn(&[u8]) -> io::Result<()>,
}

/// The batch of standard output.
pub static STDOUT: Batch = Batch::new(write_stdout);

fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Writes what standard output's batch holds, now.
pub fn flush() {
    let _ = STDOUT.flush();
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Batch {
    pub const fn new(sink: fn(&[u8]) -> io::Result<()>) -> Self {
        Self {
            lines: Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            writer: OnceLock::new(),
            sink,
        }
    }

    /// Appends one line (or any bytes: they are written as given, in order).
    pub fn push(&'static self, line: &[u8]) -> io::Result<()> {
        let mut lines = lock(&self.lines);
        let first = lines.is_empty();
        lines.extend_from_slice(line);
        let full = lines.len() >= MAX_HELD;
        drop(lines);
        match self.writer() {
            Some(writer) if !full => {
                if first {
                    writer.unpark();
                }
                Ok(())
            }
            _ => self.flush(),
        }
    }

    /// Writes what is held, in this thread.
    pub fn flush(&self) -> io::Result<()> {
        self.write_held().map(drop)
    }

    /// Writes what is held; whether there was anything.
    fn write_held(&self) -> io::Result<bool> {
        let _order = lock(&self.writing);
        let batch = std::mem::take(&mut *lock(&self.lines));
        if batch.is_empty() {
            return Ok(false);
        }
        (self.sink)(&batch).map(|()| true)
    }

    /// As [`Batch::flush`], but gives up rather than wait for a lock: for the panic hook,
    /// which may run while this thread holds one.
    pub fn try_flush(&self) {
        let Ok(_order) = self.writing.try_lock() else {
            return;
        };
        let Ok(mut lines) = self.lines.try_lock() else {
            return;
        };
        let batch = std::mem::take(&mut *lines);
        drop(lines);
        if !batch.is_empty() {
            let _ = (self.sink)(&batch);
        }
    }

    fn writer(&'static self) -> Option<&'static Thread> {
        self.writer
            .get_or_init(|| {
                thread::Builder::new()
                    .name("log-writer".into())
                    .spawn(move || loop {
                        // Parked until the first line after a quiet spell. While lines keep
                        // coming it wakes only on its own timer, once per batch, and a
                        // logging thread's unpark finds it awake, which costs no system call.
                        thread::park();
                        loop {
                            thread::sleep(LINGER);
                            if !matches!(self.write_held(), Ok(true)) {
                                break;
                            }
                        }
                    })
                    .ok()
                    .map(|handle| handle.thread().clone())
            })
            .as_ref()
    }
}

/// The subscriber's writer: each line it writes goes to [`STDOUT`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Batched;

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        STDOUT.push(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Batched;

    fn make_writer(&'a self) -> Self::Writer {
        Batched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A batch per test, writing into its own buffer and counting its writes.
    macro_rules! batch {
        ($batch:ident, $out:ident, $calls:ident) => {
            static $out: Mutex<Vec<u8>> = Mutex::new(Vec::new());
            static $calls: Mutex<usize> = Mutex::new(0);
            static $batch: Batch = Batch::new(|b| {
                *lock(&$calls) += 1;
                lock(&$out).extend_from_slice(b);
                Ok(())
            });
        };
    }

    fn written(sink: &Mutex<Vec<u8>>) -> String {
        String::from_utf8(lock(sink).clone()).expect("utf8")
    }

    /// Polls `check` until it holds or 5 s pass.
    fn eventually(check: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            thread::yield_now();
        }
        check()
    }

    #[test]
    fn lines_arrive_whole_and_in_each_threads_order_without_a_flush() {
        batch!(BATCH, OUT, CALLS);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                thread::spawn(move || {
                    for i in 0..500 {
                        BATCH.push(format!("t{t} {i}\n").as_bytes()).expect("push");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        assert!(
            eventually(|| written(&OUT).lines().count() == 2_000),
            "the writer thread wrote {} of 2,000 lines",
            written(&OUT).lines().count()
        );
        let text = written(&OUT);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().expect("a whole line"))
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "thread {t}'s lines");
        }
    }

    #[test]
    fn the_lines_of_a_linger_go_in_one_write() {
        batch!(BATCH, OUT, CALLS);
        // Holding the batch's write order keeps the writer thread from writing, however slow
        // this thread is: the 100 lines are all held when it may.
        let order = lock(&BATCH.writing);
        for i in 0..100 {
            BATCH.push(format!("{i}\n").as_bytes()).expect("push");
        }
        drop(order);
        assert!(eventually(|| written(&OUT).lines().count() == 100));
        assert_eq!(
            *lock(&CALLS),
            1,
            "100 lines held together are written in one call"
        );
    }

    #[test]
    fn flush_writes_at_once_and_a_full_buffer_is_written_by_the_logging_thread() {
        batch!(BATCH, OUT, CALLS);
        BATCH.push(b"first\n").expect("push");
        BATCH.flush().expect("flush");
        assert_eq!(written(&OUT), "first\n");

        // Whatever the writer thread is doing, a push never leaves MAX_HELD bytes or more
        // held: the push that fills the buffer writes it.
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..3 * MAX_HELD / line.len() {
            BATCH.push(&line).expect("push");
            assert!(lock(&BATCH.lines).len() < MAX_HELD);
        }
        BATCH.flush().expect("flush");
        assert_eq!(
            written(&OUT).len(),
            6 + 3 * MAX_HELD / line.len() * line.len()
        );
    }

    #[test]
    fn the_panic_hooks_flush_does_not_wait_for_a_lock() {
        batch!(BATCH, OUT, CALLS);
        let order = lock(&BATCH.writing);
        BATCH.push(b"held\n").expect("push");
        BATCH.try_flush();
        assert_eq!(written(&OUT), "");
        drop(order);
        let lines = lock(&BATCH.lines);
        BATCH.try_flush();
        drop(lines);
        BATCH.flush().expect("flush");
        assert_eq!(written(&OUT), "held\n");
    }
}
