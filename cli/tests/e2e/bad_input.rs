//! Bad input at every RPC: each gets a precise status and a message naming
//! the problem, nothing is written, and the server stays up.

use prost::Message;
use sovra_proto::vault::v1 as pb;
use tonic::Code;

use sovra_testkit::*;

fn expect(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("must fail");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(needle),
        "`{}` should mention `{needle}`",
        e.message()
    );
}

#[tokio::test]
async fn put_record_rejects_bad_input() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let ok = [("phone", text("13800138000"))];
    let long_id = "c".repeat(129);
    let cases: Vec<(pb::PutRecordRequest, &str)> = vec![
        (put("", &ok), "customer_id"),
        (put(&long_id, &ok), "customer_id"),
        (put("c/../1", &ok), "customer_id"),
        (put("c\u{0}1", &ok), "customer_id"),
        (put("c-1", &[]), "fields"),
        (put("c-1", &[("shoe_size", int(42))]), "fields.shoe_size"),
        (put("c-1", &[("budget", text("a lot"))]), "fields.budget"),
        (put("c-1", &[("phone", int(138))]), "fields.phone"),
        (put("c-1", &[("budget", int(-5))]), "fields.budget"),
        (
            put("c-1", &[("name", text(&"x".repeat(129)))]),
            "fields.name",
        ),
        (
            put("c-1", &[("name", text(&"长".repeat(60)))]),
            "fields.name",
        ),
        (put("c-1", &[("name", text("   "))]), "fields.name"),
        (put("c-1", &[("name", text("a\u{7}b"))]), "fields.name"),
        (
            put("c-1", &[("phone", text("call me maybe"))]),
            "fields.phone",
        ),
        (put("c-1", &[("phone", text("+86 1"))]), "fields.phone"),
        (
            put("c-1", &[("phone", text(&"9".repeat(5000)))]),
            "fields.phone",
        ),
        (put("c-1", &[("email", text("no-at-sign"))]), "fields.email"),
        (
            put("c-1", &[("industry_code", text("ZZ99"))]),
            "fields.industry_code",
        ),
        (
            put("c-1", &[("last_contact_ms", int(5))]),
            "fields.last_contact_ms",
        ),
        (
            put("c-1", &[("phone", pb::Value { kind: None })]),
            "fields.phone",
        ),
        (put(&"x".repeat(100_000), &ok), "customer_id"),
        (
            pb::PutRecordRequest {
                idempotency_key: String::new(),
                source: None,
                ..put("c-1", &ok)
            },
            "source",
        ),
        (
            pb::PutRecordRequest {
                idempotency_key: String::new(),
                source: Some(pb::CollectionSource {
                    channel: "".into(),
                    collector: "x".into(),
                    consent_ref: "".into(),
                }),
                ..put("c-1", &ok)
            },
            "source.channel",
        ),
        (
            pb::PutRecordRequest {
                idempotency_key: String::new(),
                source: Some(pb::CollectionSource {
                    channel: "web".into(),
                    collector: "x y".into(),
                    consent_ref: "".into(),
                }),
                ..put("c-1", &ok)
            },
            "source.collector",
        ),
    ];
    for (req, needle) in cases {
        expect(svc.put_record(req).await, Code::InvalidArgument, needle);
    }
    let mut many = put("c-1", &[]);
    for i in 0..65 {
        many.fields.insert(format!("f{i}"), int(1));
    }
    expect(
        svc.put_record(many).await,
        Code::InvalidArgument,
        "limit is 64",
    );
    // Nothing was written by any of them.
    expect(
        svc.get_fields(get("c-1", &[], "billing")).await,
        Code::NotFound,
        "c-1",
    );

    // Over the request size limit (4 MiB by default).
    let huge = put("c-1", &[("name", text(&"x".repeat(5 * 1024 * 1024)))]);
    expect(svc.put_record(huge).await, Code::OutOfRange, "too large");

    // Invalid UTF-8 where a string belongs: a hand-built message whose
    // customer_id (field 1) is not UTF-8.
    let mut raw = Vec::new();
    prost::encoding::bytes::encode(1, &vec![0xff, 0xfe, 0x41], &mut raw);
    let ch = sovra_vault::client::channel(&srv.url, None).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(RawBytes(raw));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", env.service).parse().unwrap(),
    );
    let r: Result<tonic::Response<pb::PutRecordResponse>, _> = grpc
        .unary(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static("/sovra.vault.v1.Vault/PutRecord"),
            sovra_proto::codec::StrictCodec::<RawBytes, pb::PutRecordResponse>::default(),
        )
        .await;
    expect(r, Code::InvalidArgument, "UTF-8");

    // Still serving after all of it.
    svc.put_record(put("c-1", &ok)).await.unwrap();
    srv.stop().await;
}

/// A message that is already encoded.
#[derive(Clone, Default)]
struct RawBytes(Vec<u8>);
impl std::fmt::Debug for RawBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawBytes({})", self.0.len())
    }
}
impl Message for RawBytes {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        _tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, _tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

#[tokio::test]
async fn reads_searches_and_admin_calls_reject_bad_input() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let mut adm = srv.client(Some(&env.admin)).await;
    svc.put_record(put("c-1", &[("phone", text("13800138000"))]))
        .await
        .unwrap();

    // GetFields
    expect(
        svc.get_fields(get("", &[], "billing")).await,
        Code::InvalidArgument,
        "customer_id",
    );
    expect(
        svc.get_fields(get(&"c".repeat(129), &[], "billing")).await,
        Code::InvalidArgument,
        "customer_id",
    );
    expect(
        svc.get_fields(get("c-1", &["shoe_size"], "billing")).await,
        Code::InvalidArgument,
        "shoe_size",
    );
    expect(
        svc.get_fields(get("c-1", &["phone"], &"p".repeat(10_000)))
            .await,
        Code::InvalidArgument,
        "purpose",
    );
    let many: Vec<String> = (0..300).map(|_| "phone".to_owned()).collect();
    let req = pb::GetFieldsRequest {
        customer_id: "c-1".into(),
        fields: many,
        purpose: "billing".into(),
    };
    expect(svc.get_fields(req).await, Code::InvalidArgument, "fields");
    expect(
        svc.get_fields(get("nobody", &[], "billing")).await,
        Code::NotFound,
        "nobody",
    );

    // Search
    let s = |field: &str, value: Option<pb::Value>, limit: u32| pb::SearchRequest {
        field: field.into(),
        value,
        limit,
        purpose: "customer_service".into(),
    };
    expect(
        svc.search(s("name", Some(text("Li Wei")), 0)).await,
        Code::InvalidArgument,
        "no blind index",
    );
    expect(
        svc.search(s("shoe_size", Some(text("x")), 0)).await,
        Code::InvalidArgument,
        "shoe_size",
    );
    expect(
        svc.search(s("phone", None, 0)).await,
        Code::InvalidArgument,
        "value",
    );
    expect(
        svc.search(s("phone", Some(int(5)), 0)).await,
        Code::InvalidArgument,
        "fields.phone",
    );
    expect(
        svc.search(s("phone", Some(text("garbage")), 0)).await,
        Code::InvalidArgument,
        "fields.phone",
    );
    expect(
        svc.search(s("phone", Some(text("13800138000")), 5000))
            .await,
        Code::InvalidArgument,
        "limit",
    );

    // EraseCustomer
    let er = |id: &str, reason: &str| pb::EraseCustomerRequest {
        customer_id: id.into(),
        reason: reason.into(),
    };
    expect(
        adm.erase_customer(er("c-1", "")).await,
        Code::InvalidArgument,
        "reason",
    );
    expect(
        adm.erase_customer(er("c-1", &"r".repeat(65))).await,
        Code::InvalidArgument,
        "reason",
    );
    expect(
        adm.erase_customer(er("", "x")).await,
        Code::InvalidArgument,
        "customer_id",
    );
    expect(
        adm.erase_customer(er("nobody", "x")).await,
        Code::NotFound,
        "nobody",
    );

    // Key management
    let rt = |v: u32, force: bool| pb::RetireTenantKeyVersionsRequest {
        min_version: v,
        force,
    };
    expect(
        adm.retire_tenant_key_versions(rt(0, false)).await,
        Code::InvalidArgument,
        "min_version",
    );
    expect(
        adm.retire_tenant_key_versions(rt(7, true)).await,
        Code::InvalidArgument,
        "min_version",
    );
    expect(
        adm.retire_tenant_key_versions(rt(u32::MAX, true)).await,
        Code::InvalidArgument,
        "min_version",
    );

    // Still serving, and nothing was lost.
    let got = svc
        .get_fields(get("c-1", &["phone"], "billing"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.fields.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn batch_put_with_an_oversized_item_keeps_what_came_before() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let reqs = vec![
        put("first", &[("phone", text("13800138001"))]),
        put("huge", &[("name", text(&"x".repeat(5 * 1024 * 1024)))]),
        put("after", &[("phone", text("13800138002"))]),
    ];
    let mut stream = svc
        .batch_put(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut ok = Vec::new();
    let err = loop {
        match stream.message().await {
            Ok(Some(r)) => ok.push(r),
            Ok(None) => panic!("the stream must end with an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    // Whatever was answered OK is durable and readable.
    for r in ok.iter().filter(|r| r.code == 0) {
        svc.get_fields(get(&r.customer_id, &[], "billing"))
            .await
            .unwrap();
    }
    svc.put_record(put("still-up", &[("phone", text("13800138003"))]))
        .await
        .unwrap();
    srv.stop().await;
}
