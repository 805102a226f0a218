//! Optional TLS from the configuration: a client that trusts the server's
//! CA talks to it; a plaintext client and a client that trusts nothing do
//! not; a broken certificate file refuses to start with a clear error.

use sovra_proto::vault::v1 as pb;
use sovra_vault::config::TlsConfig;
use sovra_vault::server;

use sovra_testkit::*;

#[tokio::test]
async fn tls_from_config() {
    let env = Env::new();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(env.dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(
        env.dir.path().join("tls.key"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut cfg = env.config();
    cfg.tls = Some(TlsConfig {
        cert_file: "tls.crt".into(),
        key_file: "tls.key".into(),
    });
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();

    let srv = env.start().await;
    let port = srv.handle.addr().port();
    let https = format!("https://localhost:{port}");
    let mut c = sovra_vault::client::connect(
        &https,
        Some(&env.service),
        Some(cert.cert.pem().into_bytes()),
    )
    .await
    .unwrap();
    c.put_record(put("c-1", &[("phone", text("13800138000"))]))
        .await
        .unwrap();
    let got = c
        .get_fields(get("c-1", &["phone"], "billing"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.fields.len(), 1);

    // Plaintext HTTP/2 against the TLS port fails.
    if let Ok(mut plain) = sovra_vault::client::connect(&srv.url, Some(&env.service), None).await {
        assert!(plain
            .describe_schema(pb::DescribeSchemaRequest {})
            .await
            .is_err());
    }
    // A TLS client that does not trust the certificate fails too.
    if let Ok(mut untrusting) =
        sovra_vault::client::connect(&https, Some(&env.service), Some(Vec::new())).await
    {
        assert!(untrusting
            .describe_schema(pb::DescribeSchemaRequest {})
            .await
            .is_err());
    }
    srv.stop().await;

    // A certificate file that is not PEM: clear error, no start.
    std::fs::write(env.dir.path().join("tls.crt"), "not a certificate").unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = server::start(&env.config(), Some(l), std::future::pending())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    std::fs::remove_file(env.dir.path().join("tls.key")).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = server::start(&env.config(), Some(l), std::future::pending())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tls.key"), "{e}");
}
