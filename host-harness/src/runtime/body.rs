//! Request bodies: small ones buffered (the filter sees them, retries resend them), large
//! ones streamed upstream as they arrive.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::future::Future;

use super::{full, Body};

/// Why a body stopped before its end.
#[derive(Debug)]
pub enum BodyError {
    /// The peer's side of it failed: the connection closed early or reset, or the framing
    /// was malformed.
    Peer(hyper::Error),
    /// The route timeout expired while the response was still arriving.
    RouteTimeout,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Peer(e) => e.fmt(f),
            Self::RouteTimeout => f.write_str("route timeout expired"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Peer(e) => Some(e),
            Self::RouteTimeout => None,
        }
    }
}

/// Envoy's response flags and code details for a response whose body broke off so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutShort {
    pub flags: &'static str,
    pub details: &'static str,
}

impl BodyError {
    /// What Envoy logs for an upstream response cut short by this: a close before the
    /// promised length is a protocol error (UPE), any other failure a termination (UC).
    pub fn cut_short(&self) -> CutShort {
        match self {
            Self::RouteTimeout => CutShort {
                flags: "UT",
                details: "response_timeout",
            },
            Self::Peer(e) if closed_early(e) => CutShort {
                flags: "UPE",
                details: "upstream_reset_after_response_started{protocol_error}",
            },
            Self::Peer(_) => CutShort {
                flags: "UC",
                details: "upstream_reset_after_response_started{connection_termination}",
            },
        }
    }
}

/// The I/O error under a hyper error, if one is.
fn io_error_kind(e: &hyper::Error) -> Option<std::io::ErrorKind> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = c.source();
    }
    None
}

/// Whether the peer closed its side before the message's promised end.
pub fn closed_early(e: &hyper::Error) -> bool {
    e.is_incomplete_message() || io_error_kind(e) == Some(std::io::ErrorKind::UnexpectedEof)
}

/// Whether a body failed on its framing (a malformed chunk), not on its connection.
pub fn malformed(e: &hyper::Error) -> bool {
    e.is_parse() || io_error_kind(e) == Some(std::io::ErrorKind::InvalidData)
}

/// An upstream body, its errors as [`BodyError`]s.
pub fn from_peer<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    body.map_err(BodyError::Peer).boxed()
}

/// A response body that fails with [`BodyError::RouteTimeout`] if it has not ended by
/// `deadline` (Envoy's route timeout covers the whole response, not only its headers).
pub fn until(inner: Body, deadline: tokio::time::Instant) -> Body {
    Bounded {
        inner,
        expiry: Box::pin(tokio::time::sleep_until(deadline)),
    }
    .boxed()
}

struct Bounded {
    inner: Body,
    expiry: Pin<Box<tokio::time::Sleep>>,
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => match self.expiry.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::RouteTimeout))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps `permit` (a connection of a capped pool) until it is read or
/// dropped.
pub fn holding(inner: Body, permit: tokio::sync::OwnedSemaphorePermit) -> Body {
    Held {
        inner,
        _permit: permit,
    }
    .boxed()
}

struct Held {
    inner: Body,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts the bytes it passes and calls `done` with the count once,
/// when the last frame has gone, the body failed (with how it broke off) or the body is
/// dropped (the client went away).
pub fn on_end(
    inner: Body,
    done: impl FnOnce(u64, Option<CutShort>) + Send + Sync + 'static,
) -> Body {
    Counted {
        inner,
        sent: 0,
        done: Some(Box::new(done)),
        failed: None,
    }
    .boxed()
}

type Done = Box<dyn FnOnce(u64, Option<CutShort>) + Send + Sync>;

struct Counted {
    inner: Body,
    sent: u64,
    done: Option<Done>,
    /// The body's failure, held back for one poll so that what was already sent is
    /// written before the connection is aborted (Envoy sends what it has, then resets).
    failed: Option<BodyError>,
}

impl Counted {
    fn finish(&mut self, cut: Option<CutShort>) {
        if let Some(done) = self.done.take() {
            done(self.sent, cut);
        }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(e) = self.failed.take() {
            let cut = e.cut_short();
            self.finish(Some(cut));
            return Poll::Ready(Some(Err(e)));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // Pending lets the connection flush; the next poll returns the failure.
                self.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish(None);
    }
}

pub enum RequestBody {
    Buffered(Bytes),
    /// Taken by the first attempt.
    Streamed(Option<Body>),
}

impl RequestBody {
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Buffered(b) if b.is_empty())
    }

    pub fn buffered(&self) -> Option<&Bytes> {
        match self {
            Self::Buffered(b) => Some(b),
            Self::Streamed(_) => None,
        }
    }

    pub fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for one upstream attempt.
    pub fn for_attempt(&mut self) -> Body {
        match self {
            Self::Buffered(b) => full(b.clone()),
            Self::Streamed(s) => s.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }
}

/// Reads up to `limit` bytes; a longer body continues as a stream behind what was read.
/// `received` counts the body's bytes as they arrive (Envoy's `%BYTES_RECEIVED%`).
pub async fn read_prefix(
    mut body: Incoming,
    limit: usize,
    received: Arc<AtomicU64>,
) -> Result<RequestBody, hyper::Error> {
    let mut prefix = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(RequestBody::Buffered(prefix.freeze())),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                    prefix.extend_from_slice(&data);
                }
                if prefix.len() > limit {
                    let rest = Prefixed {
                        prefix: Some(prefix.freeze()),
                        rest: body,
                        received,
                    };
                    return Ok(RequestBody::Streamed(Some(rest.boxed())));
                }
            }
        }
    }
}

/// A downstream body streamed on as it arrives, its bytes counted in `received`.
pub fn counted(body: Incoming, received: Arc<AtomicU64>) -> Body {
    Prefixed {
        prefix: None,
        rest: body,
        received,
    }
    .boxed()
}

/// The bytes already read, then the rest of the downstream body.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Incoming,
    received: Arc<AtomicU64>,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let polled = Pin::new(&mut self.rest).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled.map(|frame| frame.map(|r| r.map_err(BodyError::Peer)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        // Upper bound first: `set_lower` asserts lower <= upper.
        let mut hint = SizeHint::new();
        if let Some(u) = rest.upper() {
            hint.set_upper(u.saturating_add(extra));
        }
        hint.set_lower(
            rest.lower()
                .saturating_add(extra)
                .min(hint.upper().unwrap_or(u64::MAX)),
        );
        hint
    }
}
