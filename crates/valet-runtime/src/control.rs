//! The private channel between the supervisor and a run's bootstrap: a Unix
//! socket in the run's directory that only the bootstrap ever connects to.
//!
//! The supervisor accepts exactly one connection and unlinks the socket at
//! once; the bootstrap connects before it has received its claim, and the
//! val's code is loaded only after the claim, so no val can reach the
//! channel. The claim (val, env, key, kind) goes down it, and in a hot
//! process each request's key before the request; events (the val
//! settled, an uncaught error, out of memory, the http val listens, an http
//! handler threw) come up. Outcomes are decided from these events and the
//! exit status, never from what the val prints.

use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use crate::logs::LogBuffer;

/// The longest event line read; a longer one is skipped whole. (A log
/// line is cut to 16 KiB by the run's log buffer anyway.)
const MAX_EVENT_LINE: usize = 256 * 1024;

/// Unreadable event lines one process may write before its channel is
/// given up on.
const MAX_BAD_LINES: usize = 1000;

/// Lines waiting to go down to one bootstrap. A bootstrap that stops
/// reading them (a val can break its reader) has its process ended rather
/// than valet's memory filled ([`ControlEvents::key_for`]).
const MAX_QUEUED_DOWN: usize = 1024;

/// A one-shot process has one run, whose handler errors count; ids past
/// this many (or longer than a run id can be) are not kept.
const MAX_HANDLER_ERRORS: usize = 8;
const MAX_RUN_ID: usize = 64;

/// What the bootstrap has reported so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    /// Connected: the process is up and waits for its claim.
    pub connected: bool,
    /// The val's default export settled without an error (script, cron).
    pub done: bool,
    /// After `done`, Deno's event loop ran out of work: the run is over.
    pub settled: bool,
    /// The http val listens on its socket.
    pub listening: bool,
    /// An uncaught error ended the val.
    pub uncaught: bool,
    /// An allocation failed (`ArrayBuffer`, Wasm memory): out of memory.
    pub oom: bool,
    /// The val called `Deno.exit` (a hot process takes no new request).
    pub exiting: bool,
    /// Runs whose http handler threw (a one-shot process; a hot process's
    /// requests are told apart in [`ControlEvents::attribute`]).
    pub handler_errors: std::collections::BTreeSet<String>,
    /// The process closed the channel: it has exited, or is exiting.
    pub closed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Event {
    Done,
    Settled,
    Listening,
    Exiting,
    Error {
        #[serde(default)]
        kind: String,
    },
    HandlerError {
        #[serde(default)]
        run: String,
    },
    /// A request's handler returned (its events so far were all sent).
    End {
        run: String,
    },
    /// A line a request of a hot process logged.
    Log {
        run: String,
        #[serde(default)]
        s: String,
        line: String,
    },
}

/// A request a hot process is serving: where its log lines go, whether
/// its handler threw, and who waits for the handler's end.
struct Attributed {
    logs: LogBuffer,
    threw: bool,
    ended: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// The requests a hot process is serving, by run id. Their events are
/// delivered to each request alone: a watch shared by all of them would
/// wake every request's waiter on every other request's end.
type RunLogs = Arc<Mutex<HashMap<String, Attributed>>>;

/// The supervisor's end of one process's control channel.
pub struct Control {
    path: PathBuf,
    state: watch::Receiver<Reported>,
    /// Lines to the bootstrap: the claim first.
    down: mpsc::Sender<String>,
    down_stalled: Stalled,
    logs: RunLogs,
}

/// When the write down to a bootstrap began waiting for it to read (ms
/// from [`clock_ms`]'s start), or 0 while nothing waits.
type Stalled = Arc<std::sync::atomic::AtomicU64>;

/// A write down that has waited this long means a bootstrap that stopped
/// reading (its socket buffer holds hundreds of lines by then).
const STALLED_AFTER_MS: u64 = 2_000;

/// Milliseconds on a monotonic clock (from 1: 0 means none).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Control {
    /// Binds `control.sock` in `dir`; the returned task accepts the
    /// bootstrap's connection, sends the claim once it is given, and reads
    /// events until the process closes it.
    pub fn bind(
        dir: &Path,
        owner: Option<(u32, u32)>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> std::io::Result<Control> {
        let path = dir.join("control.sock");
        let listener = UnixListener::bind(&path)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        let (tx, state) = watch::channel(Reported::default());
        let (down, mut down_rx) = mpsc::channel::<String>(MAX_QUEUED_DOWN);
        let down_stalled = Stalled::default();
        let stalled = down_stalled.clone();
        let unlink = path.clone();
        let logs: RunLogs = Arc::default();
        let run_logs = logs.clone();
        tasks.spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            // One connection only: nobody else may ever connect.
            drop(listener);
            let _ = std::fs::remove_file(&unlink);
            tx.send_modify(|r| r.connected = true);
            let (read, write) = stream.into_split();
            let mut read = BufReader::new(read);
            let events = async {
                let mut line = Vec::new();
                // The bootstrap writes whole events; bad lines mean a val
                // got at the channel. Said once, counted, and past a limit
                // the process is no longer listened to (its channel counts
                // as closed: a hot process is replaced).
                let mut bad = 0usize;
                while let Ok(Some(whole)) = read_line(&mut read, &mut line).await {
                    let event = if whole {
                        serde_json::from_slice::<Event>(&line).map_err(|e| e.to_string())
                    } else {
                        Err(format!("a line over {MAX_EVENT_LINE} bytes"))
                    };
                    match event {
                        Ok(event) => {
                            if let Some(event) = deliver(&run_logs, event) {
                                tx.send_modify(|r| apply(r, event));
                            }
                        }
                        Err(error) => {
                            bad += 1;
                            if bad == 1 {
                                tracing::warn!(error, "an unreadable control event");
                            }
                            if bad >= MAX_BAD_LINES {
                                tracing::warn!(bad, "a process wrote too many unreadable control events; it is no longer listened to");
                                return;
                            }
                        }
                    }
                }
                if bad > 1 {
                    tracing::warn!(bad, "unreadable control events from one process");
                }
            };
            // Written apart from the reading, so a bootstrap slow to read
            // never holds up its events; what queued meanwhile goes in one
            // write.
            let lines_down = async {
                let mut write: OwnedWriteHalf = write;
                let mut batch = String::new();
                while let Some(line) = down_rx.recv().await {
                    batch.clear();
                    batch.push_str(&line);
                    batch.push('\n');
                    while let Ok(line) = down_rx.try_recv() {
                        batch.push_str(&line);
                        batch.push('\n');
                    }
                    use std::sync::atomic::Ordering;
                    stalled.store(clock_ms(), Ordering::Relaxed);
                    if write.write_all(batch.as_bytes()).await.is_err() {
                        break;
                    }
                    stalled.store(0, Ordering::Relaxed);
                }
                // Kept open until the process closes its end: dropping the
                // write half would shut the bootstrap's reads down early.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = events => {}
                () = lines_down => {}
            }
            tx.send_modify(|r| r.closed = true);
        });
        Ok(Control {
            path,
            state,
            down,
            down_stalled,
            logs,
        })
    }

    /// Sends the claim (one JSON line). Only once.
    pub fn claim(self, line: String) -> ControlEvents {
        // The first line on an empty queue: it fits.
        let _ = self.down.try_send(line);
        ControlEvents {
            state: self.state,
            logs: self.logs,
            down: self.down,
            down_stalled: self.down_stalled,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the next line into `line`, without its newline: `Some(true)`, or
/// `Some(false)` for a line over [`MAX_EVENT_LINE`], skipped whole; `None`
/// at the end (a last line without its newline is no whole event).
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(None);
        }
        let newline = available.iter().position(|b| *b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + chunk.len() > MAX_EVENT_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(!too_long));
        }
    }
}

/// Gives an event of one of a hot process's requests to that request;
/// what is not one (or whose request is not attributed) is returned.
fn deliver(runs: &RunLogs, event: Event) -> Option<Event> {
    let run = match &event {
        Event::Log { run, .. } | Event::HandlerError { run } | Event::End { run } => run,
        _ => return Some(event),
    };
    let Ok(mut runs) = runs.lock() else {
        return Some(event);
    };
    let Some(attributed) = runs.get_mut(run) else {
        // A one-shot process's handler error is its run's; a hot request's
        // line after its run ended has nowhere to go.
        return matches!(event, Event::HandlerError { .. }).then_some(event);
    };
    match event {
        Event::Log { s, line, .. } => {
            let stream = if s == "err" { "err" } else { "out" };
            attributed.logs.push(stream, &line);
        }
        Event::HandlerError { .. } => attributed.threw = true,
        Event::End { .. } => {
            if let Some(ended) = attributed.ended.take() {
                let _ = ended.send(attributed.threw);
            }
        }
        _ => {}
    }
    None
}

fn apply(reported: &mut Reported, event: Event) {
    match event {
        Event::Done => reported.done = true,
        Event::Settled => reported.settled = true,
        Event::Listening => reported.listening = true,
        Event::Exiting => reported.exiting = true,
        Event::Error { kind } if kind == "oom" => reported.oom = true,
        Event::Error { .. } => reported.uncaught = true,
        Event::HandlerError { run } => {
            if run.len() <= MAX_RUN_ID && reported.handler_errors.len() < MAX_HANDLER_ERRORS {
                reported.handler_errors.insert(run);
            }
        }
        Event::End { .. } | Event::Log { .. } => {}
    }
}

/// The end of one hot request's handler, with whether it threw.
pub struct HandlerEnd(tokio::sync::oneshot::Receiver<bool>);

impl HandlerEnd {
    /// Waits for it; `None` when the process went away first.
    pub async fn wait(self) -> Option<bool> {
        self.0.await.ok()
    }
}

/// The events of a claimed process.
#[derive(Clone)]
pub struct ControlEvents {
    state: watch::Receiver<Reported>,
    logs: RunLogs,
    down: mpsc::Sender<String>,
    down_stalled: Stalled,
}

impl ControlEvents {
    pub fn now(&self) -> Reported {
        self.state.borrow().clone()
    }

    /// Whether a hot process may take another request: it has not said it
    /// is exiting, nor closed its channel (without copying the state).
    pub fn open(&self) -> bool {
        let reported = self.state.borrow();
        !reported.exiting && !reported.closed
    }

    /// Lines a hot process logs for `run_id` go to `logs` from now on. The
    /// receiver answers once the request's handler has returned (every
    /// line and error of it read before), with whether it threw.
    pub fn attribute(&self, run_id: &str, logs: LogBuffer) -> HandlerEnd {
        let (ended, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut map) = self.logs.lock() {
            let attributed = Attributed {
                logs,
                threw: false,
                ended: Some(ended),
            };
            map.insert(run_id.to_owned(), attributed);
        }
        HandlerEnd(rx)
    }

    /// Gives a hot process the key of its next request, `run_id`: sent
    /// down the channel before the request, so the key never travels in
    /// the request, where the val could pass it on unawares. False when
    /// the bootstrap has stopped reading (its queue is full) or is gone:
    /// the process is no use any more.
    #[must_use]
    pub fn key_for(&self, run_id: &str, key: &str) -> bool {
        #[derive(serde::Serialize)]
        struct RunKey<'a> {
            t: &'static str,
            run: &'a str,
            key: &'a str,
        }
        let line = RunKey {
            t: "run",
            run: run_id,
            key,
        };
        match serde_json::to_string(&line) {
            Ok(line) => self.down.try_send(line).is_ok(),
            Err(_) => false,
        }
    }

    /// Whether the bootstrap keeps up with what goes down to it: false once
    /// a write to it has waited [`STALLED_AFTER_MS`] (its socket buffer
    /// full) or half its queue waits behind (keys sent ahead are at most a
    /// stock's depth, far fewer), as when a val has broken its reader.
    pub fn reading(&self) -> bool {
        let since = self.down_stalled.load(std::sync::atomic::Ordering::Relaxed);
        let stalled = since != 0 && clock_ms().saturating_sub(since) >= STALLED_AFTER_MS;
        !stalled && !self.down.is_closed() && self.down.capacity() > MAX_QUEUED_DOWN / 2
    }

    /// Whether the handler of an attributed request has thrown so far.
    pub fn threw(&self, run_id: &str) -> bool {
        self.logs
            .lock()
            .ok()
            .and_then(|map| map.get(run_id).map(|a| a.threw))
            .unwrap_or(false)
    }

    /// Forgets a finished run of a hot process.
    pub fn forget(&self, run_id: &str) {
        if let Ok(mut map) = self.logs.lock() {
            map.remove(run_id);
        }
    }

    /// Waits until an http val listens, or fails trying (an uncaught
    /// error, out of memory, its process gone), until `deadline`: whether
    /// it listens.
    pub async fn listening_by(&mut self, deadline: tokio::time::Instant) -> bool {
        let settled = self.wait_for(|r| r.listening || r.uncaught || r.oom || r.closed);
        tokio::time::timeout_at(deadline, settled)
            .await
            .unwrap_or(false)
            && self.state.borrow().listening
    }

    /// Waits for `f` to hold; false when the channel closed first.
    pub async fn wait_for(&mut self, f: impl Fn(&Reported) -> bool) -> bool {
        self.state.wait_for(|r| f(r)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn event_lines_past_their_limit_are_skipped_whole() {
        let mut input = b"{\"t\":\"done\"}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_EVENT_LINE + 10));
        input.extend_from_slice(b"\n{\"t\":\"settled\"}\nno newline");
        // A small buffer: every line spans many reads.
        let mut reader = BufReader::with_capacity(1024, &input[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line(&mut reader, &mut line).await.ok(),
            Some(Some(true))
        );
        assert_eq!(line, b"{\"t\":\"done\"}");
        assert_eq!(
            read_line(&mut reader, &mut line).await.ok(),
            Some(Some(false))
        );
        assert!(line.is_empty(), "a skipped line is kept in memory");
        assert_eq!(
            read_line(&mut reader, &mut line).await.ok(),
            Some(Some(true))
        );
        assert_eq!(line, b"{\"t\":\"settled\"}");
        assert_eq!(read_line(&mut reader, &mut line).await.ok(), Some(None));
    }

    /// A claimed channel whose bootstrap is connected and never reads; the
    /// rest keeps it alive.
    async fn stalled_bootstrap() -> (
        ControlEvents,
        (
            tempfile::TempDir,
            tokio::task::JoinSet<()>,
            tokio::net::UnixStream,
        ),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tasks = tokio::task::JoinSet::new();
        let control = Control::bind(dir.path(), None, &mut tasks).expect("bind");
        let stalled = tokio::net::UnixStream::connect(control.path())
            .await
            .expect("connect");
        (control.claim("{}".into()), (dir, tasks, stalled))
    }

    /// A bootstrap that stops reading its keys (a val can break its
    /// reader) fills a bounded queue, not valet's memory: `key_for` says
    /// so, and the caller ends the process.
    #[tokio::test]
    async fn keys_a_bootstrap_does_not_read_are_bounded() {
        let (events, _held) = stalled_bootstrap().await;
        assert!(events.reading());
        let key = "k".repeat(4096);
        let mut sent = 0usize;
        while events.key_for(&format!("run_{sent}"), &key) {
            sent += 1;
            // Lets the writer move what it can into the socket.
            tokio::task::yield_now().await;
            assert!(
                sent < 100_000,
                "the queue to a stalled bootstrap never filled"
            );
        }
        assert!(sent >= MAX_QUEUED_DOWN, "refused after {sent} keys");
        // A request whose key went ahead sees it too.
        assert!(!events.reading());
    }

    /// A bootstrap that stops reading while its queue is still short (its
    /// socket buffer took what was written, the rest waits on it) is found
    /// out too, once the write has waited long enough.
    #[tokio::test]
    async fn a_write_waiting_on_a_bootstrap_says_it_stopped_reading() {
        let (events, _held) = stalled_bootstrap().await;
        // Far more than a socket buffer holds, far fewer lines than the
        // queue's half.
        let key = "k".repeat(64 * 1024);
        for n in 0..64 {
            assert!(events.key_for(&format!("run_{n}"), &key));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(STALLED_AFTER_MS + 200)).await;
        // The queue is far from half full: it is the waiting write that
        // says so.
        assert!(events.down.capacity() > MAX_QUEUED_DOWN / 2);
        assert!(!events.reading());
    }

    #[test]
    fn handler_errors_kept_are_few_and_run_sized() {
        let mut reported = Reported::default();
        apply(
            &mut reported,
            Event::HandlerError {
                run: "x".repeat(MAX_RUN_ID + 1),
            },
        );
        assert!(reported.handler_errors.is_empty());
        for i in 0..100 {
            apply(
                &mut reported,
                Event::HandlerError {
                    run: format!("run_{i}"),
                },
            );
        }
        assert_eq!(reported.handler_errors.len(), MAX_HANDLER_ERRORS);
    }
}
