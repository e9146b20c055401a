//! Frames of the replication protocol, version 1 (REPLICATION.md).
//!
//! Every frame is a 24-byte header and a body:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `RWRP` |
//! | 4 | 2 | protocol version |
//! | 6 | 1 | type |
//! | 7 | 1 | flags (bit 0: the body is zstd-compressed; records and chunks) |
//! | 8 | 8 | the sender's epoch |
//! | 16 | 4 | body length in bytes (as sent), at most [`MAX_BODY`] |
//! | 20 | 4 | CRC-32C of bytes 0..20 and the body |
//!
//! The header is checked before the body is read, so a bad peer cannot make
//! the reader allocate more than [`MAX_BODY`]; a compressed body expands to
//! at most [`MAX_BODY`] too. TLS already protects the bytes in transit; the
//! CRC catches a peer that builds frames wrongly.

use rewind_journal::{ShippedRecord, SHIPPED_HEADER_SIZE};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_SIZE: usize = 24;
/// Largest body, compressed or not (a batch is about 1 MiB; one record
/// carries at most 1 MiB of payload).
pub const MAX_BODY: usize = 4 << 20;

const MAGIC: [u8; 4] = *b"RWRP";
const FLAG_ZSTD: u8 = 1;
/// Largest JSON body (a hello, a welcome, a resync-begin): the epoch
/// history it may carry takes up to about 95 bytes an epoch, 390 KiB at
/// the journal's MAX_EPOCHS; as large as the volume.json it comes from.
const MAX_JSON: usize = 1 << 20;
/// Largest reason (a refusal, a detach, a forwarded request's error): it
/// ends up in `last_error` and the log, so it stays short.
const MAX_REASON: usize = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a rewind replication frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("the peer speaks replication protocol version {0}; this daemon speaks version {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("frame of unknown type {0}")]
    Type(u8),
    #[error("frame flags {0:#04x} are not known")]
    Flags(u8),
    #[error("frame body of {0} bytes is over the limit of {MAX_BODY}")]
    TooLong(usize),
    #[error("frame checksum fails")]
    Checksum,
    #[error("malformed {what} frame: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("the peer closed the connection")]
    Closed,
    #[error("network: {0}")]
    Io(String),
}

/// What the primary says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub volume: Uuid,
    pub size: u64,
    pub block_size: u32,
    /// Largest record payload the primary writes: the replica's segments
    /// must hold it.
    pub max_payload: u64,
    pub epoch: u64,
    pub epoch_history: Vec<rewind_journal::EpochStart>,
    /// The primary's newest durable lsn and the oldest it still holds.
    pub durable_lsn: u64,
    pub first_lsn: u64,
}

/// The replica's answer to an accepted hello: where to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub epoch: u64,
    /// The replica's newest record: the stream resumes after it.
    pub last_lsn: u64,
    pub durable_lsn: u64,
    /// A resync the replica has under way: its sync point, and how far
    /// its base.img durably holds it.
    pub resync: Option<ResyncPoint>,
}

/// Where a resync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncPoint {
    pub sync_lsn: u64,
    pub next_offset: u64,
}

/// A primary's answer to a peer that connected as a primary of an older
/// or another history: this side's epochs, from which the peer finds the
/// common point (DESIGN.md, "Divergence and rejoin").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fenced {
    pub epoch: u64,
    pub epoch_history: Vec<rewind_journal::EpochStart>,
    /// Why the connection is refused, for the peer's log and status.
    pub reason: String,
}

/// The primary starts (or resumes) a resync: the disk as of `sync_lsn`
/// follows in chunks from `from_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncBegin {
    pub sync_lsn: u64,
    /// The sync point's time (ns since the Unix epoch).
    pub sync_ns: u64,
    /// The primary's epochs up to the sync point.
    pub epoch_history: Vec<rewind_journal::EpochStart>,
    pub from_offset: u64,
    /// A diff resync (the replica holds an older state of the disk): the
    /// BLAKE3 key (64 hex digits) the replica hashes its chunks with, so
    /// only chunks that differ are sent. `None`: every chunk is sent.
    pub diff_key: Option<String>,
}

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    /// The peer refuses the connection, and says why.
    Refuse(String),
    /// Records in lsn order.
    Records(Vec<ShippedRecord>),
    /// Every lsn up to `durable_lsn` is durable at the replica.
    Ack {
        durable_lsn: u64,
    },
    Heartbeat,
    ResyncBegin(ResyncBegin),
    /// The sync point's data at `offset`.
    Chunk {
        offset: u64,
        data: Vec<u8>,
    },
    /// The sync point's disk is zero in `offset..offset + length`.
    Zero {
        offset: u64,
        length: u64,
    },
    /// Every chunk was sent: the replica takes the sync point.
    ResyncEnd,
    /// Diff resync, from the replica: the keyed hashes of its chunks of
    /// `chunk_bytes` from `offset` on, in order.
    Hashes {
        offset: u64,
        chunk_bytes: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// Diff resync: the replica's own data in `offset..offset + length`
    /// equals the sync point's; it keeps it.
    Keep {
        offset: u64,
        length: u64,
    },
    /// From the replica: it cannot take the next records (say why); the
    /// primary resyncs it.
    ResyncNeeded(String),
    /// From a primary to a peer that connected as a primary it supersedes
    /// (or diverged from); the connection then ends.
    Fenced(Fenced),
    /// From the replica (a failover): close the gate, ship the tail and
    /// demote.
    SealRequest,
    /// From the primary, after the tail it sealed at was acknowledged: it
    /// is a replica now; the connection then ends.
    Sealed(rewind_journal::Seal),
    /// From the primary, after the tail it sealed at was acknowledged, in
    /// a handover: take over once a client starts its device on the
    /// replica's socket (the migration's destination), within
    /// `timeout_ms`, and answer with a verdict.
    HandOver {
        seal: rewind_journal::Seal,
        timeout_ms: u64,
    },
    /// From the primary: the handover is off (its own client started
    /// again); answer with a verdict.
    HandoverCancel,
    /// From the replica: whether it took over (then it is the primary of
    /// the next epoch) or let the handover go.
    HandoverVerdict {
        promoted: bool,
    },
    /// From a primary whose own storage failed (`--on-storage-error
    /// detach`), and says why: take over as the primary of the next epoch
    /// without serving a client of your own, and serve the requests this
    /// primary forwards on this session.
    Detach(String),
    /// From the replica: it is the primary of `epoch` now, and held the
    /// old epoch's records up to `lsn`.
    Detached {
        epoch: u64,
        lsn: u64,
    },
    /// From a detached primary: its guest's request number `id`.
    Forward {
        id: u64,
        op: ForwardOp,
    },
    /// From the replica: how request `id` ended (a read's data, or why it
    /// failed).
    Forwarded {
        id: u64,
        result: Result<Vec<u8>, String>,
    },
    /// From a detached primary, first on a new session (the one that
    /// carried its requests was lost): go on serving them. The peer
    /// answers `detached` (or refuses), then requests follow.
    ResumeForwarding {
        volume: Uuid,
        /// The epoch the peer took over at.
        peer_epoch: u64,
    },
}

/// A guest request a detached primary forwards. A read or write is of at
/// most [`MAX_FORWARD`] bytes (the primary splits larger ones); a discard
/// or write-zeroes carries no data and may cover the whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOp {
    Read {
        offset: u64,
        length: u64,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        length: u64,
    },
    Flush,
}

/// Most bytes one forwarded request reads or writes.
pub const MAX_FORWARD: u64 = 1 << 20;

impl Message {
    fn code(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome(_) => 2,
            Message::Refuse(_) => 3,
            Message::Records(_) => 4,
            Message::Ack { .. } => 5,
            Message::Heartbeat => 6,
            Message::ResyncBegin(_) => 7,
            Message::Chunk { .. } => 8,
            Message::Zero { .. } => 9,
            Message::ResyncEnd => 10,
            Message::Hashes { .. } => 11,
            Message::Keep { .. } => 12,
            Message::ResyncNeeded(_) => 13,
            Message::Fenced(_) => 14,
            Message::SealRequest => 15,
            Message::Sealed(_) => 16,
            Message::HandOver { .. } => 17,
            Message::HandoverCancel => 18,
            Message::HandoverVerdict { .. } => 19,
            Message::Detach(_) => 20,
            Message::Detached { .. } => 21,
            Message::Forward { .. } => 22,
            Message::Forwarded { .. } => 23,
            Message::ResumeForwarding { .. } => 24,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refuse(_) => "refuse",
            Message::Records(_) => "records",
            Message::Ack { .. } => "ack",
            Message::Heartbeat => "heartbeat",
            Message::ResyncBegin(_) => "resync-begin",
            Message::Chunk { .. } => "chunk",
            Message::Zero { .. } => "zero",
            Message::ResyncEnd => "resync-end",
            Message::Hashes { .. } => "hashes",
            Message::Keep { .. } => "keep",
            Message::ResyncNeeded(_) => "resync-needed",
            Message::Fenced(_) => "fenced",
            Message::SealRequest => "seal-request",
            Message::Sealed(_) => "sealed",
            Message::HandOver { .. } => "hand-over",
            Message::HandoverCancel => "handover-cancel",
            Message::HandoverVerdict { .. } => "handover-verdict",
            Message::Detach(_) => "detach",
            Message::Detached { .. } => "detached",
            Message::Forward { .. } => "forward",
            Message::Forwarded { .. } => "forwarded",
            Message::ResumeForwarding { .. } => "resume-forwarding",
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub epoch: u64,
    pub message: Message,
}

/// A checked frame header: what the body must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    kind: u8,
    flags: u8,
    pub epoch: u64,
    pub body_len: usize,
    crc: u32,
}

fn le_u32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[..4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    u64::from_le_bytes(v)
}

fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for part in parts {
        digest.update(part);
    }
    // A 32-bit CRC comes back in the low half of the u64.
    digest.finalize() as u32
}

impl FrameHeader {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Self, FrameError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[0..4]);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version(version));
        }
        let (kind, flags) = (b[6], b[7]);
        if !(1..=24).contains(&kind) {
            return Err(FrameError::Type(kind));
        }
        if flags & !FLAG_ZSTD != 0 || (flags & FLAG_ZSTD != 0 && kind != 4 && kind != 8) {
            return Err(FrameError::Flags(flags));
        }
        let body_len = le_u32(&b[16..20]) as usize;
        if body_len > MAX_BODY {
            return Err(FrameError::TooLong(body_len));
        }
        Ok(FrameHeader {
            kind,
            flags,
            epoch: le_u64(&b[8..16]),
            body_len,
            crc: le_u32(&b[20..24]),
        })
    }

    /// Checks `body` against the header and decodes it.
    pub fn decode_body(&self, raw: &[u8; HEADER_SIZE], body: &[u8]) -> Result<Frame, FrameError> {
        if body.len() != self.body_len {
            return Err(FrameError::Truncated);
        }
        if crc32c(&[&raw[..20], body]) != self.crc {
            return Err(FrameError::Checksum);
        }
        let expanded;
        let body = if self.flags & FLAG_ZSTD != 0 {
            expanded =
                zstd::bulk::decompress(body, MAX_BODY).map_err(|e| FrameError::Malformed {
                    what: if self.kind == 4 { "records" } else { "chunk" },
                    reason: format!("zstd: {e}"),
                })?;
            &expanded[..]
        } else {
            body
        };
        let json = |what: &'static str| {
            move |e: serde_json::Error| FrameError::Malformed {
                what,
                reason: e.to_string(),
            }
        };
        let message = match self.kind {
            1 => Message::Hello(
                serde_json::from_slice(limit(body, "hello", MAX_JSON)?).map_err(json("hello"))?,
            ),
            2 => Message::Welcome(
                serde_json::from_slice(limit(body, "welcome", MAX_JSON)?)
                    .map_err(json("welcome"))?,
            ),
            3 => Message::Refuse(
                String::from_utf8_lossy(limit(body, "refuse", MAX_REASON)?).into_owned(),
            ),
            13 => Message::ResyncNeeded(
                String::from_utf8_lossy(limit(body, "resync-needed", MAX_REASON)?).into_owned(),
            ),
            4 => Message::Records(decode_records(body)?),
            5 => Message::Ack {
                durable_lsn: fixed::<8>(body, "ack").map(|b| le_u64(&b))?,
            },
            6 => fixed::<0>(body, "heartbeat").map(|_| Message::Heartbeat)?,
            7 => Message::ResyncBegin(
                serde_json::from_slice(limit(body, "resync-begin", MAX_JSON)?)
                    .map_err(json("resync-begin"))?,
            ),
            8 => {
                if body.len() <= 8 {
                    return Err(FrameError::Malformed {
                        what: "chunk",
                        reason: format!("{} bytes: no data", body.len()),
                    });
                }
                Message::Chunk {
                    offset: le_u64(body),
                    data: body[8..].to_vec(),
                }
            }
            9 => {
                let b = fixed::<16>(body, "zero")?;
                Message::Zero {
                    offset: le_u64(&b[..8]),
                    length: le_u64(&b[8..]),
                }
            }
            10 => fixed::<0>(body, "resync-end").map(|_| Message::ResyncEnd)?,
            11 => decode_hashes(body)?,
            12 => {
                let b = fixed::<16>(body, "keep")?;
                Message::Keep {
                    offset: le_u64(&b[..8]),
                    length: le_u64(&b[8..]),
                }
            }
            14 => Message::Fenced(
                serde_json::from_slice(limit(body, "fenced", MAX_JSON)?).map_err(json("fenced"))?,
            ),
            15 => fixed::<0>(body, "seal-request").map(|_| Message::SealRequest)?,
            16 => {
                let b = fixed::<16>(body, "sealed")?;
                Message::Sealed(rewind_journal::Seal {
                    epoch: le_u64(&b[..8]),
                    lsn: le_u64(&b[8..]),
                })
            }
            17 => {
                let b = fixed::<24>(body, "hand-over")?;
                Message::HandOver {
                    seal: rewind_journal::Seal {
                        epoch: le_u64(&b[..8]),
                        lsn: le_u64(&b[8..16]),
                    },
                    timeout_ms: le_u64(&b[16..]),
                }
            }
            18 => fixed::<0>(body, "handover-cancel").map(|_| Message::HandoverCancel)?,
            19 => match fixed::<1>(body, "handover-verdict")? {
                [0] => Message::HandoverVerdict { promoted: false },
                [1] => Message::HandoverVerdict { promoted: true },
                [other] => {
                    return Err(FrameError::Malformed {
                        what: "handover-verdict",
                        reason: format!("verdict byte {other} is neither 0 nor 1"),
                    })
                }
            },
            20 => Message::Detach(
                String::from_utf8_lossy(limit(body, "detach", MAX_REASON)?).into_owned(),
            ),
            21 => {
                let b = fixed::<16>(body, "detached")?;
                Message::Detached {
                    epoch: le_u64(&b[..8]),
                    lsn: le_u64(&b[8..]),
                }
            }
            22 => decode_forward(body)?,
            23 => decode_forwarded(body)?,
            24 => {
                let b = fixed::<24>(body, "resume-forwarding")?;
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(&b[..16]);
                Message::ResumeForwarding {
                    volume: Uuid::from_bytes(uuid),
                    peer_epoch: le_u64(&b[16..]),
                }
            }
            kind => return Err(FrameError::Type(kind)),
        };
        Ok(Frame {
            epoch: self.epoch,
            message,
        })
    }
}

/// Operation codes of a `forward` frame.
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_WRITE_ZEROES: u8 = 3;
const OP_WRITE_ZEROES_UNMAP: u8 = 4;
const OP_DISCARD: u8 = 5;
const OP_FLUSH: u8 = 6;

/// `id` (u64), `op` (u8), `offset` and `length` (u64 each), then a
/// write's data (`length` bytes). Reads and writes are of at most
/// [`MAX_FORWARD`] bytes; the range is checked against the disk where the
/// request runs.
fn decode_forward(body: &[u8]) -> Result<Message, FrameError> {
    let bad = |reason: String| FrameError::Malformed {
        what: "forward",
        reason,
    };
    if body.len() < 25 {
        return Err(bad(format!("{} bytes, under 25", body.len())));
    }
    let (id, code, offset, length) = (
        le_u64(body),
        body[8],
        le_u64(&body[9..]),
        le_u64(&body[17..]),
    );
    let data = &body[25..];
    if matches!(code, OP_READ | OP_WRITE) && length > MAX_FORWARD {
        return Err(bad(format!("{length} bytes, over {MAX_FORWARD}")));
    }
    if code != OP_WRITE && !data.is_empty() {
        return Err(bad(format!(
            "operation {code} carries {} bytes of data",
            data.len()
        )));
    }
    let op = match code {
        OP_READ => ForwardOp::Read { offset, length },
        OP_WRITE if data.len() as u64 == length => ForwardOp::Write {
            offset,
            data: data.to_vec(),
        },
        OP_WRITE => {
            return Err(bad(format!(
                "a write of {length} bytes carries {} bytes",
                data.len()
            )))
        }
        OP_WRITE_ZEROES | OP_WRITE_ZEROES_UNMAP => ForwardOp::WriteZeroes {
            offset,
            length,
            unmap: code == OP_WRITE_ZEROES_UNMAP,
        },
        OP_DISCARD => ForwardOp::Discard { offset, length },
        OP_FLUSH => ForwardOp::Flush,
        other => return Err(bad(format!("unknown operation {other}"))),
    };
    Ok(Message::Forward { id, op })
}

fn encode_forward(out: &mut Vec<u8>, id: u64, op: &ForwardOp) {
    let (code, offset, length, data) = match op {
        ForwardOp::Read { offset, length } => (OP_READ, *offset, *length, &[][..]),
        ForwardOp::Write { offset, data } => (OP_WRITE, *offset, data.len() as u64, &data[..]),
        ForwardOp::WriteZeroes {
            offset,
            length,
            unmap,
        } => (
            if *unmap {
                OP_WRITE_ZEROES_UNMAP
            } else {
                OP_WRITE_ZEROES
            },
            *offset,
            *length,
            &[][..],
        ),
        ForwardOp::Discard { offset, length } => (OP_DISCARD, *offset, *length, &[][..]),
        ForwardOp::Flush => (OP_FLUSH, 0, 0, &[][..]),
    };
    out.extend_from_slice(&id.to_le_bytes());
    out.push(code);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(data);
}

/// `id` (u64), then 0 and a read's data, or 1 and why it failed (UTF-8).
fn decode_forwarded(body: &[u8]) -> Result<Message, FrameError> {
    let bad = |reason: String| FrameError::Malformed {
        what: "forwarded",
        reason,
    };
    if body.len() < 9 {
        return Err(bad(format!("{} bytes, under 9", body.len())));
    }
    let (id, rest) = (le_u64(body), &body[9..]);
    let result = match body[8] {
        0 if rest.len() as u64 <= MAX_FORWARD => Ok(rest.to_vec()),
        0 => {
            return Err(bad(format!(
                "{} bytes of data, over {MAX_FORWARD}",
                rest.len()
            )))
        }
        1 => Err(String::from_utf8_lossy(limit(rest, "forwarded", MAX_REASON)?).into_owned()),
        other => return Err(bad(format!("status byte {other} is neither 0 nor 1"))),
    };
    Ok(Message::Forwarded { id, result })
}

/// `offset` (u64), `chunk_bytes` (u32), then 32-byte hashes.
fn decode_hashes(body: &[u8]) -> Result<Message, FrameError> {
    let bad = |reason: String| FrameError::Malformed {
        what: "hashes",
        reason,
    };
    if body.len() <= 12 || !(body.len() - 12).is_multiple_of(32) {
        return Err(bad(format!("{} bytes", body.len())));
    }
    let chunk_bytes = le_u32(&body[8..12]);
    if chunk_bytes == 0 {
        return Err(bad("chunks of 0 bytes".into()));
    }
    let hashes = body[12..]
        .chunks_exact(32)
        .map(|h| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(h);
            hash
        })
        .collect();
    Ok(Message::Hashes {
        offset: le_u64(body),
        chunk_bytes,
        hashes,
    })
}

/// A body of exactly `N` bytes.
fn fixed<const N: usize>(body: &[u8], what: &'static str) -> Result<[u8; N], FrameError> {
    body.try_into().map_err(|_| FrameError::Malformed {
        what,
        reason: format!("{} bytes, not {N}", body.len()),
    })
}

fn limit<'a>(body: &'a [u8], what: &'static str, max: usize) -> Result<&'a [u8], FrameError> {
    if body.len() > max {
        return Err(FrameError::Malformed {
            what,
            reason: format!("{} bytes, over {max}", body.len()),
        });
    }
    Ok(body)
}

/// `count` (u32), then each record: its shipped header and payload (whose
/// length the header gives).
fn decode_records(mut body: &[u8]) -> Result<Vec<ShippedRecord>, FrameError> {
    let bad = |reason: String| FrameError::Malformed {
        what: "records",
        reason,
    };
    if body.len() < 4 {
        return Err(bad("no record count".into()));
    }
    let count = le_u32(body) as usize;
    body = &body[4..];
    // Each record takes at least its header: bound the allocation.
    if count == 0 || count > body.len() / SHIPPED_HEADER_SIZE {
        return Err(bad(format!(
            "{count} records cannot be in {} bytes",
            body.len()
        )));
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        if body.len() < SHIPPED_HEADER_SIZE {
            return Err(bad(format!("record {i} of {count} is cut short")));
        }
        let mut header = [0u8; SHIPPED_HEADER_SIZE];
        header.copy_from_slice(&body[..SHIPPED_HEADER_SIZE]);
        body = &body[SHIPPED_HEADER_SIZE..];
        let record = ShippedRecord {
            header,
            payload: Vec::new(),
        };
        let len = record.payload_len() as usize;
        if body.len() < len {
            return Err(bad(format!(
                "record {i} of {count} announces {len} payload bytes; {} remain",
                body.len()
            )));
        }
        records.push(ShippedRecord {
            payload: body[..len].to_vec(),
            ..record
        });
        body = &body[len..];
    }
    if !body.is_empty() {
        return Err(bad(format!("{} bytes after the last record", body.len())));
    }
    Ok(records)
}

/// Appends a records body to `out`.
fn encode_records(out: &mut Vec<u8>, records: &[ShippedRecord]) {
    let payload: usize = records.iter().map(|r| r.payload.len()).sum();
    out.reserve(4 + records.len() * SHIPPED_HEADER_SIZE + payload);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&r.header);
        out.extend_from_slice(&r.payload);
    }
}

/// After a batch that zstd could not shrink, this many batches are sent
/// without trying: data that did not compress rarely starts to, and a
/// failed try costs about as much CPU as the TLS encryption of the batch.
const SKIP_AFTER_MISS: u32 = 16;

/// Encodes frames; keeps a zstd context across batches.
pub struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Compressible messages left to send without trying zstd.
    skip: u32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("compress", &self.compressor.is_some())
            .field("skip", &self.skip)
            .finish()
    }
}

/// An encoded frame and, for records, the bytes before compression.
#[derive(Debug)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub raw_len: usize,
}

impl Encoder {
    /// With `compress`, record batches are compressed with zstd level 1
    /// when that makes them smaller.
    pub fn new(compress: bool) -> std::io::Result<Self> {
        let compressor = compress
            .then(|| zstd::bulk::Compressor::new(1))
            .transpose()?;
        Ok(Encoder {
            compressor,
            skip: 0,
        })
    }

    pub fn encode(&mut self, epoch: u64, message: &Message) -> Encoded {
        // The body is built after room for the header, so that the frame
        // needs no second copy of a 1 MiB batch.
        let mut bytes = vec![0u8; HEADER_SIZE];
        match message {
            Message::Hello(h) => append_json(&mut bytes, h),
            Message::Welcome(w) => append_json(&mut bytes, w),
            Message::Refuse(reason) | Message::ResyncNeeded(reason) => {
                bytes.extend_from_slice(&reason.as_bytes()[..reason.len().min(MAX_REASON)])
            }
            Message::Records(records) => encode_records(&mut bytes, records),
            Message::Ack { durable_lsn } => bytes.extend_from_slice(&durable_lsn.to_le_bytes()),
            Message::Heartbeat
            | Message::ResyncEnd
            | Message::SealRequest
            | Message::HandoverCancel => {}
            Message::Fenced(f) => append_json(&mut bytes, f),
            Message::Sealed(seal) => {
                bytes.extend_from_slice(&seal.epoch.to_le_bytes());
                bytes.extend_from_slice(&seal.lsn.to_le_bytes());
            }
            Message::HandOver { seal, timeout_ms } => {
                bytes.extend_from_slice(&seal.epoch.to_le_bytes());
                bytes.extend_from_slice(&seal.lsn.to_le_bytes());
                bytes.extend_from_slice(&timeout_ms.to_le_bytes());
            }
            Message::HandoverVerdict { promoted } => bytes.push(u8::from(*promoted)),
            Message::Detach(reason) => {
                bytes.extend_from_slice(&reason.as_bytes()[..reason.len().min(MAX_REASON)])
            }
            Message::Detached { epoch, lsn } => {
                bytes.extend_from_slice(&epoch.to_le_bytes());
                bytes.extend_from_slice(&lsn.to_le_bytes());
            }
            Message::Forward { id, op } => encode_forward(&mut bytes, *id, op),
            Message::ResumeForwarding { volume, peer_epoch } => {
                bytes.extend_from_slice(volume.as_bytes());
                bytes.extend_from_slice(&peer_epoch.to_le_bytes());
            }
            Message::Forwarded { id, result } => {
                bytes.extend_from_slice(&id.to_le_bytes());
                match result {
                    Ok(data) => {
                        bytes.push(0);
                        bytes.extend_from_slice(data);
                    }
                    Err(why) => {
                        bytes.push(1);
                        bytes.extend_from_slice(&why.as_bytes()[..why.len().min(MAX_REASON)]);
                    }
                }
            }
            Message::ResyncBegin(b) => append_json(&mut bytes, b),
            Message::Chunk { offset, data } => {
                bytes.extend_from_slice(&offset.to_le_bytes());
                bytes.extend_from_slice(data);
            }
            Message::Zero { offset, length } | Message::Keep { offset, length } => {
                bytes.extend_from_slice(&offset.to_le_bytes());
                bytes.extend_from_slice(&length.to_le_bytes());
            }
            Message::Hashes {
                offset,
                chunk_bytes,
                hashes,
            } => {
                bytes.reserve(12 + hashes.len() * 32);
                bytes.extend_from_slice(&offset.to_le_bytes());
                bytes.extend_from_slice(&chunk_bytes.to_le_bytes());
                hashes.iter().for_each(|h| bytes.extend_from_slice(h));
            }
        }
        let raw_len = bytes.len() - HEADER_SIZE;
        let mut flags = 0;
        let compressible = matches!(message, Message::Records(_) | Message::Chunk { .. });
        if let (true, Some(zstd)) = (compressible, self.compressor.as_mut()) {
            if self.skip > 0 {
                self.skip -= 1;
            } else if let Ok(packed) = zstd.compress(&bytes[HEADER_SIZE..]) {
                // Only when it pays: data that does not shrink is sent as it is.
                if packed.len() + packed.len() / 16 < raw_len {
                    bytes.truncate(HEADER_SIZE);
                    bytes.extend_from_slice(&packed);
                    flags |= FLAG_ZSTD;
                } else {
                    self.skip = SKIP_AFTER_MISS;
                }
            }
        }
        let body_len = (bytes.len() - HEADER_SIZE) as u32;
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[6] = message.code();
        bytes[7] = flags;
        bytes[8..16].copy_from_slice(&epoch.to_le_bytes());
        bytes[16..20].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c(&[&bytes[..20], &bytes[HEADER_SIZE..]]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        Encoded { bytes, raw_len }
    }
}

fn append_json(out: &mut Vec<u8>, value: &impl Serialize) {
    // Serializing these plain structs cannot fail; an empty body would be
    // refused by the peer's decoder anyway.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Sets the checksum of the frame at the start of `bytes` to match its
/// content, so tests and the fuzz target can reach the body decoders with
/// frames no real peer would build.
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_SIZE {
        return;
    }
    let body_len = (le_u32(&bytes[16..20]) as usize).min(bytes.len() - HEADER_SIZE);
    let crc = crc32c(&[&bytes[..20], &bytes[HEADER_SIZE..HEADER_SIZE + body_len]]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes one frame from the start of `bytes`; returns it and the bytes
/// it took. (The fuzz target's entry point.)
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let raw: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let header = FrameHeader::decode(raw)?;
    let end = HEADER_SIZE + header.body_len;
    let body = bytes.get(HEADER_SIZE..end).ok_or(FrameError::Truncated)?;
    Ok((header.decode_body(raw, body)?, end))
}

fn io_error(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e.to_string())
    }
}

/// Reads one frame; the body is read only after its header checked out.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut raw = [0u8; HEADER_SIZE];
    // An end before the first byte is a hang-up between frames.
    if r.read(&mut raw[..1]).await.map_err(io_error)? == 0 {
        return Err(FrameError::Closed);
    }
    r.read_exact(&mut raw[1..]).await.map_err(io_error)?;
    let header = FrameHeader::decode(&raw)?;
    let mut body = vec![0u8; header.body_len];
    r.read_exact(&mut body).await.map_err(io_error)?;
    header.decode_body(&raw, &body)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Encoded,
) -> Result<(), FrameError> {
    w.write_all(&frame.bytes).await.map_err(io_error)?;
    w.flush().await.map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lsn: u64, payload: Vec<u8>) -> ShippedRecord {
        let mut header = [0u8; SHIPPED_HEADER_SIZE];
        header[16..24].copy_from_slice(&lsn.to_le_bytes());
        header[56..60].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        ShippedRecord { header, payload }
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                volume: Uuid::from_u128(7),
                size: 1 << 30,
                block_size: 512,
                max_payload: 1 << 20,
                epoch: 3,
                epoch_history: vec![rewind_journal::EpochStart {
                    epoch: 1,
                    first_lsn: 1,
                    node: 0,
                }],
                durable_lsn: 99,
                first_lsn: 1,
            }),
            Message::Welcome(Welcome {
                epoch: 3,
                last_lsn: 50,
                durable_lsn: 50,
                resync: Some(ResyncPoint {
                    sync_lsn: 40,
                    next_offset: 1 << 20,
                }),
            }),
            Message::ResyncBegin(ResyncBegin {
                sync_lsn: 40,
                sync_ns: 1_700_000_000_000_000_000,
                epoch_history: Vec::new(),
                from_offset: 0,
                diff_key: Some("00".repeat(32)),
            }),
            Message::Hashes {
                offset: 1 << 20,
                chunk_bytes: 1 << 20,
                hashes: vec![[7; 32], [9; 32]],
            },
            Message::Keep {
                offset: 0,
                length: 3 << 20,
            },
            Message::Chunk {
                offset: 4096,
                data: vec![9; 65536],
            },
            Message::Zero {
                offset: 1 << 20,
                length: 1 << 30,
            },
            Message::ResyncEnd,
            Message::ResyncNeeded("a revert before this replica's history".into()),
            Message::Fenced(Fenced {
                epoch: 4,
                epoch_history: vec![rewind_journal::EpochStart {
                    epoch: 4,
                    first_lsn: 70,
                    node: 99,
                }],
                reason: "a newer primary".into(),
            }),
            Message::SealRequest,
            Message::Sealed(rewind_journal::Seal { epoch: 3, lsn: 69 }),
            Message::HandOver {
                seal: rewind_journal::Seal {
                    epoch: 5,
                    lsn: 1234,
                },
                timeout_ms: 30_000,
            },
            Message::HandoverCancel,
            Message::HandoverVerdict { promoted: true },
            Message::HandoverVerdict { promoted: false },
            Message::Detach("EIO writing segment 7".into()),
            Message::Detached { epoch: 6, lsn: 99 },
            Message::ResumeForwarding {
                volume: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
                peer_epoch: 6,
            },
            Message::Forward {
                id: 1,
                op: ForwardOp::Write {
                    offset: 4096,
                    data: vec![5; 8192],
                },
            },
            Message::Forward {
                id: 2,
                op: ForwardOp::Read {
                    offset: 0,
                    length: MAX_FORWARD,
                },
            },
            Message::Forward {
                id: 3,
                op: ForwardOp::WriteZeroes {
                    offset: 512,
                    length: 1024,
                    unmap: true,
                },
            },
            Message::Forward {
                id: 4,
                op: ForwardOp::WriteZeroes {
                    offset: 512,
                    length: 1024,
                    unmap: false,
                },
            },
            Message::Forward {
                id: 5,
                op: ForwardOp::Discard {
                    offset: 1 << 20,
                    length: 4096,
                },
            },
            Message::Forward {
                id: 6,
                op: ForwardOp::Flush,
            },
            Message::Forwarded {
                id: 2,
                result: Ok(vec![3; 4096]),
            },
            Message::Forwarded {
                id: 1,
                result: Err("invalid request: offset past the end".into()),
            },
            Message::Refuse("another volume".into()),
            Message::Records(vec![record(1, vec![7; 4096]), record(2, Vec::new())]),
            Message::Ack { durable_lsn: 42 },
            Message::Heartbeat,
        ]
    }

    #[test]
    fn every_message_round_trips_compressed_or_not() {
        for compress in [false, true] {
            let mut encoder = Encoder::new(compress).expect("encoder");
            for message in messages() {
                let encoded = encoder.encode(5, &message);
                let (frame, used) = decode(&encoded.bytes).expect("decode");
                assert_eq!(used, encoded.bytes.len());
                assert_eq!(frame, Frame { epoch: 5, message });
            }
        }
    }

    /// A hello carries the whole epoch history: the longest a volume may
    /// have, with every number at its widest, fits in a frame.
    #[test]
    fn a_hello_with_the_longest_epoch_history_round_trips() {
        let widest = rewind_journal::EpochStart {
            epoch: u64::MAX,
            first_lsn: u64::MAX,
            node: u64::MAX,
        };
        let hello = Message::Hello(Hello {
            volume: Uuid::from_u128(u128::MAX),
            size: u64::MAX,
            block_size: u32::MAX,
            max_payload: u64::MAX,
            epoch: u64::MAX,
            epoch_history: vec![widest; rewind_journal::MAX_EPOCHS],
            durable_lsn: u64::MAX,
            first_lsn: u64::MAX,
        });
        let encoded = Encoder::new(false).expect("encoder").encode(1, &hello);
        let (frame, _) = decode(&encoded.bytes).expect("decode");
        assert_eq!(frame.message, hello);
    }

    #[test]
    fn compression_is_used_only_when_it_pays() {
        let mut encoder = Encoder::new(true).expect("encoder");
        let zeros = encoder.encode(1, &Message::Records(vec![record(1, vec![0; 65536])]));
        assert!(zeros.bytes.len() < 1000 && zeros.raw_len > 65536);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                // xorshift64: bytes zstd cannot shrink.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let random = encoder.encode(1, &Message::Records(vec![record(1, noise)]));
        assert_eq!(random.bytes[7], 0, "sent uncompressed");
        // After a miss, zstd is not tried for a while, then tried again.
        for _ in 0..SKIP_AFTER_MISS {
            let skipped = encoder.encode(1, &Message::Records(vec![record(2, vec![0; 65536])]));
            assert_eq!(skipped.bytes[7], 0, "not tried right after a miss");
            assert_eq!(
                decode(&skipped.bytes).expect("decodes").1,
                skipped.bytes.len()
            );
        }
        let tried = encoder.encode(1, &Message::Records(vec![record(3, vec![0; 65536])]));
        assert_eq!(tried.bytes[7], FLAG_ZSTD, "tried again");
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_refused() {
        let mut encoder = Encoder::new(false).expect("encoder");
        let good = encoder
            .encode(2, &Message::Records(vec![record(9, vec![1; 512])]))
            .bytes;
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad).is_err(), "bit {bit}");
        }
        for cut in 0..good.len() {
            assert_eq!(
                decode(&good[..cut]),
                Err(FrameError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let mut encoder = Encoder::new(false).expect("encoder");
        let good = encoder.encode(1, &Message::Heartbeat).bytes;
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(decode(&v2).map(|_| ()), Err(FrameError::Version(2)));
        let mut long = good.clone();
        long[16..20].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&long).map(|_| ()),
            Err(FrameError::TooLong(MAX_BODY + 1))
        );
        let mut kind = good.clone();
        kind[6] = 25;
        assert_eq!(decode(&kind).map(|_| ()), Err(FrameError::Type(25)));
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(FrameError::Magic(_))
        ));
    }

    /// A reason ends up in `last_error` and the log: one longer than
    /// MAX_REASON is cut by the encoder and refused by the decoder, though
    /// a JSON body may be far longer.
    #[test]
    fn a_reason_is_at_most_max_reason_bytes() {
        let mut encoder = Encoder::new(false).expect("encoder");
        let long = "x".repeat(MAX_REASON + 1);
        let cut = encoder.encode(1, &Message::Refuse(long.clone())).bytes;
        let (frame, _) = decode(&cut).expect("decode");
        assert_eq!(
            frame.message,
            Message::Refuse(long[..MAX_REASON].to_owned())
        );
        let mut over = cut;
        over.push(b'x');
        over[16..20].copy_from_slice(&((MAX_REASON + 1) as u32).to_le_bytes());
        reseal(&mut over);
        assert!(matches!(
            decode(&over),
            Err(FrameError::Malformed { what: "refuse", .. })
        ));
    }

    #[test]
    fn resealed_frames_with_bad_bodies_are_malformed() {
        let mut encoder = Encoder::new(false).expect("encoder");
        let mut ack = encoder.encode(1, &Message::Ack { durable_lsn: 3 }).bytes;
        ack[16] = 7;
        ack.truncate(HEADER_SIZE + 7);
        reseal(&mut ack);
        assert!(matches!(
            decode(&ack),
            Err(FrameError::Malformed { what: "ack", .. })
        ));
        let mut hello = encoder.encode(1, &Message::Heartbeat).bytes;
        hello[6] = 1;
        hello[16] = 2;
        hello.extend_from_slice(b"{}");
        reseal(&mut hello);
        assert!(matches!(
            decode(&hello),
            Err(FrameError::Malformed { what: "hello", .. })
        ));
        let mut verdict = encoder
            .encode(1, &Message::HandoverVerdict { promoted: true })
            .bytes;
        verdict[HEADER_SIZE] = 2;
        reseal(&mut verdict);
        assert!(matches!(
            decode(&verdict),
            Err(FrameError::Malformed {
                what: "handover-verdict",
                ..
            })
        ));
        let mut zstd = encoder
            .encode(1, &Message::Records(vec![record(1, vec![0; 512])]))
            .bytes;
        zstd[7] = 1;
        reseal(&mut zstd);
        assert!(matches!(
            decode(&zstd),
            Err(FrameError::Malformed {
                what: "records",
                ..
            })
        ));
    }

    #[test]
    fn forwarded_requests_that_lie_about_their_size_are_malformed() {
        let mut encoder = Encoder::new(false).expect("encoder");
        let write = |length: u64, data: usize| {
            let mut bytes = Encoder::new(false)
                .expect("encoder")
                .encode(
                    1,
                    &Message::Forward {
                        id: 9,
                        op: ForwardOp::Write {
                            offset: 0,
                            data: vec![1; data],
                        },
                    },
                )
                .bytes;
            bytes[HEADER_SIZE + 17..HEADER_SIZE + 25].copy_from_slice(&length.to_le_bytes());
            reseal(&mut bytes);
            decode(&bytes)
        };
        let malformed = |r: Result<(Frame, usize), FrameError>| {
            matches!(
                r,
                Err(FrameError::Malformed {
                    what: "forward",
                    ..
                })
            )
        };
        assert!(write(512, 512).is_ok());
        assert!(malformed(write(1024, 512)), "less data than its length");
        assert!(malformed(write(MAX_FORWARD + 512, 512)), "over the limit");
        // Without data, any length decodes (the disk's size bounds it).
        let zero_op = |op: ForwardOp| {
            let bytes = Encoder::new(false)
                .expect("encoder")
                .encode(1, &Message::Forward { id: 3, op })
                .bytes;
            decode(&bytes).map(|(frame, _)| frame.message)
        };
        for op in [
            ForwardOp::Discard {
                offset: 512,
                length: u64::MAX - 511,
            },
            ForwardOp::WriteZeroes {
                offset: 0,
                length: 1 << 40,
                unmap: false,
            },
        ] {
            assert_eq!(zero_op(op.clone()), Ok(Message::Forward { id: 3, op }));
        }
        assert!(
            matches!(
                zero_op(ForwardOp::Read {
                    offset: 0,
                    length: MAX_FORWARD + 512,
                }),
                Err(FrameError::Malformed {
                    what: "forward",
                    ..
                })
            ),
            "a read over the limit"
        );
        let mut read = encoder
            .encode(
                1,
                &Message::Forward {
                    id: 1,
                    op: ForwardOp::Read {
                        offset: 0,
                        length: 512,
                    },
                },
            )
            .bytes;
        read.extend_from_slice(&[0; 512]);
        read[16..20].copy_from_slice(&(25u32 + 512).to_le_bytes());
        reseal(&mut read);
        assert!(malformed(decode(&read)), "a read that carries data");
        let mut unknown = read[..HEADER_SIZE + 25].to_vec();
        unknown[16..20].copy_from_slice(&25u32.to_le_bytes());
        unknown[HEADER_SIZE + 8] = 77;
        reseal(&mut unknown);
        assert!(malformed(decode(&unknown)), "an unknown operation");
        let mut status = encoder
            .encode(
                1,
                &Message::Forwarded {
                    id: 1,
                    result: Ok(Vec::new()),
                },
            )
            .bytes;
        status[HEADER_SIZE + 8] = 2;
        reseal(&mut status);
        assert!(matches!(
            decode(&status),
            Err(FrameError::Malformed {
                what: "forwarded",
                ..
            })
        ));
    }

    #[test]
    fn records_that_do_not_fit_their_frame_are_malformed() {
        let mut body = Vec::new();
        encode_records(&mut body, &[record(1, vec![3; 1024])]);
        let mut count = body.clone();
        body.truncate(body.len() - 1);
        assert!(decode_records(&body).is_err());
        count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_records(&count).is_err());
        assert!(decode_records(&0u32.to_le_bytes()).is_err());
    }
}
