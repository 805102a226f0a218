//! Requests and responses of the `Vault` service: values, requests, what a
//! reading disclosed, and the status of a refused call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovra_proto::vault::v1 as pb;
use sovra_vault::client::Client;

/// A text value.
pub fn text(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(s.into())),
    }
}

/// An integer value.
pub fn int(i: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Integer(i)),
    }
}

/// The collection source of the tests' writes.
pub fn source() -> Option<pb::CollectionSource> {
    Some(pb::CollectionSource {
        channel: "web_form".into(),
        collector: "test".into(),
        consent_ref: "consent-1".into(),
    })
}

/// A write of `fields` of `customer`.
pub fn put(customer: &str, fields: &[(&str, pb::Value)]) -> pb::PutRecordRequest {
    pb::PutRecordRequest {
        idempotency_key: String::new(),
        customer_id: customer.into(),
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        source: source(),
    }
}

/// A read of `fields` of `customer` (all if empty) for `purpose`.
pub fn get(customer: &str, fields: &[&str], purpose: &str) -> pb::GetFieldsRequest {
    pb::GetFieldsRequest {
        customer_id: customer.into(),
        fields: fields.iter().map(|s| (*s).to_owned()).collect(),
        purpose: purpose.into(),
    }
}

/// A search of `field` for `value`, for purpose `customer_service`.
pub fn search_req(field: &str, value: &str, limit: u32) -> pb::SearchRequest {
    pb::SearchRequest {
        field: field.into(),
        value: Some(text(value)),
        limit,
        purpose: "customer_service".into(),
    }
}

/// The value, if the reading revealed it.
pub fn revealed(r: &pb::FieldReading) -> Option<&pb::value::Kind> {
    match &r.disclosure {
        Some(pb::field_reading::Disclosure::Revealed(v)) => v.kind.as_ref(),
        _ => None,
    }
}

/// The mask, if the reading was masked.
pub fn masked(r: &pb::FieldReading) -> Option<&str> {
    match &r.disclosure {
        Some(pb::field_reading::Disclosure::Masked(m)) => Some(m),
        _ => None,
    }
}

/// Asserts that a call failed with `code` and returns its status, so the
/// caller can check the message too.
#[track_caller]
pub fn expect_code<T>(result: Result<T, tonic::Status>, code: tonic::Code) -> tonic::Status {
    match result {
        Ok(_) => panic!("expected {code:?}, but the call succeeded"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            s
        }
    }
}

/// Polls the key status until the rotation job is done.
pub async fn wait_rotation(adm: &mut Client) -> pb::KeyStatus {
    for _ in 0..3000 {
        let s = adm
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.job.as_ref().is_some_and(|j| j.done) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("rotation did not finish");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn expect_code_returns_the_status() {
        let r: Result<(), Status> = Err(Status::not_found("no such customer"));
        assert_eq!(expect_code(r, Code::NotFound).message(), "no such customer");
    }

    #[test]
    #[should_panic(expected = "NotFound")]
    fn expect_code_refuses_another_code() {
        expect_code(Err::<(), _>(Status::internal("boom")), Code::NotFound);
    }

    #[test]
    #[should_panic(expected = "succeeded")]
    fn expect_code_refuses_success() {
        expect_code(Ok::<(), Status>(()), Code::NotFound);
    }
}
