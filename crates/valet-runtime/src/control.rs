//! The private channel between the supervisor and a run's bootstrap: a Unix
//! socket in the run's directory that only the bootstrap ever connects to.
//!
//! The supervisor accepts exactly one connection and unlinks the socket at
//! once; the bootstrap connects before it has received its claim, and the
//! val's code is loaded only after the claim, so no val can reach the
//! channel. The claim (val, env, key, kind) goes down it, and in a hot
//! process each request's key just before the request; events (the val
//! settled, an uncaught error, out of memory, the http val listens, an http
//! handler threw) come up. Outcomes are decided from these events and the
//! exit status, never from what the val prints.

use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use crate::logs::LogBuffer;

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
    down: mpsc::UnboundedSender<String>,
    logs: RunLogs,
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
        let (down, mut down_rx) = mpsc::unbounded_channel::<String>();
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
            let mut lines = BufReader::new(read).lines();
            let events = async {
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(event) => {
                            if let Some(event) = deliver(&run_logs, event) {
                                tx.send_modify(|r| apply(r, event));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable control event"),
                    }
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
                    if write.write_all(batch.as_bytes()).await.is_err() {
                        break;
                    }
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
            logs,
        })
    }

    /// Sends the claim (one JSON line). Only once.
    pub fn claim(self, line: String) -> ControlEvents {
        let _ = self.down.send(line);
        ControlEvents {
            state: self.state,
            logs: self.logs,
            down: self.down,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
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
            reported.handler_errors.insert(run);
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
    down: mpsc::UnboundedSender<String>,
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
    /// the request, where the val could pass it on unawares.
    pub fn key_for(&self, run_id: &str, key: &str) {
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
        if let Ok(line) = serde_json::to_string(&line) {
            let _ = self.down.send(line);
        }
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
