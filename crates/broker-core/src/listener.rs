//! TCP listeners that take a burst of connections.
//!
//! `std::net::TcpListener::bind` listens with a backlog of 128: when more connections arrive
//! at once than the process accepts, the kernel drops their handshakes, and each dropped
//! client waits a whole second before it tries again (the broker's benchmark counted 2,724
//! such drops and 1,879 SYN retransmissions in one run of 10,000 requests arriving in steps of
//! 500). A proxy in front of the API opens connections in bursts like that.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel holds for the process to accept, as actix-server's own `bind` asks
/// for (the kernel caps it at `net.core.somaxconn`, 4096 on current Linux).
pub const BACKLOG: i32 = 2048;

/// Binds `addr` (`host:port`, the first of its addresses that binds) and listens with
/// [`BACKLOG`]; with `SO_REUSEADDR`, as std's own listener.
pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in addr.to_socket_addrs()? {
        match bind_one(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Duration;

    /// Hundreds of connections complete their handshake while nothing accepts them: with std's
    /// backlog of 128 the ones after it wait a second for a retry, past the timeout here.
    #[test]
    fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let burst = 400.min(cap.saturating_sub(8));
        let clients: Vec<TcpStream> = (0..burst)
            .map(|i| {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    .unwrap_or_else(|e| panic!("connection {i} of {burst}: {e}"))
            })
            .collect();
        assert_eq!(clients.len(), burst);
        // and they are there to accept
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = std::iter::from_fn(|| listener.accept().ok()).count();
        assert_eq!(accepted, burst);
    }

    #[test]
    fn a_host_name_binds_and_a_port_in_use_is_an_error() {
        let first = bind("127.0.0.1:0").expect("bind");
        let port = first.local_addr().expect("addr").port();
        let err = bind(("127.0.0.1", port)).expect_err("the port is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        bind("localhost:0").expect("a host name");
    }
}
