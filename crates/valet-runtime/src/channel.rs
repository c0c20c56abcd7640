//! The boundary between a run's channel and the API: the supervisor binds
//! each run process's API socket, and an [`ApiChannel`] (valet-server's
//! adapter over valet-api) serves `/v1` on it, stamping every request with
//! the channel's id so that a run key works only through its own run.

use std::future::Future;
use std::pin::Pin;

use tokio::net::UnixListener;
use valet_core::ChannelId;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub trait ApiChannel: Send + Sync {
    /// Serves the API on `listener` for `channel` until the future is
    /// dropped (the process's end).
    fn serve(&self, listener: UnixListener, channel: ChannelId) -> BoxFuture<()>;
}
