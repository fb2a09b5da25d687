//! One client connection's socket, driven by a single task.
//!
//! [`Conn::poll_io`] does everything the socket needs in one poll: it
//! takes whatever frames were queued for the client (all of them, under
//! one short lock) and writes them with one vectored write, fires the
//! heartbeat tick, and reads whatever arrived. It only ever *tries*, so the
//! task can keep writing while it waits for something else (a worker with
//! room for the client's message), and a client that stops reading can
//! never pin it.
//!
//! A plain TCP connection shares its socket with its queue: a worker link
//! that fanned frames out writes them straight to the socket while this
//! task has nothing of its own to write ([`crate::hub::FlushList`]), and
//! hands it whatever the socket did not take, the partly written frame
//! first. The queue's `task_writing` flag keeps the two from ever writing
//! at once.
//!
//! An idle connection keeps no buffers: reads go through a per-thread
//! scratch buffer and only an incomplete frame is kept; the outgoing deque
//! is dropped once it has been written out.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::tls::ClientStream;
use crate::hub::ClientSender;
use crate::metrics::Metrics;

/// Bytes read per `read` call into the scratch buffer.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Where reads land before the bytes are appended to a connection's
    /// `rbuf`: one per thread, zeroed once (a plain socket is read through
    /// a shared reference, which wants initialised memory).
    static READ_SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}
/// Frames handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// A written-out deque larger than this is dropped rather than kept.
const KEEP_OUT_CAPACITY: usize = 16;

/// What [`Conn::poll_io`] saw.
#[derive(Debug)]
pub(crate) enum IoEvent {
    /// Bytes were appended to [`Conn::rbuf`].
    Read,
    /// The client closed its side.
    Eof,
    /// Someone asked for the connection to close with this code.
    Closed(u16),
    /// The socket failed.
    Failed(io::Error),
    /// A heartbeat interval passed.
    Tick,
}

pub(crate) struct Conn {
    stream: ClientStream,
    pub(crate) shared: ClientSender,
    metrics: Arc<Metrics>,
    /// Received bytes not yet decoded: empty (and unallocated) between
    /// messages.
    pub(crate) rbuf: BytesMut,
    /// Frames being written; the front one may be partly written.
    out: VecDeque<Bytes>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Boxed: only connections with heartbeats pay for the timer.
    tick: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl Conn {
    pub(crate) fn new(
        stream: ClientStream,
        shared: ClientSender,
        metrics: Arc<Metrics>,
        leftover: Vec<u8>,
        ping_every: Option<Duration>,
    ) -> Self {
        if let ClientStream::Plain(socket) = &stream {
            shared.set_socket(Some(socket.clone()));
        }
        Conn {
            stream,
            shared,
            metrics,
            rbuf: BytesMut::from(&leftover[..]),
            out: VecDeque::new(),
            written: 0,
            tick: ping_every.map(|every| (Box::pin(tokio::time::sleep(every)), every)),
        }
    }

    /// Queues a frame of our own (pong, ping, close) behind what is
    /// already being written and queued (the queue's first frame may be
    /// partly written by a flush: it must be finished first).
    pub(crate) fn send_control(&mut self, frame: Bytes) {
        if self.out.is_empty() {
            self.take_queued();
        }
        self.out.push_back(frame);
        self.shared.set_task_writing();
    }

    /// Gives back buffers an idle connection does not need.
    pub(crate) fn release_idle_buffers(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }

    /// Writes, ticks and (when `read` says so, with a hint of how many
    /// bytes the frame in progress still needs) reads.
    pub(crate) fn poll_io(&mut self, cx: &mut Context<'_>, read: Option<usize>) -> Poll<IoEvent> {
        self.shared.register(cx.waker());
        if let Some(code) = self.shared.close_code() {
            return Poll::Ready(IoEvent::Closed(code));
        }
        if let Poll::Ready(Err(e)) = self.poll_write_out(cx, true) {
            return Poll::Ready(IoEvent::Failed(e));
        }
        if let Some((sleep, every)) = self.tick.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                let next = Instant::now() + *every;
                sleep.as_mut().reset(next);
                return Poll::Ready(IoEvent::Tick);
            }
        }
        if let Some(want) = read {
            return match self.poll_read(cx, want) {
                Poll::Ready(Ok(0)) => Poll::Ready(IoEvent::Eof),
                Poll::Ready(Ok(_)) => Poll::Ready(IoEvent::Read),
                Poll::Ready(Err(e)) => Poll::Ready(IoEvent::Failed(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        Poll::Pending
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if want > READ_CHUNK {
            // A large frame: read straight into a buffer sized once.
            self.rbuf.reserve(want);
            return tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf);
        }
        READ_SCRATCH.with_borrow_mut(|chunk| {
            let mut buf = ReadBuf::new(chunk);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.rbuf.extend_from_slice(buf.filled());
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// Writes `out` until it is empty (`Ready(Ok)`) or the socket is full.
    /// With `take`, an empty `out` is refilled from the client's queue (so
    /// the queue's limits bound what waits) and written too, a few rounds at
    /// most before yielding to other tasks.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, take: bool) -> Poll<io::Result<()>> {
        // Whether the client's queue was seen empty (then a later push
        // wakes us) rather than the rounds running out.
        let mut queue_empty = !take;
        for _ in 0..4 {
            if take && self.out.is_empty() && self.take_queued() == 0 {
                queue_empty = true;
                break;
            }
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (i, frame) in self.out.iter().take(MAX_IOVECS).enumerate() {
                    let from = if i == 0 { self.written } else { 0 };
                    slices[i] = IoSlice::new(&frame[from..]);
                    count += 1;
                }
                let n = match Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                self.advance(n);
            }
            if !take {
                break;
            }
        }
        if !queue_empty {
            // Maybe more: come back after others had a turn (a push will
            // not wake us, the queue may not have been empty).
            cx.waker().wake_by_ref();
        }
        if self.out.capacity() > KEEP_OUT_CAPACITY {
            self.out = VecDeque::new();
        }
        // TLS buffers inside the session; TCP's flush is a no-op.
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Moves the client's queue into `out`, counting it as sent; returns
    /// how many frames it held.
    fn take_queued(&mut self) -> usize {
        let was_empty = self.out.is_empty();
        let (frames, bytes, front_written) = self.shared.take(&mut self.out);
        if front_written > 0 {
            // A flush wrote part of the first frame; only possible while
            // this task had nothing of its own to write.
            debug_assert!(was_empty, "a flush wrote while the task was writing");
            self.written = front_written;
        }
        if frames > 0 {
            self.metrics
                .messages_out
                .fetch_add(frames as u64, Ordering::Relaxed);
            self.metrics
                .bytes_out
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
        frames
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.out.front().expect("wrote more than was queued").len() - self.written;
            if n < front {
                self.written += n;
                return;
            }
            n -= front;
            self.written = 0;
            self.out.pop_front();
        }
    }

    /// Waits for `fut` while keeping the socket's writes and heartbeats
    /// going (reads pause: that is the back-pressure). Gives `fut` back if
    /// the connection must end first, with the event that ended it.
    pub(crate) async fn wait_with_io<F: Future + Unpin>(
        &mut self,
        mut fut: F,
    ) -> Result<F::Output, (IoEvent, F)> {
        let mut ended = None;
        let out = poll_fn(|cx| {
            if let Poll::Ready(v) = Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(v));
            }
            // Anything the socket reports (a tick too: heartbeats are the
            // caller's) goes back with the future.
            match self.poll_io(cx, None) {
                Poll::Ready(ev) => {
                    ended = Some(ev);
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match out {
            Some(v) => Ok(v),
            None => Err((ended.expect("set when not ready"), fut)),
        }
    }

    /// The close: what was queued (unless `skip_queue`), then the close
    /// frame if any, then a half-close. Bounded by `limit`.
    pub(crate) async fn finish(
        &mut self,
        skip_queue: bool,
        close_frame: Option<Bytes>,
        limit: Duration,
    ) {
        // From here only this task writes.
        self.shared.set_socket(None);
        if skip_queue {
            // A partly written frame must still be completed.
            let keep = usize::from(self.written > 0);
            self.out.truncate(keep);
            if self.out.is_empty() {
                if let Some((frame, written)) = self.shared.take_partial() {
                    self.out.push_back(frame);
                    self.written = written;
                }
            }
        }
        let _ = tokio::time::timeout(limit, async {
            if !skip_queue {
                self.take_queued();
            }
            if let Some(f) = close_frame {
                self.out.push_back(f);
            }
            if poll_fn(|cx| self.poll_write_out(cx, false)).await.is_err() {
                return;
            }
            let _ = poll_fn(|cx| Pin::new(&mut self.stream).poll_shutdown(cx)).await;
        })
        .await;
    }

    /// After [`Self::finish`]: reads until the client closes too, so that an
    /// unread byte of theirs cannot turn our close into a reset that would
    /// discard what we wrote. Bounded by `limit`.
    pub(crate) async fn linger(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                self.rbuf.clear();
                match poll_fn(|cx| self.poll_read(cx, 0)).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}
