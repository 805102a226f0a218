//! Issue 13, items 4 to 6: the server under clients that behave as other
//! gRPC stacks and hostile clients do. A raw HTTP/2 client (the `h2` crate)
//! sends one DATA frame per message, as grpcio does, or opens streams it
//! never reads; plain sockets stay silent. Limits are checked by what
//! happens (calls served, sockets closed, threads not spawned), never by
//! timings.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client;
use tokio::io::AsyncReadExt;
use tonic::Code;

use sovra_testkit::*;

use crate::SOVRA;

/// An HTTP/2 connection to `127.0.0.1:port`, with a receive window of
/// `window` bytes per stream if given.
async fn h2_connect(port: u16, window: Option<u32>) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut b = h2::client::Builder::new();
    if let Some(w) = window {
        b.initial_window_size(w);
    }
    let (send, conn) = b.handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

fn grpc_request(path: &str, token: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

/// One gRPC length-prefixed message.
fn frame(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

/// Reads every message of a gRPC response body, then its grpc-status.
async fn read_all<M: Message + Default>(mut body: h2::RecvStream) -> (Vec<M>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => panic!("the stream broke after {} messages: {e}", out.len()),
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            out.push(M::decode(buf.split_to(len).freeze()).unwrap());
        }
    }
    let status = body
        .trailers()
        .await
        .unwrap()
        .and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()));
    (out, status)
}

/// Item 4: a 100,000-item BatchPut stream sent as grpcio sends it, one
/// small DATA frame per item and as fast as the transport takes them, is
/// answered in full: one result per item, every one OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_batchput_stream_of_small_frames_is_answered_in_full() {
    const ITEMS: usize = 100_000;
    let env = Env::new();
    let port = free_port();
    let mut server = spawn_server(SOVRA, &env, port).await;
    let mut send = h2_connect(port, None).await;
    let (response, mut stream) = send
        .send_request(
            grpc_request("/sovra.vault.v1.Vault/BatchPut", &env.service),
            false,
        )
        .unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..ITEMS {
            let item = put(&format!("b{i}"), &[("name", text("n"))]);
            stream.reserve_capacity(64);
            stream.send_data(frame(&item), false).unwrap();
            if i % 512 == 0 {
                tokio::task::yield_now().await;
            }
        }
        stream.send_data(Bytes::new(), true).unwrap();
        // Keep the stream's handle until everything is sent.
        std::future::poll_fn(|cx| match stream.poll_capacity(cx) {
            std::task::Poll::Ready(Some(_)) => std::task::Poll::Pending,
            _ => std::task::Poll::Ready(()),
        })
        .await;
    });
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let (results, status) = read_all::<pb::BatchPutResult>(response.into_body()).await;
    sender.abort();
    assert_eq!(results.len(), ITEMS, "one result per item");
    assert_eq!(status.as_deref(), Some("0"));
    let failed: Vec<_> = results.iter().filter(|r| r.code != 0).take(3).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(results.iter().enumerate().all(|(i, r)| r.index == i as u64));
    server.kill().unwrap();
    server.wait().unwrap();
}

fn keyed(i: usize, name: &str) -> pb::PutRecordRequest {
    let mut r = put(&format!("k{i}"), &[("name", text(name))]);
    r.idempotency_key = format!("batch-7:{i}");
    r
}

/// Item 4: a BatchPut stream that breaks is resent with the same
/// idempotency keys: what was durable answers `replayed` with its first
/// versions, nothing is written twice, and a key reused for another
/// request is ALREADY_EXISTS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_batch_resent_with_its_keys_writes_nothing_twice() {
    let env = Env::new();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    let items: Vec<_> = (0..1000).map(|i| keyed(i, "first")).collect();
    let mut results = svc
        .batch_put(tokio_stream::iter(items.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while seen < 300 {
        let r = results.message().await.unwrap().unwrap();
        assert_eq!(r.code, 0, "{r:?}");
        seen += 1;
    }
    drop(results); // the stream breaks here, as far as the client knows
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut again = svc
        .batch_put(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    let mut replayed = 0;
    let mut n = 0;
    while let Some(r) = again.message().await.unwrap() {
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.versions.len(), 1);
        assert_eq!(r.versions[0].version, 1, "written twice: {r:?}");
        replayed += usize::from(r.replayed);
        n += 1;
    }
    assert_eq!(n, 1000);
    assert!(replayed >= 300, "{replayed} replayed");
    // Every customer has one version only.
    for i in [0, 299, 999] {
        let got = svc
            .get_fields(get(&format!("k{i}"), &["name"], "customer_service"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.fields[0].version, 1);
    }
    // The same key for another value: refused, nothing written.
    let mut reused = svc
        .batch_put(tokio_stream::iter(vec![keyed(5, "second")]))
        .await
        .unwrap()
        .into_inner();
    let r = reused.message().await.unwrap().unwrap();
    assert_eq!(r.code, Code::AlreadyExists as i32, "{r:?}");
    assert!(r.message.contains("different request"), "{}", r.message);
    // Unary PutRecord honours keys too.
    let first = svc.put_record(keyed(5000, "x")).await.unwrap().into_inner();
    let retry = svc.put_record(keyed(5000, "x")).await.unwrap().into_inner();
    assert!(!first.replayed && retry.replayed);
    assert_eq!(first.versions, retry.versions);
    let e = svc
        .put_record({
            let mut r = keyed(5001, "x");
            r.idempotency_key = "bad key!".into();
            r
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    srv.stop().await;
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Item 6: 600 GetEntries streams whose client never reads hold no thread
/// each: the server's thread count stays where it was, and reads are
/// served meanwhile.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_entry_streams_hold_no_threads() {
    let env = Env::new();
    let port = free_port();
    let mut server = spawn_server(SOVRA, &env, port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut svc = client::connect(&url, Some(&env.service), None)
        .await
        .unwrap();
    for i in 0..20 {
        svc.put_record(put(&format!("e{i}"), &[("phone", text("13800000001"))]))
            .await
            .unwrap();
    }
    let before = threads_of(server.id());
    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..6 {
        // A 16-byte window: no stream can send even one entry in full.
        let mut send = h2_connect(port, Some(16)).await;
        for _ in 0..100 {
            let (response, mut body) = send
                .send_request(
                    grpc_request("/sovra.ledger.v1.Ledger/GetEntries", &env.officer),
                    false,
                )
                .unwrap();
            body.send_data(frame(&lpb::GetEntriesRequest { start: 0, end: 0 }), true)
                .unwrap();
            held.push((response, body));
            send = send.ready().await.unwrap();
        }
        conns.push(send);
    }
    // Let the server take them all up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = threads_of(server.id());
    for i in 0..20 {
        let r = svc
            .get_fields(get(&format!("e{i}"), &["phone"], "customer_service"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.fields.len(), 1);
    }
    assert!(
        during <= before + 16,
        "600 unread streams took threads: {before} before, {during} during"
    );
    drop(held);
    drop(conns);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Item 5: 2,000 sockets that never speak neither exhaust the server nor
/// delay a real client: it is served while they are open, and they are
/// closed once the handshake timeout passes (or sooner, evicted by newer
/// silent sockets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_and_do_not_keep_clients_out() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.limits.handshake_timeout_ms = 1000;
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let port = free_port();
    let mut server = spawn_server(SOVRA, &env, port).await;
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let url = format!("http://127.0.0.1:{port}");
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let mut c = client::connect(&url, Some(&env.service), None)
            .await
            .unwrap();
        for _ in 0..20 {
            c.describe_schema(pb::DescribeSchemaRequest {})
                .await
                .unwrap();
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "a real client was not served beside 2000 silent sockets"
    );
    // Every silent socket is closed by the server.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        for s in &mut silent {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
        }
    })
    .await;
    assert!(closed.is_ok(), "silent sockets were left open");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Item 5: one principal over its call allowance is RESOURCE_EXHAUSTED
/// with a message naming the limit, while another principal is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_over_its_call_allowance_does_not_starve_others() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.limits.max_calls_per_principal = 2;
    sovra_vault::config::write_config(&cfg, &env.config_path).unwrap();
    let srv = env.start().await;
    let mut svc = srv.client(Some(&env.service)).await;
    svc.put_record(put("q-1", &[("phone", text("13800000001"))]))
        .await
        .unwrap();
    let mut calls = Vec::new();
    for _ in 0..300 {
        let mut c = svc.clone();
        calls.push(tokio::spawn(async move {
            c.get_fields(get("q-1", &["phone"], "customer_service"))
                .await
                .map(|_| ())
        }));
    }
    let mut other = client::connect_ledger(&srv.url, Some(&env.officer), None)
        .await
        .unwrap();
    for _ in 0..5 {
        other
            .get_checkpoint(lpb::GetCheckpointRequest {})
            .await
            .unwrap();
    }
    let mut exhausted = 0;
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
            assert!(
                e.message().contains("max_calls_per_principal"),
                "{}",
                e.message()
            );
            exhausted += 1;
        }
    }
    assert!(exhausted > 0, "300 concurrent calls never met a limit of 2");
    srv.stop().await;
}
