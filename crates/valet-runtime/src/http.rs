//! http vals: one request is one run. The val's process listens on a Unix
//! socket in its directory; the supervisor forwards the request there and
//! streams the response back. The run ends when the response body has been
//! sent (or the client went away, or the deadline passed).

use std::future::Future;

use hyper::body::{Body, Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::RuntimeError;
use crate::supervisor::{RunSpec, Supervisor};

/// Why an http run gave no response of the val's own.
#[derive(Debug, Clone)]
pub struct HttpRunError {
    pub status: StatusCode,
    /// A stable machine-readable code (`val_failed`, `run_failed`, `busy`).
    pub code: &'static str,
    /// For the visitor: says nothing internal.
    pub message: String,
    /// Seconds after which a retry may succeed (busy).
    pub retry_after: Option<u64>,
}

impl HttpRunError {
    pub(crate) fn internal() -> HttpRunError {
        HttpRunError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "run_failed",
            "the val could not be run; the server log has the details".into(),
        )
    }

    pub(crate) fn failed(message: String) -> HttpRunError {
        HttpRunError::new(StatusCode::BAD_GATEWAY, "val_failed", message)
    }

    pub(crate) fn busy(busy: crate::slots::Busy) -> HttpRunError {
        HttpRunError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "busy",
            message: format!("this val is busy: {}", busy.0),
            retry_after: Some(busy.1),
        }
    }

    fn new(status: StatusCode, code: &'static str, message: String) -> HttpRunError {
        HttpRunError {
            status,
            code,
            message,
            retry_after: None,
        }
    }
}

/// An http val's response body, streamed from its process. Dropping it
/// (the response was sent, or the client went away) ends the run; at the
/// run's deadline it ends early, with an error, so the client sees a cut
/// response rather than a whole one.
pub struct RunBody {
    incoming: Incoming,
    done: DoneGuard,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl RunBody {
    pub(crate) fn new(
        incoming: Incoming,
        done: DoneGuard,
        deadline: Option<tokio::time::Instant>,
    ) -> RunBody {
        let mut body = RunBody {
            incoming,
            done,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        };
        // An empty body is never polled: it is whole already.
        body.whole_if_ended();
        body
    }

    /// A body whose length is known is not polled past its last frame
    /// (hyper asks `is_end_stream` instead), so it is whole when the
    /// process's response has been read to its end, not only at `None`.
    fn whole_if_ended(&mut self) {
        if self.incoming.is_end_stream() {
            self.done.end(BodyEnd::Complete);
        }
    }
}

/// Why a response cut at its deadline ended.
#[derive(Debug)]
struct CutAtDeadline;

impl std::fmt::Display for CutAtDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the val's response outlived its run's deadline")
    }
}

impl std::error::Error for CutAtDeadline {}

impl Body for RunBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.done.end(BodyEnd::CutAtDeadline);
            return Poll::Ready(Some(Err(Box::new(CutAtDeadline))));
        }
        match std::pin::Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                self.done.end(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                self.whole_if_ended();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// Sent whole.
    Complete,
    /// Cut at the run's deadline.
    CutAtDeadline,
    /// Dropped before its end: the client went away.
    Abandoned,
}

/// Tells the run's end how its response body ended (once: when it ends,
/// or when it is dropped before).
pub(crate) struct DoneGuard(Option<oneshot::Sender<BodyEnd>>);

impl DoneGuard {
    pub(crate) fn new(done: oneshot::Sender<BodyEnd>) -> DoneGuard {
        DoneGuard(Some(done))
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(how);
        }
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.end(BodyEnd::Abandoned);
    }
}

impl Supervisor {
    /// Runs an http val for one request, streaming its response back.
    pub async fn serve_http<B>(
        &self,
        spec: RunSpec,
        request: Request<B>,
    ) -> Result<Response<RunBody>, HttpRunError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let val_key = spec.val_id.clone().unwrap_or_else(|| spec.user_id.clone());
        let permit = self
            .inner
            .slots
            .acquire(&spec.user_id, Some(&val_key))
            .await
            .map_err(HttpRunError::busy)?;
        if spec.val_id.is_some() && matches!(spec.source, crate::Source::Code(_)) {
            return self.serve_hot(spec, request, permit).await;
        }
        // A task of its own: a visitor who hangs up drops this future, and
        // the run must still end (and be recorded) as runs do.
        let this = self.clone();
        tokio::spawn(async move { this.serve_once(spec, request, permit).await })
            .await
            .map_err(|_| HttpRunError::internal())?
    }

    /// One request in a process of its own (`valet dev`, a file's val).
    async fn serve_once<B>(
        &self,
        spec: RunSpec,
        request: Request<B>,
        permit: crate::slots::SlotPermit,
    ) -> Result<Response<RunBody>, HttpRunError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut active = self.begin(&spec, permit).await.map_err(|e: RuntimeError| {
            tracing::error!(error = %e, "could not start an http run");
            HttpRunError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "run_failed",
                "the val could not be started".to_owned(),
            )
        })?;
        let run_id = active.run_id.clone();

        let listening = active.events.listening_by(active.deadline).await;
        let stream = if listening {
            tokio::net::UnixStream::connect(active.dir.join("http.sock"))
                .await
                .ok()
        } else {
            None
        };
        let Some(stream) = stream else {
            let exit = active
                .process
                .wait(active.deadline, std::future::ready(()))
                .await;
            let out = self.finish(active, exit).await;
            return Err(HttpRunError::new(
                StatusCode::BAD_GATEWAY,
                "val_failed",
                format!(
                    "the val failed before answering ({}); its logs are at /v1/runs/{}",
                    out.outcome.as_str(),
                    out.run_id
                ),
            ));
        };

        let (done_tx, done_rx) = oneshot::channel::<BodyEnd>();
        let supervisor = self.clone();
        let reaper = tokio::spawn(async move {
            let stop = async {
                let _ = done_rx.await;
            };
            let exit = active.process.wait(active.deadline, stop).await;
            supervisor.finish(active, exit).await;
        });

        let result = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await
        }
        .await;
        match result {
            Ok(response) => {
                let (parts, incoming) = response.into_parts();
                let body = RunBody::new(incoming, DoneGuard::new(done_tx), None);
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                tracing::info!(run_id, error = %e, "an http val did not answer");
                let _ = done_tx.send(BodyEnd::Abandoned);
                let _ = reaper.await;
                Err(HttpRunError::new(
                    StatusCode::BAD_GATEWAY,
                    "val_failed",
                    format!("the val did not answer; its logs are at /v1/runs/{run_id}"),
                ))
            }
        }
    }
}
