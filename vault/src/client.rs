//! A small gRPC client helper for the CLI, the demo, tests and load tools:
//! connects (optionally over TLS) and attaches the bearer token to every
//! call.

use sovra_proto::vault::v1::vault_client::VaultClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::error::{Result, VaultError};

/// Adds `authorization: Bearer <token>` to each call.
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(<redacted>)")
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A vault client with its token.
pub type Client = VaultClient<InterceptedService<Channel, BearerAuth>>;

/// Opens a channel to `server` (`http://…` or `https://…`); `ca_pem` trusts
/// a private CA for TLS.
pub async fn channel(server: &str, ca_pem: Option<Vec<u8>>) -> Result<Channel> {
    let mut ep = Endpoint::from_shared(server.to_owned())
        .map_err(|e| VaultError::invalid("server", format!("`{server}` is not a URL: {e}")))?
        .tcp_nodelay(true);
    if let Some(ca) = ca_pem {
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| VaultError::invalid("ca_cert", format!("invalid CA certificate: {e}")))?;
    }
    ep.connect().await.map_err(|e| {
        VaultError::invalid(
            "server",
            format!("cannot connect to {server}: {e} (is `sovra serve` running?)"),
        )
    })
}

/// A client on `channel` presenting `token` (none: calls are unauthenticated).
pub fn with_token(channel: Channel, token: Option<&str>) -> Result<Client> {
    Ok(VaultClient::with_interceptor(channel, bearer(token)?)
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// A ledger client with its token.
pub type LedgerClient =
    sovra_proto::ledger::v1::ledger_client::LedgerClient<InterceptedService<Channel, BearerAuth>>;

fn bearer(token: Option<&str>) -> Result<BearerAuth> {
    Ok(BearerAuth(match token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
            VaultError::invalid("token", "contains characters not allowed in metadata")
        })?),
        None => None,
    }))
}

/// A ledger client on `channel` presenting `token`.
pub fn ledger_with_token(channel: Channel, token: Option<&str>) -> Result<LedgerClient> {
    Ok(
        sovra_proto::ledger::v1::ledger_client::LedgerClient::with_interceptor(
            channel,
            bearer(token)?,
        )
        .max_decoding_message_size(256 * 1024 * 1024),
    )
}

/// Connects a ledger client to `server` with `token`.
pub async fn connect_ledger(
    server: &str,
    token: Option<&str>,
    ca_pem: Option<Vec<u8>>,
) -> Result<LedgerClient> {
    ledger_with_token(channel(server, ca_pem).await?, token)
}

/// Connects to `server` with `token`.
pub async fn connect(server: &str, token: Option<&str>, ca_pem: Option<Vec<u8>>) -> Result<Client> {
    with_token(channel(server, ca_pem).await?, token)
}

/// A field reading as a person reads it: the value, or the mask marked as
/// such.
pub fn display(r: &sovra_proto::vault::v1::FieldReading) -> String {
    use sovra_proto::vault::v1::{field_reading::Disclosure, value::Kind};
    match &r.disclosure {
        Some(Disclosure::Revealed(v)) => match &v.kind {
            Some(Kind::Text(s)) => s.clone(),
            Some(Kind::Integer(i)) | Some(Kind::TimestampMs(i)) => i.to_string(),
            None => String::new(),
        },
        Some(Disclosure::Masked(m)) => format!("{m} (masked)"),
        None => String::new(),
    }
}

/// A policy client with its token.
pub type PolicyClient =
    sovra_proto::policy::v1::policy_client::PolicyClient<InterceptedService<Channel, BearerAuth>>;

/// Connects a policy client to `server` with `token`.
pub async fn connect_policy(
    server: &str,
    token: Option<&str>,
    ca_pem: Option<Vec<u8>>,
) -> Result<PolicyClient> {
    Ok(
        sovra_proto::policy::v1::policy_client::PolicyClient::with_interceptor(
            channel(server, ca_pem).await?,
            bearer(token)?,
        ),
    )
}

/// A lineage client with its token.
pub type LineageClient = sovra_proto::lineage::v1::lineage_client::LineageClient<
    InterceptedService<Channel, BearerAuth>,
>;

/// Connects a lineage client to `server` with `token`.
pub async fn connect_lineage(
    server: &str,
    token: Option<&str>,
    ca_pem: Option<Vec<u8>>,
) -> Result<LineageClient> {
    lineage_with_token(channel(server, ca_pem).await?, token)
}

/// A lineage client on `channel` presenting `token`.
pub fn lineage_with_token(channel: Channel, token: Option<&str>) -> Result<LineageClient> {
    Ok(
        sovra_proto::lineage::v1::lineage_client::LineageClient::with_interceptor(
            channel,
            bearer(token)?,
        )
        .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// A contracts client with its token.
pub type ContractsClient = sovra_proto::contracts::v1::contracts_client::ContractsClient<
    InterceptedService<Channel, BearerAuth>,
>;

/// Connects a contracts client to `server` with `token`.
pub async fn connect_contracts(
    server: &str,
    token: Option<&str>,
    ca_pem: Option<Vec<u8>>,
) -> Result<ContractsClient> {
    contracts_with_token(channel(server, ca_pem).await?, token)
}

/// A contracts client on `channel` presenting `token`.
pub fn contracts_with_token(channel: Channel, token: Option<&str>) -> Result<ContractsClient> {
    Ok(
        sovra_proto::contracts::v1::contracts_client::ContractsClient::with_interceptor(
            channel,
            bearer(token)?,
        )
        .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// A sandbox client with its token.
pub type SandboxClient = sovra_proto::sandbox::v1::sandbox_client::SandboxClient<
    InterceptedService<Channel, BearerAuth>,
>;

/// A sandbox client on `channel` presenting `token`.
pub fn sandbox_with_token(channel: Channel, token: Option<&str>) -> Result<SandboxClient> {
    Ok(
        sovra_proto::sandbox::v1::sandbox_client::SandboxClient::with_interceptor(
            channel,
            bearer(token)?,
        )
        .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// Connects a sandbox client to `server` with `token`.
pub async fn connect_sandbox(
    server: &str,
    token: Option<&str>,
    ca_pem: Option<Vec<u8>>,
) -> Result<SandboxClient> {
    sandbox_with_token(channel(server, ca_pem).await?, token)
}
