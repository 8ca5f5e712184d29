//! Aisle patch 5: the L4 write buffer, sending what it holds together with the write that
//! overflows it.
//!
//! Pingora buffers a connection's small writes (an HTTP/1 response header, a small body) in a
//! write buffer of about one MSS, flushed when the response ends. tokio's `BufWriter`, which did
//! that job, handles a write larger than the room left by first flushing the buffer on its own
//! and then writing the large piece: an answer whose header and body together overflow the
//! buffer (a 1 KiB cache hit with its ~500-byte header; any 64 KiB body) went out in two
//! `sendto` calls, the header and then the body. On loopback each
//! call costs a full trip through the TCP stack and a wake-up of the reader: in a profile of a
//! 64 KiB cache hit the header's own call was 21% of the gateway's time, the body's 38%.
//! [`CoalescingWriter`] writes the held bytes and the new ones in one vectored call instead
//! (`writev`), as nginx does with its chain of buffers. Everything else is `BufWriter`'s
//! behaviour: a write that fits is held, a write at least the capacity with nothing held goes
//! straight through, a zero capacity writes everything straight through, and `flush` and
//! `shutdown` send what is held first.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most slices one vectored write passes on (the held bytes and the caller's), well below
/// any system's `IOV_MAX`.
const MAX_SLICES: usize = 64;

/// The error of a socket that took none of the held bytes (as `BufWriter` reports it).
fn write_zero() -> io::Error {
    io::Error::new(
        io::ErrorKind::WriteZero,
        "failed to write the buffered data",
    )
}

/// A write buffer over `W` that coalesces its content with an overflowing write (see the module
/// comment). Reads pass through to `W`.
#[derive(Debug)]
pub struct CoalescingWriter<W> {
    inner: W,
    /// Held bytes; those before `written` have already been sent. Once all are sent it is
    /// emptied ([`Self::consumed`]), so nothing pending means an empty buffer.
    buf: Vec<u8>,
    written: usize,
    capacity: usize,
}

impl<W: AsyncWrite + Unpin> CoalescingWriter<W> {
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        CoalescingWriter {
            inner,
            buf: Vec::with_capacity(capacity),
            written: 0,
            capacity,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The stream under the buffer. Bytes still held are lost, as with `BufWriter`.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Bytes held and not yet sent.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Notes that `n` bytes of what was offered were written: the held bytes first. Returns
    /// how many of the caller's bytes that includes.
    fn consumed(&mut self, n: usize) -> usize {
        let pending = self.pending();
        if n < pending {
            self.written += n;
            0
        } else {
            self.buf.clear();
            self.written = 0;
            n - pending
        }
    }

    /// Holds `bufs` (which fit).
    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        if self.written > 0 {
            // After a partial send: move the rest to the front so the buffer keeps its size.
            self.buf.drain(..self.written);
            self.written = 0;
        }
        let mut n = 0;
        for b in bufs {
            self.buf.extend_from_slice(b);
            n += b.len();
        }
        n
    }

    /// Sends everything held.
    fn poll_flush_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() > 0 {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            self.consumed(n);
        }
        Poll::Ready(Ok(()))
    }

    /// One write of `bufs`: held, sent straight through, or sent after the held bytes in the
    /// same call.
    fn write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().fold(0usize, |n, b| n.saturating_add(b.len()));
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let pending = self.pending();
        if pending.saturating_add(total) <= self.capacity && total < self.capacity {
            return Poll::Ready(Ok(self.hold(bufs)));
        }
        if pending == 0 {
            // Nothing held: a write this large goes straight through (a single slice as a
            // plain write, as `BufWriter` sent it: `send`, not `writev`).
            return match bufs {
                [one] => Pin::new(&mut self.inner).poll_write(cx, one),
                _ => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
            };
        }
        // The held bytes and as many of the caller's slices as one call takes, together.
        loop {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                slices[0] = IoSlice::new(&self.buf[self.written..]);
                let mut count = 1;
                for b in bufs.iter().filter(|b| !b.is_empty()).take(MAX_SLICES - 1) {
                    slices[count] = IoSlice::new(b);
                    count += 1;
                }
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            let own = self.consumed(n);
            if own > 0 {
                return Poll::Ready(Ok(own));
            }
            if self.pending() == 0 {
                // Exactly the held bytes went: the caller's go on their own (or are held).
                return self.write_slices(cx, bufs);
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CoalescingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_buf(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_buf(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for CoalescingWriter<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}
