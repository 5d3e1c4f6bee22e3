//! The access log: Istio's default format (`EnvoyTextLogFormat`, or its JSON encoding), a
//! line per request and per proxied connection, to stdout or a file.
//!
//! Requests hand an owned [`Entry`] to a writer thread through a bounded queue: formatting
//! and writing happen off the serving threads, lines are written in batches and flushed
//! whenever the queue runs empty. A full queue makes the sender wait (no line is lost).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

/// Lines queued for the writer before senders wait.
const QUEUE: usize = 16_384;

/// `--access-log-encoding`: Istio's MeshConfig `accessLogEncoding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    #[default]
    Text,
    Json,
}

/// One request or connection, with the fields of Istio's default format. Empty strings
/// and `None` print as `-` (text) or `null` (JSON), as Envoy prints absent values.
pub struct Entry {
    pub start: SystemTime,
    /// Empty for a TCP connection.
    pub method: String,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...; empty for a TCP connection.
    pub protocol: &'static str,
    /// 0 for a TCP connection, as Envoy logs it.
    pub status: u16,
    pub flags: String,
    /// `None` prints as absent; a given empty string prints empty, as Envoy prints it.
    pub details: Option<String>,
    pub termination_details: String,
    pub transport_failure: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_service_time: Option<u64>,
    pub forwarded_for: String,
    pub user_agent: String,
    pub request_id: String,
    pub authority: String,
    pub upstream_host: String,
    pub upstream_cluster: String,
    pub upstream_local: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub server_name: String,
    pub route_name: String,
}

impl Entry {
    /// An entry started now with every field absent.
    pub fn new() -> Self {
        Self {
            start: SystemTime::now(),
            method: String::new(),
            path: String::new(),
            protocol: "",
            status: 0,
            flags: String::new(),
            details: None,
            termination_details: String::new(),
            transport_failure: String::new(),
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_service_time: None,
            forwarded_for: String::new(),
            user_agent: String::new(),
            request_id: String::new(),
            authority: String::new(),
            upstream_host: String::new(),
            upstream_cluster: String::new(),
            upstream_local: None,
            downstream_local: None,
            downstream_remote: None,
            server_name: String::new(),
            route_name: String::new(),
        }
    }

    /// Istio's `EnvoyTextLogFormat` (pilot/pkg/model/telemetry_logging.go).
    pub fn text(&self) -> String {
        let d = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} \"{}\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {} {} {} {} {}\n",
            timestamp(self.start),
            d(&self.method),
            d(&self.path),
            d(self.protocol),
            self.status,
            d(&self.flags),
            self.details.as_deref().unwrap_or("-"),
            d(&self.termination_details),
            d(&self.transport_failure),
            self.bytes_received,
            self.bytes_sent,
            self.duration.as_millis(),
            self.upstream_service_time
                .map_or_else(|| "-".to_owned(), |t| t.to_string()),
            d(&self.forwarded_for),
            d(&self.user_agent),
            d(&self.request_id),
            d(&self.authority),
            d(&self.upstream_host),
            d(&self.upstream_cluster),
            addr(self.upstream_local),
            addr(self.downstream_local),
            addr(self.downstream_remote),
            d(&self.server_name),
            d(&self.route_name),
        )
    }

    /// Istio's JSON encoding: its keys, numbers where Envoy gives numbers, `null` for
    /// absent values.
    pub fn json(&self) -> String {
        let s = |v: &str| {
            if v.is_empty() {
                Value::Null
            } else {
                Value::from(v)
            }
        };
        let addr = |a: Option<SocketAddr>| a.map_or(Value::Null, |a| Value::from(a.to_string()));
        let line = json!({
            "start_time": timestamp(self.start),
            "route_name": s(&self.route_name),
            "method": s(&self.method),
            "path": s(&self.path),
            "protocol": s(self.protocol),
            "response_code": self.status,
            "response_flags": s(&self.flags),
            "response_code_details": self.details.as_deref(),
            "connection_termination_details": s(&self.termination_details),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            "upstream_service_time": self.upstream_service_time.map(|t| t.to_string()),
            "x_forwarded_for": s(&self.forwarded_for),
            "user_agent": s(&self.user_agent),
            "request_id": s(&self.request_id),
            "authority": s(&self.authority),
            "upstream_host": s(&self.upstream_host),
            "upstream_cluster": s(&self.upstream_cluster),
            "upstream_local_address": addr(self.upstream_local),
            "downstream_local_address": addr(self.downstream_local),
            "downstream_remote_address": addr(self.downstream_remote),
            "requested_server_name": s(&self.server_name),
            "upstream_transport_failure_reason": s(&self.transport_failure),
        });
        let mut out = line.to_string();
        out.push('\n');
        out
    }
}

impl Default for Entry {
    fn default() -> Self {
        Self::new()
    }
}

/// Envoy's `%PROTOCOL%` of an HTTP version.
pub fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// One proxied connection, as the log shows it.
pub struct TcpEntry<'a> {
    pub cluster: &'a str,
    pub endpoint: &'a str,
    pub flags: &'a str,
    pub received: u64,
    pub sent: u64,
    pub duration: Duration,
    pub sni: &'a str,
}

enum Message {
    Line(Box<Entry>),
    Sink(Option<Box<dyn Write + Send>>, Encoding),
    Flush(SyncSender<()>),
}

/// Where the lines go (`--access-log`): nowhere, stdout, or a file appended to.
#[derive(Default)]
pub struct AccessLog {
    on: AtomicBool,
    writer: OnceLock<SyncSender<Message>>,
}

/// A sink chosen by `--access-log` and `--access-log-encoding`, not yet in use.
pub struct Opened {
    sink: Option<Box<dyn Write + Send>>,
    encoding: Encoding,
}

impl AccessLog {
    /// `off`, `stdout`, or a file path to append to. `/dev/stdout` and `/dev/stderr`
    /// (Istio's usual `accessLogFile`) are the process's own streams, not reopened: a proxy
    /// running under another user may not open the descriptor it was handed.
    pub fn open(spec: &str, encoding: Encoding) -> std::io::Result<Opened> {
        let sink: Option<Box<dyn Write + Send>> = match spec {
            "off" => None,
            "stdout" | "/dev/stdout" => Some(Box::new(std::io::stdout())),
            "/dev/stderr" => Some(Box::new(std::io::stderr())),
            file => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)?,
            )),
        };
        Ok(Opened { sink, encoding })
    }

    /// Uses `opened`'s sink from now on.
    pub fn replace(&self, opened: Opened) {
        let on = opened.sink.is_some();
        if on || self.writer.get().is_some() {
            let _ = self
                .writer()
                .send(Message::Sink(opened.sink, opened.encoding));
        }
        self.on.store(on, Ordering::Release);
    }

    /// Whether lines are written: callers skip building entries when not.
    pub fn enabled(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Queues a line.
    pub fn log(&self, entry: Entry) {
        if self.enabled() {
            let _ = self.writer().send(Message::Line(Box::new(entry)));
        }
    }

    /// Queues a connection's line (Envoy's TCP proxy logs in the same format).
    pub fn tcp(&self, c: &TcpEntry<'_>) {
        if self.enabled() {
            self.log(Entry {
                start: SystemTime::now()
                    .checked_sub(c.duration)
                    .unwrap_or_else(SystemTime::now),
                flags: c.flags.to_owned(),
                bytes_received: c.received,
                bytes_sent: c.sent,
                duration: c.duration,
                upstream_host: c.endpoint.to_owned(),
                upstream_cluster: c.cluster.to_owned(),
                server_name: c.sni.to_owned(),
                ..Entry::new()
            });
        }
    }

    /// Waits until every line queued so far is written and flushed.
    pub fn flush(&self) {
        if let Some(writer) = self.writer.get() {
            let (tx, rx) = sync_channel(1);
            if writer.send(Message::Flush(tx)).is_ok() {
                let _ = rx.recv_timeout(Duration::from_secs(5));
            }
        }
    }

    fn writer(&self) -> &SyncSender<Message> {
        self.writer.get_or_init(|| {
            let (tx, rx) = sync_channel(QUEUE);
            // Without a thread the log stays off; `log` sends fail and are dropped.
            let _ = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&rx));
            tx
        })
    }
}

/// The writer thread: writes what is queued, flushing whenever the queue is empty.
fn write_lines(rx: &Receiver<Message>) {
    let mut sink: Option<std::io::BufWriter<Box<dyn Write + Send>>> = None;
    let mut encoding = Encoding::Text;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(entry) => {
                    if let Some(out) = sink.as_mut() {
                        let line = match encoding {
                            Encoding::Text => entry.text(),
                            Encoding::Json => entry.json(),
                        };
                        let _ = out.write_all(line.as_bytes());
                    }
                }
                Message::Sink(new, e) => {
                    if let Some(mut old) = sink.take() {
                        let _ = old.flush();
                    }
                    sink = new.map(std::io::BufWriter::new);
                    encoding = e;
                }
                Message::Flush(done) => {
                    if let Some(out) = sink.as_mut() {
                        let _ = out.flush();
                    }
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        if let Some(out) = sink.as_mut() {
            let _ = out.flush();
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds, as Envoy's `%START_TIME%`.
pub(super) fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn a_tcp_connection_prints_as_envoy_prints_it() {
        let mut e = Entry::new();
        e.start = SystemTime::UNIX_EPOCH;
        e.bytes_received = 5;
        e.bytes_sent = 7;
        e.upstream_cluster = "outbound|3306||db.default.svc.cluster.local".into();
        let line = e.text();
        assert!(
            line.starts_with("[1970-01-01T00:00:00.000Z] \"- - -\" 0 - - - \"-\" 5 7 0 - "),
            "{line}"
        );
        let v: Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(v["response_code"], 0);
        assert_eq!(v["method"], Value::Null);
        assert_eq!(v["bytes_sent"], 7);
    }
}
