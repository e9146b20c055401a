//! A real primary daemon that detaches from its failed storage
//! (`--on-storage-error detach`, its journal on a tmpfs the test fills)
//! against a replica played from the test with the crate's own frame and
//! TLS modules: what that replica answers to the forwarded requests is
//! checked before the guest gets any of it.
//!
//! Mounting a tmpfs needs root, as the network-namespace tests do.

mod common;

use std::time::Duration;

use common::client::{pattern, Client};
use common::replication::{identity, tls_args, tls_context, Node, SIZE};
use common::tmpfs::TmpfsJournal;
use common::{wait_until, TestVolume};
use rewind_vhost_blk::replication::frame::{
    read_frame, write_frame, Encoder, ForwardOp, Message, Welcome,
};
use rewind_vhost_blk::replication::tls::TlsContext;

/// One session of a replica that takes whatever comes and answers a
/// forwarded read of `length` bytes with `answer(length)` bytes. The
/// primary's later connections are held, their TLS handshakes never
/// answered, until `stop`: a refused connection would replace the
/// primary's `last_error` within its first reconnect's 100 ms, a held one
/// only at its handshake's 5 s timeout.
async fn replica(
    listener: std::net::TcpListener,
    tls: TlsContext,
    answer: fn(u64) -> usize,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let Ok((tcp, _)) = listener.accept().await else {
        return;
    };
    if let Ok(stream) = tls.acceptor().accept(tcp).await {
        session(stream, answer).await;
    }
    let mut held = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => held.push(tcp),
                Err(_) => return,
            },
        }
    }
}

async fn session(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    answer: fn(u64) -> usize,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut encoder = Encoder::new(false).expect("encoder");
    // `received`: the newest lsn that came. A frame is acked with what
    // came before it: the primary counts an lsn as sent once its frame
    // went out, and may not have yet when the next frame's ack arrives.
    let (mut epoch, mut received, mut sync_lsn) = (1, 0, 0);
    while let Ok(frame) = read_frame(&mut reader).await {
        let before = received;
        let reply = match frame.message {
            Message::Hello(hello) => {
                epoch = hello.epoch;
                Message::Welcome(Welcome {
                    epoch,
                    last_lsn: 0,
                    durable_lsn: 0,
                    resync: None,
                })
            }
            Message::ResyncBegin(begin) => {
                sync_lsn = begin.sync_lsn;
                continue;
            }
            Message::ResyncEnd => {
                received = sync_lsn;
                Message::Ack {
                    durable_lsn: before,
                }
            }
            Message::Records(records) => {
                received = records.last().map_or(received, |r| r.lsn());
                Message::Ack {
                    durable_lsn: before,
                }
            }
            Message::Heartbeat => Message::Ack {
                durable_lsn: before,
            },
            Message::Detach(_) => {
                epoch += 1;
                Message::Detached {
                    epoch,
                    lsn: received,
                }
            }
            Message::Forward {
                id,
                op: ForwardOp::Read { length, .. },
            } => Message::Forwarded {
                id,
                result: Ok(vec![0x5a; answer(length)]),
            },
            Message::Forward { id, .. } => Message::Forwarded {
                id,
                result: Ok(Vec::new()),
            },
            _ => continue,
        };
        if write_frame(&mut writer, &encoder.encode(epoch, &reply))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A guest read of 1.5 MiB goes to the replica as a read of 1 MiB and
/// one of 512 KiB. A replica that answers them with 512 KiB and 1 MiB
/// has answered with the right total, and the guest would read the data
/// of the second piece where the first belongs: the read fails instead,
/// and the primary says why.
#[test]
fn a_forwarded_read_answered_with_the_wrong_length_fails() {
    const READ: u64 = 3 << 19;
    let volume = TestVolume::create(SIZE);
    let tmpfs = TmpfsJournal::over(&volume, 256 << 20);
    let certs = volume.dir.path().join("certs");
    let (me, peer) = (identity(&certs, "primary"), identity(&certs, "replica"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    let tls = tls_context(&peer, &me);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let played = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(replica(
                listener,
                tls,
                |length| (READ - length) as usize,
                stopped,
            ))
    });
    let mut args = vec!["--replicate-to".to_owned(), addr.to_string()];
    args.extend(tls_args(&me, &peer));
    // Writes that fail wait for the detach this long: far more than it
    // takes, on a loaded machine too.
    args.extend(["--on-storage-error", "detach", "--io-error-hold", "20s"].map(String::from));
    let primary = Node::start(volume, args);

    let mut client = Client::connect(&primary.vol.socket, 1);
    let block = pattern(1, 64 << 10);
    for i in 0..64 {
        assert_eq!(client.write(0, i * (64 << 10), &block), 0);
    }
    tmpfs.fill();
    // Until the journal needs a segment it cannot make (32 MiB is
    // plenty: tests/detach.rs).
    for i in 0.. {
        assert!(i < 512, "no detach after 32 MiB of writes");
        let at = (4 << 20) + i * (64 << 10);
        assert_eq!(client.write(0, at, &block), 0, "write at {at}");
        if !primary.replication()["detached"].is_null() {
            break;
        }
    }

    let (status, _) = client.try_read(0, 0, READ as usize);
    assert_ne!(status, 0, "the guest read what the replica misplaced");
    wait_until("the primary to say why", Duration::from_secs(10), || {
        primary.replication()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("which reads 1048576 bytes, with 524288 bytes"))
    });
    drop(primary);
    let _ = stop.send(());
    played.join().expect("the replica");
}
