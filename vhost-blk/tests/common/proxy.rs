//! A fault-injecting TCP proxy on loopback, to put between a primary and
//! its replica: it forwards every connection it accepts to a target port,
//! both ways, and tests flip its faults at runtime.
//!
//! Plain threads: one accepting, two per connection (one per direction).
//! Every socket has a short timeout so each thread sees `stop` (and a
//! stall lifting) within milliseconds; dropping the proxy stops and joins
//! them all.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a thread waits on a socket before it looks at the controls.
const POLL: Duration = Duration::from_millis(10);
/// Bytes read at a time: a "chunk".
const CHUNK: usize = 64 << 10;

/// The controls, shared by the proxy's threads.
#[derive(Debug, Default)]
pub struct Faults {
    stop: AtomicBool,
    stalled: AtomicBool,
    /// Per chunk towards the replica, in microseconds.
    delay_us: AtomicU64,
    /// Bytes towards the replica still to pass before the one to corrupt.
    corrupt_in: Mutex<Option<usize>>,
    reorder: AtomicBool,
    connections: AtomicU64,
    to_replica: AtomicU64,
    to_primary: AtomicU64,
}

/// One proxied connection: both sockets, so that `cut` can close them.
#[derive(Debug)]
struct Conn {
    primary: TcpStream,
    replica: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

impl Conn {
    fn close(&self) {
        let _ = self.primary.shutdown(Shutdown::Both);
        let _ = self.replica.shutdown(Shutdown::Both);
    }
}

/// The proxy: listens on `port()`, forwards to the target port.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    faults: Arc<Faults>,
    conns: Arc<Mutex<Vec<Conn>>>,
    acceptor: Option<JoinHandle<()>>,
}

fn lock(conns: &Mutex<Vec<Conn>>) -> MutexGuard<'_, Vec<Conn>> {
    conns.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// A proxy to `127.0.0.1:target`, on an ephemeral port.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let faults = Arc::new(Faults::default());
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let target = SocketAddr::from(([127, 0, 0, 1], target));
        let acceptor = {
            let (faults, conns) = (faults.clone(), conns.clone());
            std::thread::spawn(move || accept(&listener, target, &faults, &conns))
        };
        Proxy {
            port,
            faults,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// The port the primary should dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Holds every chunk forwarded towards the replica for `delay` (zero:
    /// no delay) before it goes on.
    pub fn delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).expect("a sane delay");
        self.faults.delay_us.store(us, Ordering::Relaxed);
    }

    /// Stops forwarding either way (bytes stay in the socket buffers, the
    /// connections stay open) until called with `false`.
    pub fn stall(&self, stalled: bool) {
        self.faults.stalled.store(stalled, Ordering::Relaxed);
    }

    /// Closes every current connection at once, both sockets, both ways;
    /// new connections are forwarded as usual.
    pub fn cut(&self) {
        for conn in lock(&self.conns).iter() {
            conn.close();
        }
    }

    /// Flips the low bit of the `index`th byte (from 0) forwarded towards
    /// the replica from now on.
    pub fn corrupt_next(&self, index: usize) {
        *self
            .faults
            .corrupt_in
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(index);
    }

    /// Whether a `corrupt_next` has yet to find its byte.
    pub fn corruption_pending(&self) -> bool {
        self.faults
            .corrupt_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Swaps the next two chunks read from the primary: the second one is
    /// forwarded before the first.
    pub fn reorder_next(&self) {
        self.faults.reorder.store(true, Ordering::Relaxed);
    }

    /// Whether a `reorder_next` has yet to take its first chunk.
    pub fn reorder_pending(&self) -> bool {
        self.faults.reorder.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.faults.connections.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the primary to the replica so far.
    pub fn bytes_to_replica(&self) -> u64 {
        self.faults.to_replica.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the replica to the primary so far.
    pub fn bytes_to_primary(&self) -> u64 {
        self.faults.to_primary.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let conns = std::mem::take(&mut *lock(&self.conns));
        for conn in conns {
            conn.close();
            for thread in conn.threads {
                let _ = thread.join();
            }
        }
    }
}

fn accept(
    listener: &TcpListener,
    target: SocketAddr,
    faults: &Arc<Faults>,
    conns: &Mutex<Vec<Conn>>,
) {
    while !faults.stop.load(Ordering::Relaxed) {
        let Ok((primary, _)) = listener.accept() else {
            // Nobody yet (WouldBlock), or a failed accept: look again.
            std::thread::sleep(POLL);
            continue;
        };
        faults.connections.fetch_add(1, Ordering::Relaxed);
        if primary.set_nonblocking(false).is_err() {
            continue;
        }
        // Nobody to forward to: the primary sees its connection closed.
        let Ok(replica) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            continue;
        };
        let mut conns = lock(conns);
        // Forget connections that ended.
        conns.retain_mut(|conn| {
            let done = conn.threads.iter().all(JoinHandle::is_finished);
            if done {
                for thread in conn.threads.drain(..) {
                    let _ = thread.join();
                }
            }
            !done
        });
        let Some(threads) = [(&primary, &replica, true), (&replica, &primary, false)]
            .into_iter()
            .map(|(from, to, towards_replica)| {
                let (from, to) = (from.try_clone().ok()?, to.try_clone().ok()?);
                let faults = faults.clone();
                Some(std::thread::spawn(move || {
                    pump(&from, &to, towards_replica, &faults);
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                }))
            })
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        conns.push(Conn {
            primary,
            replica,
            threads,
        });
    }
}

/// Forwards `from` to `to` until either ends, the connection is cut or the
/// proxy stops.
fn pump(mut from: &TcpStream, to: &TcpStream, towards_replica: bool, faults: &Faults) {
    if from.set_read_timeout(Some(POLL)).is_err() || to.set_write_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    // The first chunk of a reordered pair, waiting for the second.
    let mut held: Option<Vec<u8>> = None;
    while !faults.stop.load(Ordering::Relaxed) {
        if faults.stalled.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        let mut chunk = buf[..n].to_vec();
        if towards_replica {
            let delay = Duration::from_micros(faults.delay_us.load(Ordering::Relaxed));
            if !sleep(delay, faults) {
                return;
            }
            corrupt(&mut chunk, faults);
            if let Some(first) = held.take() {
                if !send(to, &chunk, faults) || !send(to, &first, faults) {
                    return;
                }
                faults.to_replica.fetch_add(n as u64, Ordering::Relaxed);
                faults
                    .to_replica
                    .fetch_add(first.len() as u64, Ordering::Relaxed);
                continue;
            }
            if faults.reorder.swap(false, Ordering::Relaxed) {
                held = Some(chunk);
                continue;
            }
        }
        if !send(to, &chunk, faults) {
            return;
        }
        let counter = if towards_replica {
            &faults.to_replica
        } else {
            &faults.to_primary
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Flips a bit of `chunk` if the byte `corrupt_next` asked for is in it.
fn corrupt(chunk: &mut [u8], faults: &Faults) {
    let mut pending = faults.corrupt_in.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(index) = *pending {
        if index < chunk.len() {
            chunk[index] ^= 1;
            *pending = None;
        } else {
            *pending = Some(index - chunk.len());
        }
    }
}

/// Writes all of `data`, giving up when the socket fails or the proxy
/// stops.
fn send(mut to: &TcpStream, mut data: &[u8], faults: &Faults) -> bool {
    while !data.is_empty() {
        if faults.stop.load(Ordering::Relaxed) {
            return false;
        }
        match to.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Sleeps `time` in short steps; false if the proxy stopped meanwhile.
fn sleep(time: Duration, faults: &Faults) -> bool {
    let deadline = std::time::Instant::now() + time;
    loop {
        if faults.stop.load(Ordering::Relaxed) {
            return false;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(POLL));
    }
}
