//! One tower layer for every check a call passes before its handler runs:
//! an [`Admit`] looks at the request (and may add to its extensions), and
//! either lets it through holding a guard until the response is ready, or
//! answers it with a gRPC status at once.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;

/// A check made on every call before its handler.
pub trait Admit: Clone + Send + Sync + 'static {
    /// Held while the call is handled (a permit), dropped after.
    type Guard: Send + 'static;
    /// Lets the call through with its guard, or refuses it.
    fn admit<B>(&self, req: &mut http::Request<B>) -> Result<Self::Guard, Status>;
}

/// The layer that applies an [`Admit`].
#[derive(Debug, Clone)]
pub struct AdmitLayer<A>(pub A);

impl<S, A: Clone> tower::Layer<S> for AdmitLayer<A> {
    type Service = Admitted<S, A>;
    fn layer(&self, inner: S) -> Admitted<S, A> {
        Admitted {
            inner,
            admit: self.0.clone(),
        }
    }
}

/// A service whose calls pass an [`Admit`] first.
#[derive(Debug, Clone)]
pub struct Admitted<S, A> {
    inner: S,
    admit: A,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, A, B> tower::Service<http::Request<B>> for Admitted<S, A>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    A: Admit,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.admit.admit(&mut req) {
            Ok(guard) => {
                // The clone that was made ready is the one that is called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let r = inner.call(req).await;
                    drop(guard);
                    r
                })
            }
            Err(status) => {
                let resp = status.into_http();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
