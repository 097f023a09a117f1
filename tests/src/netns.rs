//! A network namespace of the test's own, holding only its loopback, where nftables drops a
//! share of the packets to and from chosen ports: real packet loss, retransmitted by TCP.
//! Nothing outside the namespace is touched; it ends with the last thread and process in it.

use std::process::Command;

/// The namespace's nftables table (the namespace has no other rules).
const TABLE: &str = "broker_faults";

/// The namespace a closure runs in: see [`isolated`].
pub struct Netns(());

/// Runs `body` on a thread of its own, in a new network namespace whose loopback is up. Every
/// thread and process that thread starts (a tokio runtime, redis-server) is in it too.
/// Panics, naming what is missing, when the namespace cannot be made (it needs
/// CAP_SYS_ADMIN, `ip` from iproute2 and `nft` from nftables).
pub fn isolated<T: Send + 'static>(body: impl FnOnce(&Netns) -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| {
            panic!(
                "unshare(CLONE_NEWNET): {e} (the network tests run as root, or with CAP_SYS_ADMIN)"
            )
        });
        run(&["ip", "link", "set", "lo", "up"]);
        run(&["nft", "add", "table", "inet", TABLE]);
        run(&[
            "nft",
            &format!("add chain inet {TABLE} out {{ type filter hook output priority 0; }}"),
        ]);
        body(&Netns(()))
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl Netns {
    /// From now on drops `percent` of the TCP packets to and from each of `ports`, in both
    /// directions, and nothing else; replaces what was dropped before.
    pub fn lose(&self, ports: &[u16], percent: u8) {
        self.heal();
        for port in ports {
            for side in ["dport", "sport"] {
                run(&[
                    "nft",
                    &format!(
                        "add rule inet {TABLE} out tcp {side} {port} \
                         numgen random mod 100 < {percent} counter drop"
                    ),
                ]);
            }
        }
    }

    /// Drops nothing any more.
    pub fn heal(&self) {
        run(&["nft", "flush", "chain", "inet", TABLE, "out"]);
    }

    /// How many packets the rules in place have dropped.
    pub fn dropped(&self) -> u64 {
        let out = output(&["nft", "list", "chain", "inet", TABLE, "out"]);
        out.lines()
            .filter_map(|line| {
                let (_, after) = line.split_once("counter packets ")?;
                after.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

fn run(args: &[&str]) {
    output(args);
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e} (install iproute2 and nftables)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
