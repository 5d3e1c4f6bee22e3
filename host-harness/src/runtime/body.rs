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

use super::{full, Body};

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
/// when the last frame has gone or the body is dropped (the client went away).
pub fn on_end(inner: Body, done: impl FnOnce(u64) + Send + Sync + 'static) -> Body {
    Counted {
        inner,
        sent: 0,
        done: Some(Box::new(done)),
    }
    .boxed()
}

type Done = Box<dyn FnOnce(u64) + Send + Sync>;

struct Counted {
    inner: Body,
    sent: u64,
    done: Option<Done>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.sent);
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
        }
        polled
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
        self.finish();
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

/// The bytes already read, then the rest of the downstream body.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Incoming,
    received: Arc<AtomicU64>,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
        polled
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
