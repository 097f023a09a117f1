//! How fast the machine is at the moment, measured apart from the broker, right before each
//! measurement: on a shared machine the same build runs a quarter faster or slower from one
//! quarter of an hour to the next, and a figure is read with the stretch it was taken in.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The probe's two figures.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Milliseconds one thread takes for a fixed amount of integer work.
    pub cpu_ms: f64,
    /// Microseconds per round trip of one byte between two threads on different cores (when
    /// there are two): a wake-up each way, what every crossing between the stack's processes
    /// pays.
    pub wake_rtt_us: f64,
}

/// Round trips in the wake-up probe.
const ROUND_TRIPS: u32 = 300;

/// Takes both figures: about 20 ms of work and 300 round trips, some 50 ms here.
pub fn probe() -> Probe {
    Probe {
        cpu_ms: cpu_ms(),
        wake_rtt_us: wake_rtt(ROUND_TRIPS)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS)),
    }
}

/// A fixed run of xorshift steps, which the compiler cannot fold away.
fn cpu_ms() -> f64 {
    let begin = Instant::now();
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..20_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    begin.elapsed().as_secs_f64() * 1e3
}

/// The time `n` one-byte round trips take between this thread and another, each pinned to
/// a core of its own when the machine has two.
fn wake_rtt(n: u32) -> std::io::Result<Duration> {
    let (mut here, mut there) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        pin_to(1);
        let mut b = [0u8; 1];
        for _ in 0..n {
            there.read_exact(&mut b)?;
            there.write_all(&b)?;
        }
        Ok(())
    });
    let before = pin_to(0);
    let mut b = [0u8; 1];
    // One round trip first, so the other thread is running and pinned.
    here.write_all(&b)?;
    here.read_exact(&mut b)?;
    let begin = Instant::now();
    for _ in 1..n {
        here.write_all(&b)?;
        here.read_exact(&mut b)?;
    }
    let took = begin.elapsed();
    if let Some(set) = before {
        set_affinity(&set);
    }
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    Ok(took * n / (n - 1))
}

/// Pins the calling thread to `cpu` when the machine has more than one; returns the cores it
/// could run on before, when it pinned it.
fn pin_to(cpu: usize) -> Option<libc::cpu_set_t> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    let before = affinity()?;
    #[allow(unsafe_code)]
    // SAFETY: the set is a local, zero-initialised `cpu_set_t`, and CPU_SET writes within it
    // (`cpu` is 0 or 1, far below CPU_SETSIZE).
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    set_affinity(&set).then_some(before)
}

/// The cores the calling thread may run on.
fn affinity() -> Option<libc::cpu_set_t> {
    #[allow(unsafe_code)]
    // SAFETY: sched_getaffinity writes into a local `cpu_set_t` of the size it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

/// Lets the calling thread run on the cores of `set`; whether it could.
fn set_affinity(set: &libc::cpu_set_t) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: sched_setaffinity reads a valid `cpu_set_t` with its own size.
    unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_gives_positive_figures_and_leaves_the_thread_where_it_was() {
        let before = affinity().expect("sched_getaffinity");
        let p = probe();
        assert!(p.cpu_ms > 0.0 && p.cpu_ms.is_finite(), "{p:?}");
        assert!(p.wake_rtt_us > 0.0 && p.wake_rtt_us.is_finite(), "{p:?}");
        let after = affinity().expect("sched_getaffinity");
        #[allow(unsafe_code)]
        // SAFETY: CPU_EQUAL compares two valid local sets.
        let same = unsafe { libc::CPU_EQUAL(&before, &after) };
        assert!(same, "the probe left the thread pinned");
    }
}
