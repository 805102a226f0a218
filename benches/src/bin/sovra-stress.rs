//! `sovra-stress`: a real client's latency while hostile clients hold the
//! server (issue 13, items 5 and 6). Against a running `sovra serve`, it
//! measures, one phase after another:
//!
//! 1. idle: `GetFields` latency on an open connection, and the latency of
//!    a new connection's first call;
//! 2. the same with `--silent` TCP sockets open that never send a byte;
//! 3. the same with `--unread` `GetEntries` streams whose client never
//!    reads (raw HTTP/2 with a 16-byte receive window);
//! 4. after those streams are cancelled;
//!
//! and, with `--pid`, the server's RSS and thread count after each phase.
//! Every loop is bounded by count; the tool stops by itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use sovra_proto::ledger::v1 as lpb;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client;
use tonic::codegen::http;

#[derive(Parser)]
struct Args {
    /// Server URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// A `service` token with purpose customer_service.
    #[arg(long, env = "SOVRA_TOKEN", hide_env_values = true)]
    token: String,
    /// An `officer` token (for the GetEntries streams).
    #[arg(long, env = "SOVRA_OFFICER_TOKEN", hide_env_values = true)]
    officer_token: String,
    /// The server's process id, to report its RSS and threads.
    #[arg(long)]
    pid: Option<u32>,
    /// Customers to write first (reads pick among them).
    #[arg(long, default_value_t = 1000)]
    customers: usize,
    /// Silent sockets in phase 2.
    #[arg(long, default_value_t = 2000)]
    silent: usize,
    /// Unread GetEntries streams in phase 3.
    #[arg(long, default_value_t = 600)]
    unread: usize,
    /// GetFields calls measured per phase.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// New connections measured per phase.
    #[arg(long, default_value_t = 50)]
    connects: usize,
}

fn proc_stat(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return String::new();
    };
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    format!(" | RSS {} | threads {}", get("VmRSS:"), get("Threads:"))
}

fn put(i: usize) -> pb::PutRecordRequest {
    pb::PutRecordRequest {
        customer_id: format!("st-{i}"),
        fields: [(
            "phone".to_owned(),
            pb::Value {
                kind: Some(pb::value::Kind::Text(format!("138{:08}", i))),
            },
        )]
        .into_iter()
        .collect(),
        source: Some(pb::CollectionSource {
            channel: "load".into(),
            collector: "sovra-stress".into(),
            consent_ref: String::new(),
        }),
        idempotency_key: String::new(),
    }
}

fn read(i: usize) -> pb::GetFieldsRequest {
    pb::GetFieldsRequest {
        customer_id: format!("st-{i}"),
        fields: vec!["phone".into()],
        purpose: "customer_service".into(),
    }
}

async fn phase(name: &str, a: &Args, c: &mut client::Client) {
    let mut reads = Histogram::<u64>::new(3).unwrap();
    for i in 0..a.calls {
        let t = Instant::now();
        c.get_fields(read(i % a.customers)).await.unwrap();
        reads.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let mut connects = Histogram::<u64>::new(3).unwrap();
    for i in 0..a.connects {
        let t = Instant::now();
        let mut fresh = client::connect(&a.server, Some(&a.token), None)
            .await
            .unwrap();
        fresh.get_fields(read(i % a.customers)).await.unwrap();
        connects.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<34} | GetFields p50 {:.2} ms p99 {:.2} ms | new connection + first call p50 {:.2} ms p99 {:.2} ms{}",
        ms(&reads, 0.5),
        ms(&reads, 0.99),
        ms(&connects, 0.5),
        ms(&connects, 0.99),
        proc_stat(a.pid)
    );
}

fn frame(m: &impl prost::Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let addr = a
        .server
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    assert!(
        addr.starts_with("127.") || addr.starts_with("localhost") || addr.starts_with("[::1]"),
        "sovra-stress only targets loopback servers"
    );
    let mut c = client::connect(&a.server, Some(&a.token), None)
        .await
        .unwrap();
    for i in 0..a.customers {
        c.put_record(put(i)).await.unwrap();
    }
    println!("{} customers written{}", a.customers, proc_stat(a.pid));
    phase("1. idle", &a, &mut c).await;

    let mut silent = Vec::with_capacity(a.silent);
    for _ in 0..a.silent {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => silent.push(s),
            Err(e) => {
                println!("silent socket {} not opened: {e}", silent.len());
                break;
            }
        }
    }
    phase(
        &format!("2. {} silent sockets open", silent.len()),
        &a,
        &mut c,
    )
    .await;
    drop(silent);

    let mut held = Vec::new();
    let mut conns = Vec::new();
    while held.len() < a.unread {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(16)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send.ready().await.unwrap();
        for _ in 0..100.min(a.unread - held.len()) {
            let req = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/sovra.ledger.v1.Ledger/GetEntries"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", format!("Bearer {}", a.officer_token))
                .body(())
                .unwrap();
            let (resp, mut body) = send.send_request(req, false).unwrap();
            body.send_data(frame(&lpb::GetEntriesRequest { start: 0, end: 0 }), true)
                .unwrap();
            held.push((resp, body));
            send = send.ready().await.unwrap();
        }
        conns.push(send);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase(
        &format!("3. {} unread GetEntries streams", held.len()),
        &a,
        &mut c,
    )
    .await;
    drop(held);
    drop(conns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase("4. after they are cancelled", &a, &mut c).await;
}
