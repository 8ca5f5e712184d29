//! The connection write buffer (vendored pingora-core, patch 5: `CoalescingWriter`): an
//! answer's header and a body too large for the buffer leave in one vectored write, not two
//! (issue 16: the header's own `sendto` was a fifth of a 64 KiB hit's cost), and whatever the
//! socket accepts per call, every byte arrives once and in order.

use pingora::protocols::l4::coalesce::CoalescingWriter;
use proptest::prelude::*;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;

/// A socket that records each call and accepts at most `per_call` bytes of it, or refuses
/// (`Pending`) every `refuse_every`-th call.
#[derive(Default)]
struct Socket {
    calls: Vec<Vec<u8>>,
    per_call: usize,
    refuse_every: usize,
    polls: usize,
    flushes: usize,
}

impl Socket {
    fn accepting(per_call: usize) -> Self {
        Socket {
            per_call,
            ..Socket::default()
        }
    }

    fn received(&self) -> Vec<u8> {
        self.calls.concat()
    }

    fn take(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.polls += 1;
        if self.refuse_every > 0 && self.polls.is_multiple_of(self.refuse_every) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut call = Vec::new();
        for b in bufs {
            let room = self.per_call - call.len();
            call.extend_from_slice(&b[..b.len().min(room)]);
        }
        let n = call.len();
        self.calls.push(call);
        Poll::Ready(Ok(n))
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().take(cx, &[IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().take(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().flushes += 1;
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Pingora's write buffer size (`DEFAULT_L4_WRITE_BUFFER_SIZE`).
const CAPACITY: usize = 1460;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
}

/// What pingora's HTTP/1 writer does for a hit: the header, then the body, then a flush.
fn answer(socket: Socket, head: &[u8], body: &[u8]) -> Socket {
    runtime().block_on(async {
        let mut w = CoalescingWriter::with_capacity(CAPACITY, socket);
        w.write_all(head).await.expect("head");
        w.write_all(body).await.expect("body");
        w.flush().await.expect("flush");
        w.into_inner()
    })
}

#[test]
fn a_header_and_a_large_body_leave_in_one_call() {
    let head = vec![b'h'; 420];
    let body = vec![b'b'; 64 * 1024];
    let socket = answer(Socket::accepting(usize::MAX), &head, &body);
    assert_eq!(socket.calls.len(), 1, "one write for header and body");
    assert_eq!(socket.received(), [head, body].concat());
}

#[test]
fn a_header_and_a_body_that_together_overflow_the_buffer_leave_in_one_call() {
    // A hit's header (stored fields, `Age`, `Cache-Status`) and a 1 KiB body: more than the
    // buffer holds together, each less than it. tokio's `BufWriter` sent the header on its
    // own, then held the body until the flush: two calls.
    let head = vec![b'h'; 520];
    let body = vec![b'b'; 1024];
    let socket = answer(Socket::accepting(usize::MAX), &head, &body);
    assert_eq!(socket.calls.len(), 1, "one write for header and body");
    assert_eq!(socket.received(), [head, body].concat());
}

#[test]
fn small_writes_are_held_until_the_flush() {
    let socket = answer(
        Socket::accepting(usize::MAX),
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"hello",
    );
    assert_eq!(socket.calls, vec![b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec()]);
    assert_eq!(socket.flushes, 1, "the flush reaches the socket");
}

#[test]
fn a_socket_that_takes_a_little_at_a_time_still_gets_every_byte_once() {
    let head = vec![b'h'; 700];
    let body: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    let socket = answer(Socket::accepting(100), &head, &body);
    assert_eq!(socket.received(), [head, body].concat());
    assert!(socket.calls.iter().all(|c| c.len() <= 100));
}

#[test]
fn zero_capacity_writes_straight_through() {
    runtime().block_on(async {
        let mut w = CoalescingWriter::with_capacity(0, Socket::accepting(usize::MAX));
        w.write_all(b"one").await.expect("write");
        w.write_all(b"two").await.expect("write");
        assert!(w.buffer().is_empty());
        let socket = w.into_inner();
        assert_eq!(socket.calls, vec![b"one".to_vec(), b"two".to_vec()]);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any sequence of writes (plain or vectored, flushed now and then), over a socket that
    /// takes any amount per call and sometimes none: the socket receives exactly the bytes
    /// written, in order, and nothing is left held after a flush.
    #[test]
    fn every_byte_arrives_once_and_in_order(
        writes in prop::collection::vec(
            (prop::collection::vec(0usize..4000, 1..4), any::<bool>(), any::<bool>()),
            1..24,
        ),
        capacity in prop_oneof![Just(0usize), 1usize..64, Just(CAPACITY)],
        per_call in 1usize..5000,
        refuse_every in prop_oneof![Just(0usize), 2usize..7],
    ) {
        let mut expected = Vec::new();
        let mut next = 0u8;
        let mut chunks = |sizes: &[usize]| -> Vec<Vec<u8>> {
            sizes.iter().map(|&n| (0..n).map(|_| { next = next.wrapping_add(1); next }).collect()).collect()
        };
        let plan: Vec<(Vec<Vec<u8>>, bool, bool)> =
            writes.iter().map(|(sizes, vectored, flush)| (chunks(sizes), *vectored, *flush)).collect();
        for (parts, _, _) in &plan {
            for p in parts {
                expected.extend_from_slice(p);
            }
        }
        let socket = Socket { per_call, refuse_every, ..Socket::default() };
        let socket = runtime().block_on(async {
            let mut w = CoalescingWriter::with_capacity(capacity, socket);
            for (parts, vectored, flush) in &plan {
                if *vectored {
                    // A vectored write may take part of the slices: go on from where it stopped.
                    let total: usize = parts.iter().map(Vec::len).sum();
                    let mut at = 0;
                    while at < total {
                        let mut left = Vec::new();
                        let mut skip = at;
                        for p in parts {
                            if skip >= p.len() { skip -= p.len(); continue; }
                            left.push(IoSlice::new(&p[skip..]));
                            skip = 0;
                        }
                        let n = w.write_vectored(&left).await.expect("write");
                        assert!(n > 0, "a write of bytes reports some written");
                        at += n;
                    }
                } else {
                    for p in parts {
                        w.write_all(p).await.expect("write");
                    }
                }
                if *flush {
                    w.flush().await.expect("flush");
                    assert!(w.buffer().is_empty(), "nothing held after a flush");
                }
            }
            w.flush().await.expect("flush");
            assert!(w.buffer().is_empty());
            w.into_inner()
        });
        prop_assert_eq!(socket.received(), expected);
        prop_assert!(socket.calls.iter().all(|c| c.len() <= per_call));
    }
}
