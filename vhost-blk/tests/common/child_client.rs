//! A libblkio client in a process of its own. The daemon tells clients
//! apart by the process at the other end of the socket (the attach id:
//! pid and start time), so every `Client` of one test process is one
//! client to it, coming back; a test that needs another client (a new QEMU
//! after a failover or a fence) uses this one.
//!
//! The process is the test binary itself, running the test named
//! [`HELPER`] (each binary that uses this defines it as a call to
//! [`serve`]); it takes commands on stdin and answers on stdout.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use super::client::Client;

/// The test each binary defines to run [`serve`].
pub const HELPER: &str = "child_client";
/// Tells the helper test what to connect to: `QUEUES READ_ONLY PATH`.
const ENV: &str = "REWIND_CHILD_CLIENT";
/// Marks the helper's answers among libtest's own lines.
const ANSWER: &str = "CHILD-CLIENT ";

/// Requests a test makes of a client, in or out of its process.
pub trait BlockClient {
    fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32;
    fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8>;
    fn flush(&mut self, q: usize) -> i32;
}

impl BlockClient for Client {
    fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        Client::write(self, q, offset, data)
    }
    fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        Client::read(self, q, offset, len)
    }
    fn flush(&mut self, q: usize) -> i32 {
        Client::flush(self, q)
    }
}

pub struct ChildClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildClient {
    pub fn connect(socket: &Path, queues: i32) -> ChildClient {
        Self::try_connect(socket, queues, false).unwrap_or_else(|e| panic!("start: {e}"))
    }

    /// As `Client::try_connect`, in a new process; the error is libblkio's.
    pub fn try_connect(socket: &Path, queues: i32, read_only: bool) -> Result<ChildClient, String> {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                HELPER,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                ENV,
                format!("{queues} {read_only} {}", socket.to_str().expect("utf-8")),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the child client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut client = ChildClient {
            child,
            stdin,
            stdout,
        };
        client.started().map(|()| client)
    }

    fn started(&mut self) -> Result<(), String> {
        let answer = self.answer();
        match answer.strip_prefix("refused ") {
            Some(reason) => Err(reason.to_owned()),
            None => Ok(()),
        }
    }

    /// Ends the connection; the process stays (the same client, gone).
    pub fn disconnect(&mut self) {
        assert_eq!(self.request("disconnect"), "gone");
    }

    /// Connects again from the same process: the same client, back.
    pub fn reconnect(&mut self) -> Result<(), String> {
        writeln!(self.stdin, "connect")
            .and_then(|()| self.stdin.flush())
            .expect("write to the child client");
        self.started()
    }

    /// The process the daemon sees at the other end of the socket.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Submits a write and waits at most `limit` for it, as
    /// `Client::write_within`.
    pub fn write_within(&mut self, offset: u64, data: &[u8], limit: Duration) -> Option<i32> {
        let reply = self.request(&format!(
            "write-within {offset} {} {}",
            limit.as_millis(),
            hex(data)
        ));
        reply.parse().ok()
    }

    fn request(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .expect("write to the child client");
        self.answer()
    }

    /// The next answer (what follows its mark).
    fn answer(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self
                .stdout
                .read_line(&mut line)
                .expect("read from the child client");
            assert!(n > 0, "the child client ended");
            // libtest's "test child_client ... " may open the first line.
            if let Some((_, answer)) = line.trim_end().split_once(ANSWER) {
                return answer.to_owned();
            }
        }
    }
}

impl BlockClient for ChildClient {
    fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        let reply = self.request(&format!("write {q} {offset} {}", hex(data)));
        reply.parse().expect("a result")
    }
    fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        unhex(&self.request(&format!("read {q} {offset} {len}")))
    }
    fn flush(&mut self, q: usize) -> i32 {
        self.request(&format!("flush {q}"))
            .parse()
            .expect("a result")
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The helper test's body: connects as told by the environment and serves
/// requests until stdin ends.
pub fn serve() {
    let spec = std::env::var(ENV).expect(ENV);
    let mut parts = spec.splitn(3, ' ');
    let queues = parts.next().and_then(|q| q.parse().ok()).expect("queues");
    let read_only = parts.next() == Some("true");
    let socket = parts.next().expect("socket");
    let connect = || match Client::try_connect(Path::new(socket), queues, read_only) {
        Ok(client) => {
            println!("{ANSWER}ready now");
            Some(client)
        }
        Err(e) => {
            println!("{ANSWER}refused {e}");
            None
        }
    };
    let mut client = connect();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split(' ').collect();
        if words[0] == "connect" {
            client = connect();
            continue;
        }
        let Some(connected) = client.as_mut() else {
            panic!("{line}: not connected");
        };
        let number = |i: usize| -> u64 { words[i].parse().expect("a number") };
        let answer = match words[0] {
            "write" => connected
                .write(number(1) as usize, number(2), &unhex(words[3]))
                .to_string(),
            "read" => hex(&connected.read(number(1) as usize, number(2), number(3) as usize)),
            "flush" => connected.flush(number(1) as usize).to_string(),
            "write-within" => connected
                .write_within(
                    number(1),
                    &unhex(words[3]),
                    Duration::from_millis(number(2)),
                )
                .map_or("none".into(), |ret| ret.to_string()),
            "disconnect" => {
                client = None;
                "gone".into()
            }
            other => panic!("unknown request {other}"),
        };
        println!("{ANSWER}{answer}");
    }
}
