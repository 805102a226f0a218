//! Authentication at the edge: every call to a `sovra.*` service has its
//! bearer token checked before any handler runs, and the handler finds the
//! authenticated [`Principal`] in the request's extensions.
//!
//! Guarantees: no Sovra handler runs for a call without a valid token
//! (UNAUTHENTICATED); health and reflection stay open, as gRPC tools
//! expect.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::access::auth::{Authenticator, Principal};
use crate::grpc::admit::{Admit, AdmitLayer};

/// The layer that authenticates every call to a `sovra.*` service.
pub type AuthLayer = AdmitLayer<Arc<Authenticator>>;

impl Admit for Arc<Authenticator> {
    type Guard = ();

    fn admit<B>(&self, req: &mut http::Request<B>) -> Result<(), Status> {
        if !req.uri().path().starts_with("/sovra.") {
            return Ok(());
        }
        let header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let p = self.authenticate(header)?;
        req.extensions_mut().insert(p);
        Ok(())
    }
}

/// The principal the [`AuthLayer`] authenticated for this call.
pub fn caller<T>(req: &Request<T>) -> Result<Arc<Principal>, Status> {
    req.extensions()
        .get::<Arc<Principal>>()
        .cloned()
        // INVARIANT: the server installs AuthLayer in front of every
        // `sovra.*` service; without it, nothing is served.
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))
}

/// The `x-sovra-approvals` metadata, if any.
pub fn approvals_header<T>(req: &Request<T>) -> Result<Option<&str>, Status> {
    req.metadata()
        .get("x-sovra-approvals")
        .map(|v| {
            v.to_str()
                .map_err(|_| Status::invalid_argument("invalid `x-sovra-approvals`: not ASCII"))
        })
        .transpose()
}
