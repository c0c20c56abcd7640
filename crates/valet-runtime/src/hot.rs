//! Hot http vals: a live process per val, dedicated to that val's exact
//! code, scopes, env and timeout (never shared between vals or users),
//! taking many requests at once. Each request is still a run: its own run
//! record, its own valet key (live only until its response ends, accepted
//! only through this process's channel), its own logs. Module-level state
//! survives between requests of the same val, as on every peer platform.
//!
//! A process is replaced at once when its val changes (a new fingerprint),
//! and reaped after an idle time, a maximum lifetime or a request count; a
//! process that died between requests is replaced by the next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Bytes};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use valet_core::ChannelId;
use valet_store::{Outcome, RunEnd};

use crate::control::{ControlEvents, HandlerEnd};
use crate::executor::Process;
use crate::http::{BodyEnd, DoneGuard, HttpRunError, RunBody};
use crate::key_stock::{KeyGrant, KeyStock};
use crate::logs::LogBuffer;
use crate::run_dir::RunDir;
use crate::supervisor::{OpenRun, RunSpec, Source, Supervisor};
use crate::{RuntimeError, launcher};

/// The header that names a request's run to the bootstrap over the
/// process's private socket; a visitor's own is removed first. The val
/// sees it: a run id is no secret (it is also the key's `jti`). The key
/// itself goes down the control channel ([`ControlEvents::key_for`]).
pub const RUN_HEADER: &str = "x-valet-run";

/// Set by the bootstrap on a response whose request reported nothing on
/// the control channel (no log line, no error): the handler's end, without
/// a line of its own. Its value is the process's own secret, given in its
/// claim, so a response copied from elsewhere (a proxying val's upstream)
/// cannot pass for it. Never passed on to the visitor.
pub const QUIET_END_HEADER: &str = "x-valet-quiet-end";

/// How long a connection whose response has ended may take to be ready
/// for the next request before it is closed instead of pooled.
const IDLE_HANDOVER: Duration = Duration::from_secs(1);

/// Limits of hot processes.
#[derive(Debug, Clone, Copy)]
pub struct HotLimits {
    /// Requests one process serves at once.
    pub concurrency: usize,
    /// A process with no request for this long is stopped.
    pub idle: Duration,
    /// A process older than this takes no new request.
    pub max_life: Duration,
    /// A process that served this many requests takes no new one.
    pub max_requests: u64,
}

impl Default for HotLimits {
    fn default() -> HotLimits {
        HotLimits {
            concurrency: 64,
            idle: Duration::from_secs(60),
            max_life: Duration::from_secs(15 * 60),
            max_requests: 100_000,
        }
    }
}

type Fingerprint = [u8; 32];

fn fingerprint(spec: &RunSpec, code: &str) -> Fingerprint {
    let mut hash = Sha256::new();
    for part in [
        spec.user_id.as_bytes(),
        spec.val_id.as_deref().unwrap_or("").as_bytes(),
        code.as_bytes(),
        spec.scopes.to_claim().as_bytes(),
        &spec.timeout.as_millis().to_le_bytes(),
    ] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    for (name, value) in &spec.env {
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update((value.len() as u64).to_le_bytes());
        hash.update(value.as_bytes());
    }
    hash.finalize().into()
}

/// One live process of one val.
pub(crate) struct Hot {
    fingerprint: Fingerprint,
    /// The value of [`QUIET_END_HEADER`] from this process's bootstrap.
    quiet_end: String,
    // Field order is drop order: the process dies before its directory.
    process: Mutex<Process>,
    events: ControlEvents,
    channel: ChannelId,
    _tasks: JoinSet<()>,
    dir: RunDir,
    born: Instant,
    last_used: Mutex<Instant>,
    served: AtomicU64,
    concurrency: Arc<Semaphore>,
    concurrency_limit: usize,
    /// Open HTTP/1 connections to the process that are between requests:
    /// a request takes one (or opens one) and gives it back once its
    /// response has ended, so a busy val pays no connect and handshake.
    idle: Mutex<Vec<SendRequest<HotBody>>>,
    /// The pool's count of connections opened.
    connections: Arc<AtomicU64>,
    /// Keys signed ahead for its requests (all of one user, val, scopes
    /// and timeout: the process's fingerprint includes them).
    keys: Arc<KeyStock>,
}

/// A request body on its way to a hot process, whatever it came as.
type HotBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

impl Hot {
    /// An idle connection to the process, or a new one.
    async fn connection(&self) -> std::io::Result<SendRequest<HotBody>> {
        loop {
            let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            match pooled {
                Some(sender) if sender.is_ready() => return Ok(sender),
                Some(_) => continue, // closed, or still busy: let it go
                None => break,
            }
        }
        let stream = tokio::net::UnixStream::connect(self.dir.join("http.sock")).await?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Gives a connection back once its response has ended.
    fn release(&self, sender: SendRequest<HotBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.concurrency_limit
        {
            idle.push(sender);
        }
    }

    fn usable(&self, fingerprint: &Fingerprint, limits: &HotLimits) -> bool {
        // A process that exits closes its control channel; one that dies
        // unseen fails its next connection, and is replaced then.
        self.events.open()
            && &self.fingerprint == fingerprint
            && self.born.elapsed() < limits.max_life
            && self.served.load(Ordering::Relaxed) < limits.max_requests
    }

    fn alive(&self) -> bool {
        self.process
            .lock()
            .map(|mut p| !p.has_exited())
            .unwrap_or(false)
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

impl Hot {
    /// Ends the process (its control channel closes, so it is no longer
    /// usable, and the next request replaces it).
    fn kill(&self) {
        if let Ok(process) = self.process.lock() {
            process.kill_group();
        }
    }
}

impl Drop for Hot {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A val's hot process, if it has one.
type HotSlot = Arc<tokio::sync::Mutex<Option<Arc<Hot>>>>;

/// The hot processes, by val.
#[derive(Default)]
pub(crate) struct HotPool {
    limits: HotLimits,
    /// Per val: a tokio `Mutex` because starting a process is awaited
    /// under it (requests for the same val wait for the one start); the
    /// outer std `Mutex` is held for a map lookup only.
    vals: Mutex<HashMap<String, HotSlot>>,
    /// Connections opened to hot processes, shared with each of them.
    connections: Arc<AtomicU64>,
}

impl HotPool {
    pub fn new(limits: HotLimits) -> HotPool {
        HotPool {
            limits,
            vals: Mutex::default(),
            connections: Arc::default(),
        }
    }

    pub fn connections_opened(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    fn slot(&self, val_id: &str) -> HotSlot {
        let mut vals = self.vals.lock().unwrap_or_else(|p| p.into_inner());
        vals.entry(val_id.to_owned()).or_default().clone()
    }

    /// Stops processes idle past the limit.
    pub fn reap(&self) {
        let slots: Vec<_> = self
            .vals
            .lock()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default();
        for slot in slots {
            if let Ok(mut hot) = slot.try_lock()
                && hot
                    .as_ref()
                    .is_some_and(|h| h.idle_for() > self.limits.idle)
            {
                *hot = None;
            }
        }
    }

    pub fn clear(&self) {
        if let Ok(mut vals) = self.vals.lock() {
            vals.clear();
        }
    }

    /// Hot processes whose process is alive.
    pub fn len(&self) -> usize {
        let slots: Vec<_> = self
            .vals
            .lock()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default();
        slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .map(|h| h.as_ref().is_some_and(|hot| hot.alive()))
                    .unwrap_or(true)
            })
            .count()
    }
}

/// One request's run on a hot process, from its start to its end.
struct HotRun {
    run_id: String,
    /// The request's valet key: it travels to the process on its control
    /// channel, never in the request or an environment.
    key: String,
    /// Whether it is in the process already (signed ahead and sent then).
    key_sent: bool,
    hot: Arc<Hot>,
    logs: LogBuffer,
    began: Instant,
    deadline: Instant,
    /// Keeps the key live; taken when the run ends (`None`: ended).
    guard: Option<valet_core::live_runs::LiveRunGuard>,
    _permits: (crate::slots::SlotPermit, OwnedSemaphorePermit),
    /// Where the run's end is recorded if it is dropped unended (a visitor
    /// who hung up before the answer: the request's future is dropped).
    store: valet_store::Store,
    /// Answers once the request's handler has returned in the process.
    handler_end: Option<HandlerEnd>,
}

impl HotRun {
    /// Ends the run, once: its key dies, its logs are taken and its end
    /// queued for the store's writer, before its slots are given back (so a
    /// draining supervisor finds every end queued).
    fn close(&mut self, outcome: Outcome, detail: &str) {
        if self.guard.take().is_none() {
            return;
        }
        self.hot.events.forget(&self.run_id);
        self.store.queue_run_end_detached(RunEnd {
            id: self.run_id.clone(),
            outcome,
            detail: detail.to_owned(),
            logs: self.logs.finish(),
            ended_at: valet_store::time::now_ms(),
        });
    }
}

impl HotRun {
    /// Ends the run (see [`HotRun::close`]); its record follows in the
    /// writer's next batch, which logs a failure itself.
    fn end(mut self, outcome: Outcome, detail: &str) {
        let duration_ms = self.began.elapsed().as_millis() as u64;
        self.close(outcome, detail);
        tracing::debug!(
            run_id = self.run_id,
            outcome = outcome.as_str(),
            duration_ms,
            "http run ended"
        );
    }
}

impl Drop for HotRun {
    fn drop(&mut self) {
        self.close(Outcome::Failed, "the visitor went away before the answer");
    }
}

impl Supervisor {
    /// A usable hot process for `spec`, started if needed.
    async fn hot_for(&self, spec: &RunSpec, code: &str) -> Result<Arc<Hot>, RuntimeError> {
        let inner = &self.inner;
        let val_id = spec.val_id.clone().unwrap_or_default();
        let fingerprint = fingerprint(spec, code);
        let slot = inner.hot.slot(&val_id);
        let mut current = slot.lock().await;
        if let Some(hot) = current.as_ref()
            && hot.usable(&fingerprint, &inner.hot.limits)
        {
            return Ok(hot.clone());
        }
        // Replaced: requests still in flight on the old one keep it alive
        // until they end; then it is dropped and killed.
        *current = None;
        let hot = Arc::new(self.start_hot(spec, code, fingerprint).await?);
        *current = Some(hot.clone());
        Ok(hot)
    }

    async fn start_hot(
        &self,
        spec: &RunSpec,
        code: &str,
        fingerprint: Fingerprint,
    ) -> Result<Hot, RuntimeError> {
        let inner = &self.inner;
        let started = match inner.pool.take() {
            Some(started) => started,
            None => inner.launcher.start(&[])?,
        };
        let path = crate::launcher::write_val(&started.dir, code)?;
        let quiet_end = valet_store::new_id("quiet");
        let claim = serde_json::json!({
            "kind": "http",
            "hot": true,
            "quietEnd": quiet_end,
            "valUrl": launcher::file_url(&path),
            "env": crate::supervisor::run_env_without_key(spec),
            "runId": "",
        });
        let launcher::Started {
            process,
            control,
            tasks,
            channel,
            dir,
        } = started;
        let mut events = control.claim(claim.to_string());
        let ready = events
            .listening_by(tokio::time::Instant::now() + spec.timeout)
            .await;
        inner.pool.refill();
        if !ready {
            let logs = process.logs.finish();
            return Err(RuntimeError::Spawn(format!(
                "the val did not start listening: {}",
                logs.lines().last().unwrap_or("no output")
            )));
        }
        let down = events.clone();
        let deliver: crate::key_stock::Deliver = Box::new(move |run, key| down.key_for(run, key));
        Ok(Hot {
            fingerprint,
            quiet_end,
            process: Mutex::new(process),
            events,
            channel,
            _tasks: tasks,
            dir,
            born: Instant::now(),
            last_used: Mutex::new(Instant::now()),
            served: AtomicU64::new(0),
            concurrency: Arc::new(Semaphore::new(inner.hot.limits.concurrency.max(1))),
            concurrency_limit: inner.hot.limits.concurrency.max(1),
            idle: Mutex::new(Vec::new()),
            connections: inner.hot.connections.clone(),
            keys: KeyStock::new(KeyGrant::of(spec), Some(deliver)),
        })
    }

    /// Serves one request of a stored http val on its hot process.
    pub(crate) async fn serve_hot<B>(
        &self,
        spec: RunSpec,
        request: Request<B>,
        permit: crate::slots::SlotPermit,
    ) -> Result<Response<RunBody>, HttpRunError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Source::Code(code) = &spec.source else {
            return Err(HttpRunError::internal());
        };
        let mut hot = self.hot_for(&spec, code).await.map_err(|e| {
            tracing::warn!(error = %e, "could not start a hot process");
            HttpRunError::failed("the val could not start; its logs are in its run records".into())
        })?;
        let mut request = Some(request);
        let mut permit = Some(permit);
        // Once more when the process died since its last request.
        for attempt in 0..2 {
            let run = self.begin_hot(&spec, hot.clone(), permit.take()).await?;
            let Ok(sender) = hot.connection().await else {
                // Dead between requests: replace it and try again, once.
                run.end(Outcome::Lost, "its process had ended");
                if attempt == 0 {
                    // Unless another request has replaced it already.
                    let slot = self.inner.hot.slot(spec.val_id.as_deref().unwrap_or(""));
                    let mut current = slot.lock().await;
                    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &hot)) {
                        *current = None;
                    }
                    drop(current);
                    hot = self.hot_for(&spec, code).await.map_err(|_| {
                        HttpRunError::failed("the val could not be restarted".into())
                    })?;
                    permit = Some(
                        self.inner
                            .slots
                            .acquire(&spec.user_id, spec.val_id.as_deref())
                            .await
                            .map_err(HttpRunError::busy)?,
                    );
                    continue;
                }
                return Err(HttpRunError::failed("the val is not answering".into()));
            };
            let Some(mut request) = request.take() else {
                break;
            };
            request.headers_mut().remove(RUN_HEADER);
            if let Ok(value) = run.run_id.parse() {
                request.headers_mut().insert(RUN_HEADER, value);
            }
            let request = request.map(|b| b.map_err(Into::into).boxed_unsync());
            let key_there = if run.key_sent {
                // Sent ahead: unless the bootstrap has stopped reading, in
                // which case the request would wait for it until its deadline.
                hot.events.reading()
            } else {
                hot.events.key_for(&run.run_id, &run.key)
            };
            if !key_there {
                // Its bootstrap stopped reading its control channel (a val
                // can break its reader): the process is no use; end it, and
                // the next request starts another.
                hot.kill();
                run.end(Outcome::Failed, "its process stopped taking requests' keys");
                return Err(HttpRunError::failed("the val is not answering".into()));
            }
            return self.forward_hot(run, sender, request).await;
        }
        Err(HttpRunError::internal())
    }

    async fn begin_hot(
        &self,
        spec: &RunSpec,
        hot: Arc<Hot>,
        permit: Option<crate::slots::SlotPermit>,
    ) -> Result<HotRun, HttpRunError> {
        let inner = &self.inner;
        let Some(permit) = permit else {
            return Err(HttpRunError::internal());
        };
        let process_permit = hot
            .concurrency
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HttpRunError::internal())?;
        let (open, key_sent) = match hot.keys.take(&inner.minter) {
            Some(minted) => (
                Ok(self.open_minted(minted.run_id, minted.key, spec, &hot.channel)),
                minted.sent,
            ),
            None => (self.open_run(spec, &hot.channel), false),
        };
        let OpenRun {
            run_id,
            key,
            guard,
            row,
        } = open.map_err(|e| {
            tracing::error!(error = %e, "could not start an http run");
            HttpRunError::internal()
        })?;
        // The row is written beside the request, off its path, by the
        // store's writer (in order: before the run's end).
        self.record(row);
        let logs = LogBuffer::new(inner.max_log_bytes, vec![key.clone()]);
        let handler_end = hot.events.attribute(&run_id, logs.clone());
        hot.served.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = hot.last_used.lock() {
            *last = Instant::now();
        }
        let began = Instant::now();
        Ok(HotRun {
            run_id,
            key,
            key_sent,
            hot,
            logs,
            began,
            deadline: began + spec.timeout,
            guard: Some(guard),
            _permits: (permit, process_permit),
            store: inner.store.clone(),
            handler_end: Some(handler_end),
        })
    }

    async fn forward_hot(
        &self,
        mut run: HotRun,
        mut sender: SendRequest<HotBody>,
        request: Request<HotBody>,
    ) -> Result<Response<RunBody>, HttpRunError> {
        let deadline = run.deadline;
        let result = tokio::time::timeout_at(deadline, sender.send_request(request)).await;
        let mut response = match result {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let run_id = run.run_id.clone();
                tracing::info!(run_id, error = %e, "a hot val did not answer");
                run.end(Outcome::Failed, "the val did not answer");
                return Err(HttpRunError::failed(format!(
                    "the val did not answer; its logs are at /v1/runs/{run_id}"
                )));
            }
            Err(_) => {
                let run_id = run.run_id.clone();
                run.end(Outcome::TimedOut, "no response before its deadline");
                return Err(HttpRunError::failed(format!(
                    "the val did not answer in time; its logs are at /v1/runs/{run_id}"
                )));
            }
        };
        // A quiet request's handler has ended without a word: nothing to
        // wait for on the control channel.
        let quiet = response
            .headers_mut()
            .remove(QUIET_END_HEADER)
            .is_some_and(|value| value.as_bytes() == run.hot.quiet_end.as_bytes());
        let handler_end = run.handler_end.take().filter(|_| !quiet);
        let (done_tx, done_rx) = oneshot::channel::<BodyEnd>();
        tokio::spawn(async move {
            let ended = tokio::time::timeout_at(deadline, done_rx)
                .await
                .ok()
                .and_then(Result::ok);
            // The handler's end is reported after its logs and errors on the
            // control channel, which is read apart from the response: wait
            // (briefly) until it has been read, so they are all counted.
            let told = match handler_end {
                Some(end) => tokio::time::timeout(Duration::from_secs(2), end.wait())
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            let threw = !quiet && told.unwrap_or_else(|| run.hot.events.threw(&run.run_id));
            let (outcome, detail) = match (ended, threw) {
                (None | Some(BodyEnd::CutAtDeadline), _) => (
                    Outcome::TimedOut,
                    "its response outlived its deadline and was cut",
                ),
                (Some(_), true) => (
                    Outcome::Failed,
                    "the handler threw; it answered 500 (the stack is in the logs)",
                ),
                (Some(BodyEnd::Complete), false) => (Outcome::Succeeded, "answered"),
                (Some(BodyEnd::Abandoned), false) => (
                    Outcome::Succeeded,
                    "answered; the visitor went away before the end of the body",
                ),
            };
            // The key dies now, before the connection is handed over (which
            // a visitor slow to send the rest of a request can delay).
            let hot = run.hot.clone();
            run.end(outcome, detail);
            // A connection is ready for its next request only once hyper's
            // task has seen the end of this response, which may come just
            // after the body's end reached us: wait for it, or pooling
            // finds it busy and opens a new connection every time.
            if ended == Some(BodyEnd::Complete)
                && let Ok(Ok(())) = tokio::time::timeout(IDLE_HANDOVER, sender.ready()).await
            {
                hot.release(sender);
            }
        });
        let (parts, incoming) = response.into_parts();
        Ok(Response::from_parts(
            parts,
            RunBody::new(incoming, DoneGuard::new(done_tx), Some(deadline)),
        ))
    }
}
