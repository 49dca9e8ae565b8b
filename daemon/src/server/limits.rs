//! What one client can make the daemon hold, and for how long: the per-user connection
//! count, a stream wrapper that watches each connection's frames (length limit, a deadline
//! for a frame begun, idleness, replies the client does not take), and rate-limited log
//! lines about clients that misbehave.
//!
//! The wire format is tarpc's length-delimited frames: a 4-byte big-endian length, then that
//! many bytes of JSON. [`Watched`] follows those headers in the bytes as they are read, so
//! it knows whether a frame is under way without buffering anything itself.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When the clock of [`Activity`] started.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// The clock of [`Activity`]: milliseconds since its start, never 0 (0 stands for "not
/// set").
pub fn now_ms() -> u64 {
    u64::try_from(start().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// The tokio instant of a [`now_ms`] value.
fn instant_of(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(start() + Duration::from_millis(ms.saturating_sub(1)))
}

/// Live connections per uid, for `max_connections_per_user`.
#[derive(Default)]
pub struct Registry {
    per_uid: Mutex<HashMap<u32, Arc<User>>>,
}

/// One uid's share of the daemon: its connections, and its requests being handled on all
/// of them together.
pub struct User {
    /// Connections (changed under the registry's lock).
    conns: AtomicUsize,
    busy: AtomicUsize,
    /// The most requests of this uid handled at once (`None`: no limit).
    max_busy: Option<usize>,
    /// Connections of this uid waiting for one of its requests to end.
    waiting: Mutex<Vec<Waker>>,
}

impl User {
    fn over_budget(&self) -> bool {
        self.max_busy
            .is_some_and(|m| self.busy.load(Ordering::Relaxed) >= m)
    }

    fn wait(&self, w: &Waker) {
        let mut v = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }

    fn wake_all(&self) {
        let v = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for w in v {
            w.wake();
        }
    }
}

/// One admitted connection; dropping it gives its place back.
pub struct Slot {
    registry: Arc<Registry>,
    uid: u32,
    user: Arc<User>,
}

impl Slot {
    /// The uid's share, for the connection's [`Activity`].
    pub fn user(&self) -> Arc<User> {
        self.user.clone()
    }
}

impl Registry {
    /// Admits a connection of `uid` unless it already has `cap` (`None`: no cap for it);
    /// the uid may have `max_busy` requests handled at once. On refusal, returns how many
    /// connections it holds.
    pub fn admit(
        self: &Arc<Self>,
        uid: u32,
        cap: Option<usize>,
        max_busy: Option<usize>,
    ) -> Result<Slot, usize> {
        let mut m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        let user = m.entry(uid).or_insert_with(|| {
            Arc::new(User {
                conns: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                max_busy,
                waiting: Mutex::new(Vec::new()),
            })
        });
        let n = user.conns.load(Ordering::Relaxed);
        if cap.is_some_and(|c| n >= c) {
            return Err(n);
        }
        user.conns.store(n + 1, Ordering::Relaxed);
        Ok(Slot {
            registry: self.clone(),
            uid,
            user: user.clone(),
        })
    }

    /// Live connections of `uid`.
    #[cfg(test)]
    pub fn count(&self, uid: u32) -> usize {
        let m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&uid).map_or(0, |u| u.conns.load(Ordering::Relaxed))
    }

    /// Live connections in all.
    pub fn total(&self) -> usize {
        let m = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(|u| u.conns.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.registry.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        let left = self.user.conns.load(Ordering::Relaxed).saturating_sub(1);
        self.user.conns.store(left, Ordering::Relaxed);
        if left == 0 {
            m.remove(&self.uid);
        }
    }
}

/// What a connection has been doing, shared between its stream, its request handlers and
/// its watchdog. Times are [`now_ms`] values, 0 when not set.
#[derive(Default)]
pub struct Activity {
    /// Last time bytes arrived, a handler ended, or a reply went out.
    last_active: AtomicU64,
    /// When the first byte of the frame under way arrived.
    frame_since: AtomicU64,
    /// Since when writing a reply has made no progress (the client does not read).
    write_stalled_since: AtomicU64,
    /// Request handlers running.
    busy: AtomicUsize,
    /// The length announced by a frame over the limit, which ended the connection.
    oversize: AtomicU64,
    /// The client closed its end (read gave end-of-file).
    hung_up: std::sync::atomic::AtomicBool,
    /// Reading requests is paused (see [`Paced`]).
    paused: std::sync::atomic::AtomicBool,
    /// Woken when a paused connection may read again.
    resume: AtomicWaker,
    /// The uid's share, whose request budget the connection draws on.
    user: Option<Arc<User>>,
    /// Woken when a deadline starts that the watchdog may be sleeping past (a frame, a
    /// stalled write) and when the client hangs up.
    changed: tokio::sync::Notify,
}

/// Why a connection's watchdog closed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// Nothing in flight and nothing received for `idle_timeout`.
    Idle,
    /// A frame begun and not finished within `header_timeout`.
    Frame,
    /// A reply not taken by the client within `header_timeout`.
    Reply,
    /// The client closed the connection (requests still running are abandoned: nobody
    /// would read their replies).
    HungUp,
}

impl Activity {
    pub fn new(user: Option<Arc<User>>) -> Arc<Activity> {
        let a = Activity {
            user,
            ..Activity::default()
        };
        a.last_active.store(now_ms(), Ordering::Relaxed);
        Arc::new(a)
    }

    fn touch(&self) {
        self.last_active.store(now_ms(), Ordering::Relaxed);
    }

    /// Marks a request handler running until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        if let Some(u) = &self.user {
            u.busy.fetch_add(1, Ordering::Relaxed);
        }
        Busy(self.clone())
    }

    /// The length of the frame over the limit that ended the connection, if one did.
    pub fn oversize(&self) -> Option<u64> {
        Some(self.oversize.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// What has expired at `now` (a [`now_ms`] value), or the time of the next check.
    fn check(&self, now: u64, idle: Duration, header: Duration) -> Result<u64, Expired> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (idle, header) = (ms(idle), ms(header));
        if self.hung_up.load(Ordering::Relaxed) {
            return Err(Expired::HungUp);
        }
        // While reading is paused, a frame begun waits on us, not on the client.
        let frame = if self.paused.load(Ordering::Relaxed) {
            0
        } else {
            self.frame_since.load(Ordering::Relaxed)
        };
        let stalled = self.write_stalled_since.load(Ordering::Relaxed);
        let last = self.last_active.load(Ordering::Relaxed);
        let busy = self.busy.load(Ordering::Relaxed) > 0;
        let mut next = u64::MAX;
        for (since, limit, why) in [(frame, header, Expired::Frame), (stalled, header, Expired::Reply)] {
            if since != 0 {
                let due = since.saturating_add(limit);
                if now >= due {
                    return Err(why);
                }
                next = next.min(due);
            }
        }
        let due = last.saturating_add(idle);
        if frame == 0 && stalled == 0 && !busy && now >= due {
            return Err(Expired::Idle);
        }
        // While busy, look again an idle period later (a handler's end moves `last_active`).
        Ok(next.min(if now >= due { now.saturating_add(idle) } else { due }))
    }

    /// Resolves when the connection has been idle for `idle`, a frame or reply has taken
    /// longer than `header`, or the client has hung up. One timer per connection, re-armed
    /// only when it fires.
    pub async fn expired(&self, idle: Duration, header: Duration) -> Expired {
        loop {
            match self.check(now_ms(), idle, header) {
                Err(why) => return why,
                Ok(next) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(instant_of(next)) => {}
                        () = self.changed.notified() => {}
                    }
                }
            }
        }
    }

    /// Whether reading requests must wait: the client does not take its replies, or
    /// `max_busy` of its requests are being handled, or as many as its uid may have.
    fn must_pause(&self, max_busy: usize) -> bool {
        self.write_stalled_since.load(Ordering::Relaxed) != 0
            || self.busy.load(Ordering::Relaxed) >= max_busy
            || self.user.as_ref().is_some_and(|u| u.over_budget())
    }
}

/// A running request handler (see [`Activity::busy`]).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
        self.0.resume.wake();
        if let Some(u) = &self.0.user {
            u.busy.fetch_sub(1, Ordering::Relaxed);
            u.wake_all();
        }
    }
}

/// Where the frame parser is in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// `got` bytes of a length header read.
    Header { got: usize, bytes: [u8; 4] },
    /// This many bytes of the frame's body still to come.
    Body(u64),
}

/// A connection's stream, watched: records its [`Activity`] and fails the read that brings
/// a frame header announcing more than `max_frame` bytes.
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    max_frame: u64,
    framing: Framing,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, max_frame: usize) -> Watched<S> {
        Watched {
            inner,
            activity,
            max_frame: max_frame as u64,
            framing: Framing::Header {
                got: 0,
                bytes: [0; 4],
            },
        }
    }

    /// Follows the frames through `data`, the bytes just read.
    fn follow(&mut self, mut data: &[u8]) -> io::Result<()> {
        let now = now_ms();
        self.activity.last_active.store(now, Ordering::Relaxed);
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Body(left) => {
                    let k = (*left).min(data.len() as u64);
                    *left -= k;
                    data = &data[k as usize..];
                    if *left == 0 {
                        self.end_frame();
                    }
                }
                Framing::Header { got, bytes } => {
                    if *got == 0 {
                        self.activity.frame_since.store(now, Ordering::Relaxed);
                        self.activity.changed.notify_one();
                    }
                    bytes[*got] = data[0];
                    *got += 1;
                    data = &data[1..];
                    if *got == bytes.len() {
                        let len = u64::from(u32::from_be_bytes(*bytes));
                        if len > self.max_frame {
                            self.activity.oversize.store(len, Ordering::Relaxed);
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("a frame of {len} bytes, over the limit of {}", self.max_frame),
                            ));
                        }
                        self.framing = Framing::Body(len);
                        if len == 0 {
                            self.end_frame();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn end_frame(&mut self) {
        self.framing = Framing::Header {
            got: 0,
            bytes: [0; 4],
        };
        self.activity.frame_since.store(0, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if buf.filled().len() == before {
                if buf.remaining() > 0 {
                    this.activity.hung_up.store(true, Ordering::Relaxed);
                    this.activity.changed.notify_one();
                }
            } else if let Err(e) = this.follow(&buf.filled()[before..]) {
                buf.set_filled(before);
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        let a = &this.activity;
        match &r {
            Poll::Pending => {
                if a.write_stalled_since
                    .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    a.changed.notify_one();
                }
            }
            Poll::Ready(_) => {
                if a.write_stalled_since.swap(0, Ordering::Relaxed) != 0 {
                    a.resume.wake();
                }
                a.touch();
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection's message transport, paced: no new request is read while the client
/// leaves its replies unread, or `max_busy` of its requests are being handled, or as many
/// of its uid's as that uid may have. So a client
/// cannot pile up replies the daemon must hold, and replies keep flowing meanwhile (tarpc
/// writes them only while the request stream is polled, which is why the limit is here and
/// not in how many handlers are polled).
pub struct Paced<T> {
    inner: T,
    activity: Arc<Activity>,
    max_busy: usize,
}

impl<T> Paced<T> {
    pub fn new(inner: T, activity: Arc<Activity>, max_busy: usize) -> Paced<T> {
        Paced {
            inner,
            activity,
            max_busy,
        }
    }
}

impl<T: Stream + Unpin> Stream for Paced<T> {
    type Item = T::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T::Item>> {
        let this = self.get_mut();
        let a = &this.activity;
        if a.must_pause(this.max_busy) {
            a.resume.register(cx.waker());
            if let Some(u) = &a.user {
                u.wait(cx.waker());
            }
            // Looked at again after registering, so a wake in between is not lost.
            if a.must_pause(this.max_busy) {
                a.paused.store(true, Ordering::Relaxed);
                return Poll::Pending;
            }
        }
        if a.paused.swap(false, Ordering::Relaxed) && a.frame_since.load(Ordering::Relaxed) != 0 {
            // A frame that waited on us gets its full time again.
            a.frame_since.store(now_ms(), Ordering::Relaxed);
            a.changed.notify_one();
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

impl<T: Sink<I> + Unpin, I> Sink<I> for Paced<T> {
    type Error = T::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: I) -> Result<(), T::Error> {
        Pin::new(&mut self.get_mut().inner).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// What a log line about a client is about; each kind is rate-limited per uid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Misbehaviour {
    /// Refused: the uid holds `max_connections_per_user` connections.
    OverCap,
    /// Sent a frame over the limit.
    Oversize,
    /// Began a frame and did not finish it in time.
    SlowFrame,
    /// Did not take its replies.
    SlowReader,
}

/// At most one line per uid and kind per [`LOG_EVERY`]; the next line says how many were
/// left out.
pub struct LogLimiter {
    seen: Mutex<HashMap<(u32, Misbehaviour), (Instant, u64)>>,
}

/// How often a line about the same uid and kind may be logged.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl LogLimiter {
    /// Whether to log this event now: `Some(n)` with the number of events left out since
    /// the last line, or `None` to leave this one out.
    pub fn allow(&self, uid: u32, kind: Misbehaviour) -> Option<u64> {
        self.allow_at(uid, kind, Instant::now())
    }

    fn allow_at(&self, uid: u32, kind: Misbehaviour, now: Instant) -> Option<u64> {
        let mut m = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 4096 {
            m.retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
        }
        match m.get_mut(&(uid, kind)) {
            Some((at, left_out)) if now.duration_since(*at) < LOG_EVERY => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                let n = *left_out;
                *at = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                m.insert((uid, kind), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(max: usize) -> Watched<tokio::io::Empty> {
        Watched::new(tokio::io::empty(), Activity::new(None), max)
    }

    #[test]
    fn frames_are_followed_across_reads() {
        let mut w = watched(100);
        let mut bytes = 5u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&3u32.to_be_bytes());
        // Header split across reads, then the body in two pieces.
        w.follow(&bytes[..2]).unwrap();
        assert_ne!(w.activity.frame_since.load(Ordering::Relaxed), 0);
        w.follow(&bytes[2..6]).unwrap();
        assert_eq!(w.framing, Framing::Body(3));
        w.follow(&bytes[6..9]).unwrap();
        assert_eq!(w.activity.frame_since.load(Ordering::Relaxed), 0, "frame done");
        w.follow(&bytes[9..]).unwrap();
        assert_eq!(w.framing, Framing::Body(3));
        assert_ne!(w.activity.frame_since.load(Ordering::Relaxed), 0);
        w.follow(b"abc").unwrap();
        assert_eq!(w.activity.frame_since.load(Ordering::Relaxed), 0);
        // An empty frame ends at once.
        w.follow(&0u32.to_be_bytes()).unwrap();
        assert_eq!(w.activity.frame_since.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_header_over_the_limit_fails_the_read() {
        let mut w = watched(100);
        w.follow(&100u32.to_be_bytes()).unwrap();
        w.follow(&[0; 100]).unwrap();
        let e = w.follow(&101u32.to_be_bytes()).unwrap_err();
        assert!(e.to_string().contains("101 bytes"), "{e}");
        assert_eq!(w.activity.oversize(), Some(101));
    }

    #[test]
    fn expiry() {
        let idle = Duration::from_secs(10);
        let header = Duration::from_secs(2);
        let a = Activity::default();
        a.last_active.store(1000, Ordering::Relaxed);
        assert_eq!(a.check(1000, idle, header), Ok(11_000));
        assert_eq!(a.check(11_000, idle, header), Err(Expired::Idle));
        // A handler running: never idle; looked at again an idle period later.
        let a = Arc::new(a);
        let busy = a.busy();
        assert_eq!(a.check(11_000, idle, header), Ok(21_000));
        drop(busy);
        assert_eq!(a.check(now_ms(), idle, header).map(|_| ()), Ok(()));
        // A frame under way: due after `header`, and not idle meanwhile.
        let a = Activity::default();
        a.last_active.store(1000, Ordering::Relaxed);
        a.frame_since.store(1000, Ordering::Relaxed);
        assert_eq!(a.check(2000, idle, header), Ok(3000));
        assert_eq!(a.check(3000, idle, header), Err(Expired::Frame));
        // A reply the client does not read.
        let a = Activity::default();
        a.last_active.store(1000, Ordering::Relaxed);
        a.write_stalled_since.store(5000, Ordering::Relaxed);
        assert_eq!(a.check(6000, idle, header), Ok(7000));
        assert_eq!(a.check(7000, idle, header), Err(Expired::Reply));
    }

    #[test]
    fn registry_caps_per_uid() {
        let r = Arc::new(Registry::default());
        let a = r.admit(1000, Some(2), None).unwrap();
        let _b = r.admit(1000, Some(2), None).unwrap();
        assert_eq!(r.admit(1000, Some(2), None).err(), Some(2));
        let _c = r.admit(1001, Some(2), None).unwrap();
        let _root = r.admit(0, None, None).unwrap();
        assert_eq!((r.count(1000), r.total()), (2, 4));
        drop(a);
        assert!(r.admit(1000, Some(2), None).is_ok());
    }

    #[test]
    fn a_uids_requests_share_one_budget() {
        let r = Arc::new(Registry::default());
        let s1 = r.admit(1000, None, Some(2)).unwrap();
        let s2 = r.admit(1000, None, Some(2)).unwrap();
        let other = r.admit(1001, None, Some(2)).unwrap();
        let (a1, a2) = (Activity::new(Some(s1.user())), Activity::new(Some(s2.user())));
        let a3 = Activity::new(Some(other.user()));
        let b1 = a1.busy();
        assert!(!a2.must_pause(64));
        let _b2 = a2.busy();
        assert!(a1.must_pause(64) && a2.must_pause(64), "the uid has 2 running");
        assert!(!a3.must_pause(64), "another uid has its own budget");
        drop(b1);
        assert!(!a1.must_pause(64));
        // The connection's own limit.
        assert!(a3.must_pause(0));
    }

    #[test]
    fn log_lines_are_rate_limited_per_uid_and_kind() {
        let l = LogLimiter::default();
        let t = Instant::now();
        assert_eq!(l.allow_at(1000, Misbehaviour::OverCap, t), Some(0));
        assert_eq!(l.allow_at(1000, Misbehaviour::OverCap, t), None);
        assert_eq!(l.allow_at(1000, Misbehaviour::OverCap, t), None);
        assert_eq!(l.allow_at(1001, Misbehaviour::OverCap, t), Some(0));
        assert_eq!(l.allow_at(1000, Misbehaviour::Oversize, t), Some(0));
        assert_eq!(l.allow_at(1000, Misbehaviour::OverCap, t + LOG_EVERY), Some(2));
    }
}
