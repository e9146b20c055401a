//! The two-hosts-on-one-machine helper (tests/common/netns.rs) itself: a
//! TCP connection across the veth pair, a cut link, commands inside a
//! host, and cleanup on drop and on panic.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::netns::{HostPair, ADDR_A, ADDR_B};

#[test]
fn a_tcp_connection_crosses_the_veth_pair_and_a_cut_link_stops_it() {
    let pair = HostPair::new();
    let listener = pair
        .b
        .run(|| TcpListener::bind((ADDR_B, 0)).expect("bind on host b"));
    let target = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut stream, from) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("read");
        stream.write_all(b"world").expect("write");
        (from, buf)
    });
    let reply = pair.a.run(move || {
        let mut stream =
            TcpStream::connect_timeout(&target, Duration::from_secs(10)).expect("connect from a");
        stream.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("read");
        buf
    });
    let (from, got) = server.join().expect("server thread");
    assert_eq!(&got, b"hello");
    assert_eq!(&reply, b"world");
    assert_eq!(from.ip(), ADDR_A, "the peer is host a's veth address");

    // Host a's own namespace does not hold b's address: the packets really
    // crossed the pair.
    let addrs = pair
        .a
        .command("ip")
        .args(["-4", "addr"])
        .output()
        .expect("ip");
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains(&format!("{ADDR_A}/24")), "{addrs}");
    assert!(!addrs.contains(&ADDR_B.to_string()), "{addrs}");

    pair.a.set_link(false);
    let cut = pair
        .a
        .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)));
    let err = cut.expect_err("connect over a cut link");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::NetworkUnreachable | ErrorKind::TimedOut
        ),
        "{err}"
    );
    pair.a.set_link(true);
}

#[test]
fn the_namespaces_are_gone_after_drop_and_after_a_panic() {
    let exists = |name: &str| Path::new("/run/netns").join(name).exists();
    let names = {
        let pair = HostPair::new();
        let names = [pair.a.name.clone(), pair.b.name.clone()];
        assert!(names.iter().all(|n| exists(n)), "{names:?}");
        names
    };
    assert!(!names.iter().any(|n| exists(n)), "{names:?} left behind");

    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let pair = HostPair::new();
        tx.send([pair.a.name.clone(), pair.b.name.clone()])
            .expect("send");
        panic!("a test failing with its hosts up");
    });
    assert!(result.is_err());
    let names = rx.recv().expect("names");
    assert!(!names.iter().any(|n| exists(n)), "{names:?} left behind");
}

#[test]
fn pairs_made_at_once_do_not_collide() {
    let pairs: Vec<HostPair> = (0..3).map(|_| HostPair::new()).collect();
    // The same addresses on every pair, each on its own wire: a listener on
    // one pair's b is not reachable from another pair's a.
    let listener = pairs[0]
        .b
        .run(|| TcpListener::bind((ADDR_B, 0)).expect("bind"));
    let port = listener.local_addr().expect("addr").port();
    let target = SocketAddr::from((ADDR_B, port));
    let other = pairs[1]
        .a
        .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)));
    assert!(other.is_err(), "pair 1 reached pair 0's listener");
    let same = pairs[0]
        .a
        .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)));
    assert!(same.is_ok(), "{same:?}");
}
