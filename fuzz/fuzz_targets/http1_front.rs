//! Any bytes as an HTTP/1 client's side of a connection to a running `meshroute run` gateway
//! (request lines, headers, chunked bodies, pipelined requests): the gateway answers or
//! closes every connection in bounded time and keeps serving well-formed requests.
//!
//! The gateway is another process (started by `scripts/fuzz.sh`, its address in
//! `MESHROUTE_FUZZ_FRONT`), so this target is black-box: libFuzzer's coverage is the
//! client's, and the gateway's health after each input is the oracle.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;

/// How long the gateway may take to finish with one input's connection.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn front() -> SocketAddr {
    static FRONT: OnceLock<SocketAddr> = OnceLock::new();
    *FRONT.get_or_init(|| {
        std::env::var("MESHROUTE_FUZZ_FRONT")
            .ok()
            .and_then(|a| a.parse().ok())
            .expect("MESHROUTE_FUZZ_FRONT names the gateway's address (ip:port)")
    })
}

fn connect() -> TcpStream {
    let stream = TcpStream::connect_timeout(&front(), Duration::from_secs(2))
        .expect("the gateway no longer accepts connections");
    stream
        .set_read_timeout(Some(ANSWER_WITHIN))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(ANSWER_WITHIN))
        .expect("write timeout");
    stream
}

/// Reads until the gateway closes the connection; `false` if it neither closed nor reset
/// it in time.
fn read_to_close(stream: &mut TcpStream, answer: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + ANSWER_WITHIN;
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if answer.len() < 1 << 20 {
                    answer.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            // A reset is an answer too (a connection refused as malformed).
            Err(_) => return true,
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let mut stream = connect();
    // The gateway may close before reading everything (a malformed request line): a write
    // error then is the gateway's answer, not a failure.
    let _ = stream.write_all(data);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    assert!(
        read_to_close(&mut stream, &mut answer),
        "the connection was neither answered to its end nor closed within {ANSWER_WITHIN:?}"
    );
    // Every answer the gateway writes to an HTTP/1 client is HTTP/1 (a client that opens
    // with HTTP/2's preface is answered in HTTP/2).
    if !answer.is_empty() && !data.starts_with(b"PRI ") {
        assert!(
            answer.starts_with(b"HTTP/1."),
            "not an HTTP/1 answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    // And the gateway still routes a well-formed request.
    let mut probe = connect();
    probe
        .write_all(b"GET /v1 HTTP/1.1\r\nhost: fuzz.example\r\nconnection: close\r\n\r\n")
        .expect("probe request");
    let mut reply = Vec::new();
    assert!(read_to_close(&mut probe, &mut reply), "the probe hung");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "the gateway stopped routing: {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
});
