//! The gRPC `Vault` service: decode, call the application layer
//! ([`crate::app::records`], [`crate::app::keys`]), encode.
//!
//! The one thing done here beyond that is the transport side of
//! `BatchPut`: the request stream is drained into a queue bounded by bytes
//! and applied in chunks of one group commit each.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use sovra_proto::vault::v1 as pb;
use sovra_proto::vault::v1::vault_server::Vault;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::access::auth::Principal;
use crate::app::records::{ReadRequest, SearchRequest, Shown, WriteRequest, Written};
use crate::app::App;
use crate::engine::rotation::KeyStatus;
use crate::engine::Source;
use crate::grpc::authn::{approvals_header, caller};
use crate::schema::{FieldValue, RawValue};

/// Items applied per group commit in a BatchPut stream.
const BATCH_CHUNK: usize = 256;
/// Bytes of BatchPut items one stream may have read but not yet written.
const READ_AHEAD_BYTES: usize = 8 * 1024 * 1024;
/// Items one BatchPut stream may have read but not yet written.
const READ_AHEAD_ITEMS: usize = 65_536;

/// The `Vault` service.
#[derive(Debug, Clone)]
pub struct VaultService {
    app: App,
}

impl VaultService {
    /// The service over the application layer.
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<pb::BatchPutResult, Status>> + Send>>;

#[tonic::async_trait]
impl Vault for VaultService {
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        let p = caller(&req)?;
        let w = self.app.put(&p, write_request(req.into_inner())).await?;
        Ok(Response::new(put_response(w)))
    }

    type BatchPutStream = BatchStream;

    async fn batch_put(
        &self,
        req: Request<Streaming<pb::PutRecordRequest>>,
    ) -> Result<Response<Self::BatchPutStream>, Status> {
        // Each item's fields are authorised as it is applied.
        let p = caller(&req)?;
        let items = read_ahead(req.into_inner());
        let (tx, rx) = mpsc::channel(BATCH_CHUNK);
        tokio::spawn(write_chunks(self.app.clone(), p, items, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_fields(
        &self,
        req: Request<pb::GetFieldsRequest>,
    ) -> Result<Response<pb::GetFieldsResponse>, Status> {
        let p = caller(&req)?;
        let approvals = self.app.approvals(&p, approvals_header(&req)?)?;
        let r = req.into_inner();
        let reading = self
            .app
            .read(
                &p,
                ReadRequest {
                    customer_id: r.customer_id,
                    fields: r.fields,
                    purpose: r.purpose,
                    approvals,
                },
            )
            .await?;
        let fields = reading.fields.into_iter().map(field_reading).collect();
        Ok(Response::new(pb::GetFieldsResponse {
            customer_id: reading.customer_id,
            fields,
        }))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let (customer_ids, truncated) = self.app.search(
            &p,
            SearchRequest {
                field: r.field,
                value: r.value.map(raw_value),
                purpose: r.purpose,
                limit: r.limit,
            },
        )?;
        Ok(Response::new(pb::SearchResponse {
            customer_ids,
            truncated,
        }))
    }

    async fn erase_customer(
        &self,
        req: Request<pb::EraseCustomerRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let e = self.app.erase(&p, r.customer_id, r.reason).await?;
        Ok(Response::new(pb::ErasureReceipt {
            receipt_id: e.receipt_id,
            customer_id: e.customer_id,
            reason: e.reason,
            erased_at_ms: e.outcome.erased_at_ms,
            fields_erased: e.outcome.fields_erased,
            index_entries_removed: e.outcome.index_entries_removed,
            data_key_wrap_version: e.outcome.wrap_version,
            ledger_index: e.ledger_index,
            subject: e.subject.to_hex(),
        }))
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = caller(&req)?;
        let s = self.app.rotate_key(&p).await?;
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn get_key_status(
        &self,
        req: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = caller(&req)?;
        let s = self.app.key_status(&p)?;
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn retire_tenant_key_versions(
        &self,
        req: Request<pb::RetireTenantKeyVersionsRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let p = caller(&req)?;
        let r = req.into_inner();
        let s = self
            .app
            .retire_key_versions(&p, r.min_version, r.force)
            .await?;
        Ok(Response::new(key_status(&p.tenant, s)))
    }

    async fn describe_schema(
        &self,
        req: Request<pb::DescribeSchemaRequest>,
    ) -> Result<Response<pb::DescribeSchemaResponse>, Status> {
        let p = caller(&req)?;
        let s = self.app.schema(&p)?;
        Ok(Response::new(pb::DescribeSchemaResponse {
            name: s.name().to_owned(),
            version: s.version(),
            fields: s
                .fields()
                .iter()
                .map(|f| pb::FieldSpec {
                    name: f.name.clone(),
                    r#type: f.ty.as_str().into(),
                    sensitivity: f.sensitivity.as_str().into(),
                    indexed: f.indexed,
                    mask: f.mask.name(),
                    max_len: f.max_len,
                    format: f.format_name().into(),
                    min: f.min,
                    max: f.max,
                    description: f.description.clone(),
                })
                .collect(),
            purposes: s.purposes().map(str::to_owned).collect(),
        }))
    }
}

/// A queued BatchPut item and the bytes of read-ahead it holds.
type Queued = Result<(pb::PutRecordRequest, tokio::sync::OwnedSemaphorePermit), Status>;

/// Drains the request stream as fast as it arrives, into a queue bounded
/// by bytes: the transport never holds a backlog of small DATA frames
/// (which h2 answers with GOAWAY ENHANCE_YOUR_CALM `too_many_data_frames`),
/// and a client that outruns the writes is held back by flow control once
/// READ_AHEAD_BYTES are queued.
fn read_ahead(mut inbound: Streaming<pb::PutRecordRequest>) -> mpsc::Receiver<Queued> {
    let (items_tx, items) = mpsc::channel(READ_AHEAD_ITEMS);
    let budget = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
    tokio::spawn(async move {
        loop {
            let next = match inbound.message().await {
                Ok(Some(m)) => {
                    // INVARIANT: a message is at most max_request_bytes,
                    // below READ_AHEAD_BYTES; clamped all the same so an
                    // acquire can always succeed.
                    let n = m.encoded_len().clamp(1, READ_AHEAD_BYTES) as u32;
                    let Ok(permit) = budget.clone().acquire_many_owned(n).await else {
                        return;
                    };
                    Ok((m, permit))
                }
                Ok(None) => return,
                Err(s) => Err(s),
            };
            let failed = next.is_err();
            if items_tx.send(next).await.is_err() || failed {
                return;
            }
        }
    });
    items
}

/// Applies queued items in chunks (whatever is queued, up to BATCH_CHUNK,
/// under one group commit) and sends one result per item, in order.
async fn write_chunks(
    app: App,
    p: Arc<Principal>,
    mut items: mpsc::Receiver<Queued>,
    tx: mpsc::Sender<Result<pb::BatchPutResult, Status>>,
) {
    let mut index = 0u64;
    loop {
        let mut chunk = Vec::new();
        let mut failure = None;
        match items.recv().await {
            Some(Ok((m, _permit))) => chunk.push(m),
            Some(Err(s)) => failure = Some(s),
            None => return,
        }
        while failure.is_none() && chunk.len() < BATCH_CHUNK {
            match items.try_recv() {
                Ok(Ok((m, _permit))) => chunk.push(m),
                Ok(Err(s)) => failure = Some(s),
                Err(_) => break,
            }
        }
        if !chunk.is_empty() {
            let ids: Vec<String> = chunk.iter().map(|m| m.customer_id.clone()).collect();
            let writes = chunk.into_iter().map(write_request).collect();
            let out = app.put_batch(&p, writes).await;
            let durable = out.durable.map_err(Status::from);
            for (r, customer_id) in out.items.into_iter().zip(ids) {
                let r = batch_result(index, customer_id, r.map_err(Status::from), &durable);
                index += 1;
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        }
        if let Some(s) = failure {
            // Every item read before the break was answered above.
            tracing::warn!(principal = %p.name, items = index, error = %s, "a BatchPut stream broke");
            let _ = tx.send(Err(s)).await;
            return;
        }
    }
}

/// One item's result; an item written but not made durable reports the
/// commit's failure.
fn batch_result(
    index: u64,
    customer_id: String,
    r: Result<Written, Status>,
    durable: &Result<(), Status>,
) -> pb::BatchPutResult {
    let r = match (r, durable) {
        (Ok(w), Err(s)) if !w.replayed => Err(s.clone()),
        (r, _) => r,
    };
    match r {
        Ok(w) => pb::BatchPutResult {
            index,
            customer_id,
            code: Code::Ok as i32,
            message: String::new(),
            versions: field_versions(w.versions),
            replayed: w.replayed,
        },
        Err(s) => pb::BatchPutResult {
            index,
            customer_id,
            code: s.code() as i32,
            message: s.message().to_owned(),
            versions: Vec::new(),
            replayed: false,
        },
    }
}

fn write_request(m: pb::PutRecordRequest) -> WriteRequest {
    WriteRequest {
        customer_id: m.customer_id,
        fields: m
            .fields
            .into_iter()
            .map(|(name, v)| (name, raw_value(v)))
            .collect(),
        source: m.source.map(|s| Source {
            channel: s.channel,
            collector: s.collector,
            consent_ref: s.consent_ref,
        }),
        idempotency_key: m.idempotency_key,
    }
}

fn put_response(w: Written) -> pb::PutRecordResponse {
    pb::PutRecordResponse {
        customer_id: w.customer_id,
        created: w.created,
        replayed: w.replayed,
        versions: field_versions(w.versions),
    }
}

fn field_versions(v: Vec<(String, u64)>) -> Vec<pb::FieldVersion> {
    v.into_iter()
        .map(|(field, version)| pb::FieldVersion { field, version })
        .collect()
}

fn field_reading(f: crate::app::records::FieldReading<'_>) -> pb::FieldReading {
    let shown = match f.shown {
        Shown::Revealed(v) => pb::field_reading::Disclosure::Revealed(proto_value(&v)),
        Shown::Masked(m) => pb::field_reading::Disclosure::Masked(m),
    };
    pb::FieldReading {
        field: f.def.name.clone(),
        disclosure: Some(shown),
        version: f.version,
        source: Some(pb::CollectionSource {
            channel: f.source.channel,
            collector: f.source.collector,
            consent_ref: f.source.consent_ref,
        }),
        collected_at_ms: f.collected_at_ms,
    }
}

fn raw_value(v: pb::Value) -> RawValue {
    match v.kind {
        Some(pb::value::Kind::Text(s)) => RawValue::Text(s),
        Some(pb::value::Kind::Integer(i)) => RawValue::Integer(i),
        Some(pb::value::Kind::TimestampMs(t)) => RawValue::Timestamp(t),
        None => RawValue::Missing,
    }
}

fn proto_value(v: &FieldValue) -> pb::Value {
    let kind = match v {
        // The copy into the response leaves zeroizing custody here: prost
        // owns it until it is encoded and dropped.
        FieldValue::Text(s) => pb::value::Kind::Text(s.clone()),
        FieldValue::Integer(i) => pb::value::Kind::Integer(*i),
        FieldValue::Timestamp(t) => pb::value::Kind::TimestampMs(*t),
    };
    pb::Value { kind: Some(kind) }
}

fn key_status(tenant: &str, s: KeyStatus) -> pb::KeyStatus {
    pb::KeyStatus {
        tenant: tenant.to_owned(),
        active_version: s.state.active_version,
        min_version: s.state.min_version,
        data_keys_by_version: s.by_version.into_iter().collect(),
        job: s.state.job.map(|j| pb::RotationJob {
            target_version: j.target_version,
            rewrapped: j.rewrapped,
            total: j.total,
            done: j.done,
            started_at_ms: j.started_at_ms,
            finished_at_ms: j.finished_at_ms,
        }),
    }
}
