//! Prometheus metrics (`serve --metrics-listen ADDR:PORT`, `rewindctl
//! metrics`).
//!
//! Each scrape takes what `status` reports (the control socket's own
//! answer, so the two never disagree) and the live export's per-operation
//! counters, and encodes them with `prometheus-client` in the Prometheus
//! text format (version 0.0.4). Every series carries a `volume` label, the
//! volume's uuid. The names are listed in vhost-blk/OPERATIONS.md,
//! "Metrics".
//!
//! The HTTP side is a small responder on its own thread: `GET /metrics`
//! gets the text, any other path 404, a request that is not HTTP or is
//! longer than [`MAX_REQUEST`] 400; one connection at a time, each with a
//! read and write timeout, so a stuck client delays a scrape, never the
//! guest.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::control::{Control, ACCEPT_RETRY};
use crate::gate::{OpStats, LATENCY_BOUNDS};

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Longest request head (request line and headers) read.
pub const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The gate states `rewind_gate_state` has a series for.
const GATE_STATES: &[&str] = &["serving", "draining", "drained", "fenced", "failed"];
const ROLES: &[&str] = &["primary", "replica"];
/// `LinkState::name` of every link state.
const LINK_STATES: &[&str] = &[
    "connecting",
    "syncing",
    "streaming",
    "disconnected",
    "degraded",
    "outdated",
    "split_brain",
];
/// The handover phases (`failover::handover::Phase`, snake_case).
const HANDOVER_STATES: &[&str] = &["armed", "switching", "done", "rolled_back", "cancelled"];

/// The parts of `status` the metrics show.
#[derive(Debug, Clone, Deserialize)]
struct StatusView {
    volume: String,
    state: String,
    epoch: u64,
    attached: Option<serde_json::Value>,
    io: Io,
    last_lsn: u64,
    durable_lsn: u64,
    journal_bytes: u64,
    journal_max: u64,
    segments_used: u64,
    segments_free: u64,
    failed: Option<String>,
    window_configured: u64,
    window_effective: u64,
    forced_folds: u64,
    folded_bytes: u64,
    fold_seconds: f64,
    held_requests: u64,
    role: String,
    hold: Option<String>,
    handover: Option<HandoverView>,
    replication: Option<ReplicationView>,
}

#[derive(Debug, Clone, Deserialize)]
struct Io {
    completed: u64,
    failed: u64,
    modifying: u64,
    in_flight: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct HandoverView {
    state: String,
    side: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ReplicationView {
    state: String,
    acked_lsn: u64,
    lag_records: u64,
    lag_bytes: u64,
    rpo_seconds: f64,
    bytes_sent: u64,
    out_of_sync_bytes: u64,
    outdated: Option<String>,
    detached: Option<DetachedView>,
    serving_detached: Option<ServingView>,
}

#[derive(Debug, Clone, Deserialize)]
struct DetachedView {
    forwarded_requests: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct ServingView {
    requests: u64,
    ended: Option<String>,
}

/// One scrape's numbers.
#[derive(Debug, Clone)]
struct Snapshot {
    status: StatusView,
    ops: Vec<OpStats>,
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family.
struct Family<'e, 'a> {
    encoder: &'e mut DescriptorEncoder<'a>,
    volume: &'e str,
}

impl Family<'_, '_> {
    fn labels(&self, extra: &[(&'static str, &str)]) -> Labels {
        let mut labels = vec![("volume", self.volume.to_string())];
        labels.extend(extra.iter().map(|&(k, v)| (k, v.to_string())));
        labels
    }

    /// One family: its descriptor, then a sample per label set, each
    /// encoded by `each`.
    fn family<T: Copy>(
        &mut self,
        name: &str,
        help: &str,
        metric_type: MetricType,
        samples: &[(&[(&'static str, &str)], T)],
        each: impl Fn(T, MetricEncoder) -> std::fmt::Result,
    ) -> std::fmt::Result {
        let labels: Vec<Labels> = samples.iter().map(|(l, _)| self.labels(l)).collect();
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, metric_type)?;
        for (labels, &(_, value)) in labels.iter().zip(samples) {
            each(value, metric.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauges(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(&[(&'static str, &str)], f64)],
    ) -> std::fmt::Result {
        self.family(name, help, MetricType::Gauge, samples, |value, family| {
            // Whole numbers print as such ("3", not "3.0").
            if value.fract() == 0.0 && value.abs() < 9e15 {
                ConstGauge::new(value as i64).encode(family)
            } else {
                ConstGauge::new(value).encode(family)
            }
        })
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) -> std::fmt::Result {
        self.gauges(name, help, &[(&[], value)])
    }

    /// `name` without `_total`: the encoder appends it.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(&[(&'static str, &str)], u64)],
    ) -> std::fmt::Result {
        self.family(name, help, MetricType::Counter, samples, |value, family| {
            ConstCounter::new(value).encode(family)
        })
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) -> std::fmt::Result {
        self.counters(name, help, &[(&[], value)])
    }

    /// A counter of seconds (`name` without `_total`).
    fn seconds(&mut self, name: &str, help: &str, value: f64) -> std::fmt::Result {
        self.family(
            name,
            help,
            MetricType::Counter,
            &[(&[], value)],
            |value, family| ConstCounter::new(value).encode(family),
        )
    }

    /// A gauge per value of `all`, 1 for `current` and 0 for the others
    /// (a state set).
    fn states(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        all: &[&str],
        current: &str,
        extra: &[(&'static str, &str)],
    ) -> std::fmt::Result {
        let mut values: Vec<&str> = all.to_vec();
        if !values.contains(&current) {
            values.push(current);
        }
        let samples: Vec<(Vec<(&'static str, &str)>, f64)> = values
            .iter()
            .map(|&v| {
                let mut l = extra.to_vec();
                l.push((label, v));
                (l, if v == current { 1.0 } else { 0.0 })
            })
            .collect();
        let borrowed: Vec<(&[(&'static str, &str)], f64)> =
            samples.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        self.gauges(name, help, &borrowed)
    }
}

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

impl Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.status;
        let mut f = Family {
            encoder: &mut encoder,
            volume: &s.volume,
        };
        // IO, per operation (the live export).
        let op = |o: &OpStats| [("op", o.kind.name())];
        let ops: Vec<[(&'static str, &str); 1]> = self.ops.iter().map(op).collect();
        let per_op = |values: &dyn Fn(&OpStats) -> u64| -> Vec<(&[(&'static str, &str)], u64)> {
            ops.iter()
                .zip(&self.ops)
                .map(|(l, o)| (l.as_slice(), values(o)))
                .collect()
        };
        f.counters(
            "rewind_io_requests",
            "Requests the guest's export completed, by operation",
            &per_op(&|o| o.requests),
        )?;
        f.counters(
            "rewind_io_errors",
            "Requests completed with an error status, by operation",
            &per_op(&|o| o.errors),
        )?;
        f.counters(
            "rewind_io_bytes",
            "Data bytes read and written by the guest, by operation",
            &per_op(&|o| o.bytes),
        )?;
        {
            let mut metric = f.encoder.encode_descriptor(
                "rewind_io_request_duration_seconds",
                "Time from a parsed request to its status byte, by operation",
                None,
                MetricType::Histogram,
            )?;
            for o in &self.ops {
                let labels: Labels = vec![
                    ("volume", s.volume.clone()),
                    ("op", o.kind.name().to_string()),
                ];
                // Per bucket: the encoder makes them cumulative.
                let bounded: u64 = o.buckets.iter().sum();
                let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
                    .iter()
                    .copied()
                    .zip(o.buckets.iter().copied())
                    .chain([(f64::INFINITY, o.requests.saturating_sub(bounded))])
                    .collect();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<Labels>(o.seconds, o.requests, &buckets, None)?;
            }
        }
        f.counter(
            "rewind_io_completed",
            "Requests the guest's export completed, every operation together",
            s.io.completed,
        )?;
        f.counter(
            "rewind_io_failed",
            "Requests completed with an error status (storage errors among them)",
            s.io.failed,
        )?;
        f.counter(
            "rewind_io_modifying",
            "Requests that may have changed the disk (writes, write-zeroes, discards) and reverts",
            s.io.modifying,
        )?;
        f.gauge(
            "rewind_io_in_flight",
            "Requests running now, those held on a storage error included",
            s.io.in_flight as f64,
        )?;
        // The volume and its journal.
        f.gauge(
            "rewind_volume_failed",
            "1 if the volume failed on a storage error it could not retry past",
            bool_value(s.failed.is_some()),
        )?;
        f.gauge(
            "rewind_journal_bytes",
            "Bytes the journal pool occupies on disk",
            s.journal_bytes as f64,
        )?;
        f.gauge(
            "rewind_journal_max_bytes",
            "The journal's hard limit",
            s.journal_max as f64,
        )?;
        f.gauges(
            "rewind_journal_segments",
            "Journal segments, used and free",
            &[
                (&[("state", "used")], s.segments_used as f64),
                (&[("state", "free")], s.segments_free as f64),
            ],
        )?;
        f.gauge(
            "rewind_window_configured_seconds",
            "Seconds of history the volume is set to keep",
            s.window_configured as f64,
        )?;
        f.gauge(
            "rewind_window_effective_seconds",
            "Seconds of history the volume keeps now",
            s.window_effective as f64,
        )?;
        f.counter(
            "rewind_forced_folds",
            "Folds the journal's hard limit forced (each shrank the window)",
            s.forced_folds,
        )?;
        // The applier's throughput is the ratio of their rates.
        f.counter(
            "rewind_fold_bytes",
            "Journal bytes folded into base.img since the daemon started",
            s.folded_bytes,
        )?;
        f.seconds(
            "rewind_fold_seconds",
            "Seconds the applier spent folding them",
            s.fold_seconds,
        )?;
        f.gauge(
            "rewind_storage_held_requests",
            "Requests held now, retrying an EIO or ENOSPC on the volume's files (--io-error-hold)",
            s.held_requests as f64,
        )?;
        f.gauge(
            "rewind_last_lsn",
            "The newest record's lsn",
            s.last_lsn as f64,
        )?;
        f.gauge(
            "rewind_durable_lsn",
            "Every lsn up to here is durable",
            s.durable_lsn as f64,
        )?;
        // The gate, the client, the role.
        f.states(
            "rewind_gate_state",
            "1 for the state the live export's gate is in",
            "state",
            GATE_STATES,
            &s.state,
            &[],
        )?;
        f.gauge(
            "rewind_gate_held",
            "1 if the gate is held closed at start (status.hold)",
            bool_value(s.hold.is_some()),
        )?;
        f.gauge(
            "rewind_client_attached",
            "1 if a client (QEMU) is attached to the live export",
            bool_value(s.attached.is_some()),
        )?;
        f.gauge("rewind_epoch", "The volume's epoch", s.epoch as f64)?;
        f.states(
            "rewind_role",
            "1 for this copy's role",
            "role",
            ROLES,
            &s.role,
            &[],
        )?;
        // Replication.
        f.gauge(
            "rewind_replication_enabled",
            "1 if the daemon replicates (ships to or receives from a peer)",
            bool_value(s.replication.is_some()),
        )?;
        if let Some(r) = &s.replication {
            f.states(
                "rewind_replication_state",
                "1 for the replication link's state",
                "state",
                LINK_STATES,
                &r.state,
                &[],
            )?;
            f.gauge(
                "rewind_replication_acked_lsn",
                "Every lsn up to here is durable at the replica",
                r.acked_lsn as f64,
            )?;
            f.gauge(
                "rewind_replication_lag_records",
                "Records the replica has not made durable",
                r.lag_records as f64,
            )?;
            f.gauge(
                "rewind_replication_lag_bytes",
                "Bytes of records the replica has not made durable",
                r.lag_bytes as f64,
            )?;
            f.gauge(
                "rewind_replication_rpo_seconds",
                "Now minus the time of the oldest record the replica has not made durable",
                r.rpo_seconds,
            )?;
            f.counter(
                "rewind_replication_sent_bytes",
                "Bytes sent to the replica on the wire",
                r.bytes_sent,
            )?;
            f.gauge(
                "rewind_replication_out_of_sync_bytes",
                "Bytes a forced fold took from the replica before it had them",
                r.out_of_sync_bytes as f64,
            )?;
            f.gauge(
                "rewind_replication_outdated",
                "1 on a replica that lost its primary without a seal",
                bool_value(r.outdated.is_some()),
            )?;
            f.gauge(
                "rewind_detached",
                "1 on a primary whose storage failed and that forwards its guest's IO to its peer \
                 (--on-storage-error detach): evacuate it with a handover",
                bool_value(r.detached.is_some()),
            )?;
            f.counter(
                "rewind_detached_forwarded_requests",
                "Requests a detached primary forwarded to its peer",
                r.detached.as_ref().map_or(0, |d| d.forwarded_requests),
            )?;
            f.gauge(
                "rewind_serving_detached",
                "1 on a node that serves a detached primary's forwarded requests",
                bool_value(
                    r.serving_detached
                        .as_ref()
                        .is_some_and(|serving| serving.ended.is_none()),
                ),
            )?;
            f.counter(
                "rewind_serving_detached_requests",
                "Forwarded requests this node served for a detached primary",
                r.serving_detached
                    .as_ref()
                    .map_or(0, |serving| serving.requests),
            )?;
        }
        // The last handover.
        if let Some(h) = &s.handover {
            f.states(
                "rewind_handover_state",
                "1 for the state of the last handover this node took part in",
                "state",
                HANDOVER_STATES,
                &h.state,
                &[("side", h.side.as_str())],
            )?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Scrape(Snapshot);

impl Collector for Scrape {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }
}

fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(snapshot)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// The metrics text of the daemon `control` serves.
pub fn render(control: &Control) -> Result<String, String> {
    let answer = control.answer(r#"{"version": 1, "command": "status"}"#, &mut |_| {});
    let status = answer
        .get("result")
        .filter(|_| answer["ok"] == true)
        .ok_or_else(|| format!("status failed: {}", answer["error"]))?;
    let status: StatusView =
        serde_json::from_value(status.clone()).map_err(|e| format!("cannot read status: {e}"))?;
    Ok(encode(Snapshot {
        status,
        ops: control.live.gate.op_stats(),
    }))
}

/// An HTTP answer: status line, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(code: u16, body: &str) -> Response {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    fn reason(&self) -> &'static str {
        match self.code {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        }
    }

    /// The bytes sent (HTTP/1.1, one answer, then the connection closes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.code,
            self.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// Answers a request head (the bytes up to the blank line, or what came
/// before the client stopped sending). `metrics` is called only for a
/// `GET /metrics`.
pub fn respond(head: &[u8], metrics: impl FnOnce() -> Result<String, String>) -> Response {
    let Ok(head) = std::str::from_utf8(head) else {
        return Response::text(400, "bad request: not UTF-8");
    };
    let Some(line) = head.split("\r\n").next().filter(|l| !l.is_empty()) else {
        return Response::text(400, "bad request: no request line");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request: malformed request line");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Response::text(400, "bad request: malformed request line");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Response::text(404, "not found; the metrics are at /metrics");
    }
    if method != "GET" {
        return Response::text(405, "only GET is supported");
    }
    match metrics() {
        Ok(body) => Response {
            code: 200,
            content_type: CONTENT_TYPE,
            body,
        },
        Err(e) => Response::text(500, &e),
    }
}

/// Reads a request head from `stream`: up to the blank line that ends the
/// headers, at most [`MAX_REQUEST`] bytes. `None` if it is longer.
pub fn read_head(stream: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // The client stopped sending: answer what came.
            return Ok(Some(head));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

fn answer(mut stream: TcpStream, metrics: impl FnOnce() -> Result<String, String>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let response = match read_head(&mut stream) {
        Ok(Some(head)) => respond(&head, metrics),
        Ok(None) => Response::text(400, "bad request: request head too long"),
        Err(e) => {
            tracing::debug!(error = %e, "metrics: cannot read the request");
            return;
        }
    };
    if let Err(e) = stream.write_all(&response.to_bytes()) {
        tracing::debug!(error = %e, "metrics: cannot send the answer");
        return;
    }
    // Closing with unread bytes would reset the connection and could cut
    // the answer off: read what the client still sends, boundedly.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut (&mut stream).take(64 << 10), &mut std::io::sink());
}

/// Serves `/metrics` on `address` from a thread of its own; returns the
/// address bound (a port of 0 picks a free one).
pub fn start(
    address: SocketAddr,
    control: Arc<Control>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    let thread = std::thread::Builder::new()
        .name("rewind-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => answer(stream, || render(&control)),
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics: accept failed");
                        std::thread::sleep(ACCEPT_RETRY);
                    }
                }
            }
        })?;
    tracing::info!(listen = %bound, "serving metrics at /metrics");
    Ok((bound, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Kind;

    fn snapshot(replication: bool) -> Snapshot {
        let mut status = serde_json::json!({
            "volume": "6b3c1f8e-0000-4000-8000-000000000001",
            "state": "serving",
            "epoch": 3,
            "attached": {"id": 1},
            "io": {"completed": 10, "failed": 1, "modifying": 4, "in_flight": 2},
            "last_lsn": 40,
            "durable_lsn": 39,
            "journal_bytes": 1 << 20,
            "journal_max": 1 << 30,
            "segments_used": 2,
            "segments_free": 30,
            "failed": null,
            "window_configured": 3600,
            "window_effective": 1800,
            "forced_folds": 5,
            "folded_bytes": 134217728,
            "fold_seconds": 0.5,
            "held_requests": 3,
            "role": "primary",
            "hold": null,
            "handover": {"state": "armed", "side": "source", "timeout_ms": 1000},
            "replication": null,
        });
        if replication {
            status["replication"] = serde_json::json!({
                "role": "primary", "peer": "10.0.0.2:7000", "mode": "async",
                "state": "streaming", "acked_lsn": 38, "lag_records": 2,
                "lag_bytes": 8192, "rpo_seconds": 0.25, "bytes_sent": 123456,
                "compression_ratio": 1.0, "resync": null, "last_resync": null,
                "out_of_sync_bytes": 0, "outdated": null, "last_error": null,
                "detached": {"summary": "detached: local storage failed (EIO); evacuate with handover",
                             "reason": "EIO", "since": "2026-11-30T19:26:25Z", "peer_epoch": 4,
                             "forwarded_requests": 77},
                "serving_detached": null,
            });
        }
        let mut write = OpStats {
            kind: Kind::Out,
            requests: 4,
            errors: 1,
            bytes: 16384,
            seconds: 0.002,
            buckets: [0; LATENCY_BOUNDS.len()],
        };
        write.buckets[3] = 3;
        Snapshot {
            status: serde_json::from_value(status).unwrap(),
            ops: vec![write],
        }
    }

    fn line<'t>(text: &'t str, prefix: &str) -> &'t str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"))
    }

    #[test]
    fn the_text_names_every_series_with_its_volume() {
        let text = encode(snapshot(true));
        let v = r#"volume="6b3c1f8e-0000-4000-8000-000000000001""#;
        for (prefix, value) in [
            ("rewind_io_requests_total{", "4"),
            ("rewind_io_errors_total{", "1"),
            ("rewind_io_bytes_total{", "16384"),
            ("rewind_io_completed_total{", "10"),
            ("rewind_io_failed_total{", "1"),
            ("rewind_io_in_flight{", "2"),
            ("rewind_journal_bytes{", "1048576"),
            ("rewind_window_configured_seconds{", "3600"),
            ("rewind_window_effective_seconds{", "1800"),
            ("rewind_forced_folds_total{", "5"),
            ("rewind_fold_bytes_total{", "134217728"),
            ("rewind_fold_seconds_total{", "0.5"),
            ("rewind_storage_held_requests{", "3"),
            ("rewind_epoch{", "3"),
            ("rewind_replication_lag_bytes{", "8192"),
            ("rewind_replication_rpo_seconds{", "0.25"),
            ("rewind_replication_sent_bytes_total{", "123456"),
            ("rewind_replication_acked_lsn{", "38"),
            ("rewind_detached{", "1"),
            ("rewind_detached_forwarded_requests_total{", "77"),
            ("rewind_serving_detached{", "0"),
            ("rewind_serving_detached_requests_total{", "0"),
        ] {
            let l = line(&text, prefix);
            assert!(l.contains(v), "{l}");
            assert!(l.ends_with(&format!(" {value}")), "{l}");
        }
        assert!(text.contains("# TYPE rewind_io_requests_total counter\n"));
        assert!(text.contains("# TYPE rewind_io_request_duration_seconds histogram\n"));
        assert!(line(&text, "rewind_io_requests_total{").contains(r#"op="write""#));
        assert!(line(
            &text,
            r#"rewind_gate_state{volume="6b3c1f8e-0000-4000-8000-000000000001",state="serving"}"#
        )
        .ends_with(" 1"));
        assert!(line(
            &text,
            r#"rewind_gate_state{volume="6b3c1f8e-0000-4000-8000-000000000001",state="fenced"}"#
        )
        .ends_with(" 0"));
        assert!(line(
            &text,
            r#"rewind_role{volume="6b3c1f8e-0000-4000-8000-000000000001",role="primary"}"#
        )
        .ends_with(" 1"));
        assert!(line(&text, "rewind_replication_state{").contains("state=\"connecting\""));
        assert!(text.contains(r#"state="streaming"} 1"#));
        assert!(text.contains(r#"side="source",state="armed"} 1"#));
        assert!(text.contains(r#"op="write",le="+Inf"} 4"#), "{text}");
        assert!(text.contains(r#"op="write",le="0.001"} 3"#), "{text}");
        assert!(line(&text, "rewind_io_request_duration_seconds_sum{").ends_with(" 0.002"));
        assert!(line(&text, "rewind_io_request_duration_seconds_count{").ends_with(" 4"));
    }

    #[test]
    fn without_replication_only_its_enabled_gauge_shows() {
        let text = encode(snapshot(false));
        assert!(line(&text, "rewind_replication_enabled{").ends_with(" 0"));
        assert!(!text.contains("rewind_replication_lag"));
        assert!(!text.contains("rewind_replication_state"));
    }

    #[test]
    fn an_unknown_state_still_gets_its_series() {
        let mut s = snapshot(false);
        s.status.state = "something_new".into();
        let text = encode(s);
        assert!(text.contains(r#"state="something_new"} 1"#));
        assert!(text.contains(r#"state="serving"} 0"#));
    }

    fn ok() -> Result<String, String> {
        Ok("rewind_epoch 1\n".into())
    }

    #[test]
    fn get_metrics_is_answered_with_the_text() {
        for head in [
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /metrics?x=1 HTTP/1.0\r\n\r\n",
        ] {
            let r = respond(head.as_bytes(), ok);
            assert_eq!(r.code, 200, "{head:?}");
            assert_eq!(r.content_type, CONTENT_TYPE);
            assert_eq!(r.body, "rewind_epoch 1\n");
        }
        let bytes =
            String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\n\r\n", ok).to_bytes()).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(bytes.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(bytes.contains("Content-Length: 15\r\n"));
        assert!(bytes.ends_with("\r\n\r\nrewind_epoch 1\n"));
    }

    #[test]
    fn bad_requests_get_an_error_and_no_metrics() {
        let never = || -> Result<String, String> { panic!("metrics rendered for a bad request") };
        for (head, code) in [
            (&b""[..], 400),
            (b"\r\n\r\n", 400),
            (b"\xff\xfe GET /metrics HTTP/1.1\r\n\r\n", 400),
            (b"GET\r\n\r\n", 400),
            (b"GET /metrics\r\n\r\n", 400),
            (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
            (b"GET metrics HTTP/1.1\r\n\r\n", 400),
            (b"GET /metrics SMTP/1.0\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 404),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
            (b"GET /../metrics HTTP/1.1\r\n\r\n", 404),
            (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", 405),
        ] {
            let r = respond(head, never);
            assert_eq!(r.code, code, "{:?}", String::from_utf8_lossy(head));
            assert!(String::from_utf8(r.to_bytes()).is_ok());
        }
    }

    #[test]
    fn a_request_head_is_bounded() {
        let long = vec![b'a'; 3 * MAX_REQUEST];
        assert_eq!(read_head(&mut &long[..]).unwrap(), None);
        let ended = b"GET /metrics HTTP/1.1\r\n\r\nbody";
        let head = read_head(&mut &ended[..]).unwrap().unwrap();
        assert!(head.starts_with(b"GET /metrics HTTP/1.1\r\n\r\n"));
        let cut = b"GET /metr";
        assert_eq!(read_head(&mut &cut[..]).unwrap().unwrap(), cut);
    }

    #[test]
    fn the_server_answers_over_tcp_and_survives_garbage() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for stream in listener.incoming().take(3) {
                answer(stream.unwrap(), ok);
            }
        });
        let fetch = |request: &[u8]| {
            let mut s = TcpStream::connect(address).unwrap();
            s.write_all(request).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        assert!(fetch(&[0xff; 20_000]).starts_with("HTTP/1.1 400 "));
        assert!(fetch(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(fetch(b"GET /metrics HTTP/1.1\r\n\r\n").ends_with("rewind_epoch 1\n"));
        server.join().unwrap();
    }
}
