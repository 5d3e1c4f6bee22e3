//! The access log: a line per request and per connection, to stdout or a file.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// Where the lines go (`--access-log`): nowhere, stdout, or a file appended to.
#[derive(Default)]
pub struct AccessLog {
    sink: Mutex<Option<Box<dyn Write + Send>>>,
}

/// One HTTP request, as the log shows it.
pub struct HttpEntry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub https: bool,
    pub status: u16,
    pub flags: &'a str,
    pub cluster: &'a str,
    pub request_id: &'a str,
    pub duration: Duration,
    pub authority: &'a str,
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

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

impl AccessLog {
    /// `off`, `stdout`, or a file path to append to.
    pub fn open(spec: &str) -> std::io::Result<Self> {
        let sink: Option<Box<dyn Write + Send>> = match spec {
            "off" => None,
            "stdout" => Some(Box::new(std::io::stdout())),
            file => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)?,
            )),
        };
        Ok(Self {
            sink: Mutex::new(sink),
        })
    }

    /// Uses `other`'s sink from now on.
    pub fn replace(&self, other: Self) {
        let sink = other
            .sink
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = sink;
    }

    fn write(&self, line: impl FnOnce() -> String) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(out) = sink.as_mut() {
            let _ = out.write_all(line().as_bytes());
            let _ = out.flush();
        }
    }

    /// Envoy's default format, with the fields a proxy here knows.
    pub fn http(&self, e: &HttpEntry<'_>) {
        self.write(|| {
            format!(
                "[{}] \"{} {} {}\" {} {} {} \"{}\" {}ms \"{}\"\n",
                httpdate(SystemTime::now()),
                e.method,
                e.path,
                if e.https { "HTTPS/1.1" } else { "HTTP/1.1" },
                e.status,
                or_dash(e.flags),
                or_dash(e.cluster),
                e.request_id,
                e.duration.as_millis(),
                e.authority,
            )
        });
    }

    pub fn tcp(&self, e: &TcpEntry<'_>) {
        self.write(|| {
            format!(
                "[{}] TCP {} {} {} {} {} {}ms \"{}\"\n",
                httpdate(SystemTime::now()),
                or_dash(e.cluster),
                or_dash(e.endpoint),
                or_dash(e.flags),
                e.received,
                e.sent,
                e.duration.as_millis(),
                e.sni,
            )
        });
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub(super) fn httpdate(t: SystemTime) -> String {
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
        assert_eq!(httpdate(t), "2000-02-29T00:00:00.123Z");
    }
}
