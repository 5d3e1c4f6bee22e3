//! The request-header deadline of a new connection: a client that has not finished its
//! first request's headers in time gets Envoy's `408 Request Timeout` and is disconnected.
//! (Later requests on a kept-alive connection are bounded by the HTTP server itself.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

const TIMEOUT_REPLY: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

pub struct HeaderDeadline<S> {
    inner: S,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Last bytes seen, to find the end of the headers across reads.
    tail: [u8; 3],
}

impl<S> HeaderDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            sleep: Some(Box::pin(tokio::time::sleep(timeout))),
            tail: [0; 3],
        }
    }
}

/// Whether `data`, after `tail`, contains the blank line that ends the headers.
fn ends_headers(tail: &mut [u8; 3], data: &[u8]) -> bool {
    let mut window = *tail;
    for &b in data {
        if window == *b"\r\n\r" && b == b'\n' {
            return true;
        }
        window = [window[1], window[2], b];
    }
    *tail = window;
    false
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeaderDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                // Best effort: the reply fits any socket buffer; then end the stream.
                let _ = Pin::new(&mut this.inner).poll_write(cx, TIMEOUT_REPLY);
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                this.sleep = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request headers not received in time",
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.sleep.is_some() {
            if let Poll::Ready(Ok(())) = &result {
                if ends_headers(&mut this.tail, &buf.filled()[before..]) {
                    this.sleep = None;
                }
            }
        }
        result
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::ends_headers;

    #[test]
    fn finds_the_blank_line_across_reads() {
        let mut tail = [0; 3];
        assert!(!ends_headers(&mut tail, b"GET / HTTP/1.1\r\nhost: a\r"));
        assert!(!ends_headers(&mut tail, b"\n\r"));
        assert!(ends_headers(&mut tail, b"\n"));
        let mut tail = [0; 3];
        assert!(ends_headers(&mut tail, b"GET / HTTP/1.1\r\n\r\n"));
    }
}
