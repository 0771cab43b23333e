//! Release-mode measurement of the `/metrics` render at 1,000 models (issue #8's ≤ 5 ms target):
//! `cargo run --release -p servescope --example render_bench [models] [rounds]`.
//!
//! Fills a registry as the bench's 1,000 models do (one 200 per model: every TorchServe family and
//! servescope histogram has its series, about 21,000 samples), then times gather and encode apart.
//! The full bench (`cargo xtask bench`) times the same render from a client, over HTTP.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Instant,
};

use prometheus::TextEncoder;
use servescope::{
    exposition::{
        server,
        text::Format,
        torchserve::{Filter, encode, render},
    },
    http::{Exchange, Request, Response},
    registry::{Flavor, Registry},
};

fn exchange(model: usize, status: u16) -> Exchange {
    Exchange {
        tgid: 1,
        conn_id: 1,
        peer: None,
        request: Some(Request {
            method: "POST".into(),
            target: format!("/predictions/model-{model}"),
            first_byte_ns: 1_000,
            complete_ns: 2_000,
            bytes: 1_000 + model as u64,
        }),
        response: Response {
            status,
            reason: "OK".into(),
            request_id: Some("id".into()),
            start_ns: 2_000 + 1_000 * model as u64,
            end_ns: Some(3_000_000),
            bytes: 200,
        },
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let models: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let registry = Registry::new();
    for m in 0..models {
        registry.record(&exchange(m, 200), "bench-host", Flavor::Generic);
    }
    let (mut gather_ms, mut encode_ms, mut total_ms) = (Vec::new(), Vec::new(), Vec::new());
    // The encoder this replaced, on the same families: prometheus's TextEncoder (the old body also
    // went through a lossy UTF-8 copy, not counted here).
    let mut reference_ms = Vec::new();
    let mut full_gather_ms = Vec::new();
    let mut bytes = 0;
    // The proto path (every family cloned, then encoded) must print the same bytes.
    let all = registry.gather();
    assert_eq!(
        render(&registry, &Filter::all(), Format::Prometheus),
        encode(&all, &Filter::all())
    );
    for _ in 0..rounds {
        // `gather` is the prometheus crate's share alone; `render` is the whole body (that gather
        // again, and the histograms straight from their storage).
        let t0 = Instant::now();
        let _families = registry.gather_collectors();
        let t1 = Instant::now();
        let body = render(&registry, &Filter::all(), Format::Prometheus);
        let t2 = Instant::now();
        bytes = body.len();
        let families = registry.gather();
        let t3 = Instant::now();
        full_gather_ms.push((t3 - t2).as_secs_f64() * 1e3);
        let reference = TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| panic!("TextEncoder: {e}"));
        reference_ms.push(t3.elapsed().as_secs_f64() * 1e3);
        assert!(reference.len() > bytes / 2);
        gather_ms.push((t1 - t0).as_secs_f64() * 1e3);
        encode_ms.push((t2 - t1).as_secs_f64() * 1e3 - (t1 - t0).as_secs_f64() * 1e3);
        total_ms.push((t2 - t1).as_secs_f64() * 1e3);
    }
    println!(
        "{models} models, {bytes} bytes: gather (prometheus crate's families) {:.2} ms, encode {:.2} ms, render in all {:.2} ms (median of {rounds})",
        median(&mut gather_ms),
        median(&mut encode_ms),
        median(&mut total_ms)
    );
    println!(
        "every family as proto (Registry::gather, the old path's first half): {:.2} ms",
        median(&mut full_gather_ms)
    );
    println!(
        "prometheus::TextEncoder on the same families: {:.2} ms",
        median(&mut reference_ms)
    );

    // The same scrape over HTTP from a loopback client, as the full bench times it: render, hyper,
    // transfer and the client's read.
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("runtime: {e}"));
    let listener = rt
        .block_on(server::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    // No TLS, no token: the plain scrape the bench times.
    let (_access_tx, access) = tokio::sync::watch::channel(std::sync::Arc::new(
        servescope::exposition::access::Access::open(),
    ));
    rt.spawn(server::serve(
        listener,
        registry,
        // No ring-buffer reader here: the render alone is timed.
        servescope::pipeline::DrainHandle::detached(),
        access,
        std::future::pending(),
    ));
    let mut http_ms = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect: {e}"));
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut reply = Vec::with_capacity(bytes + 1024);
        stream
            .read_to_end(&mut reply)
            .unwrap_or_else(|e| panic!("read: {e}"));
        http_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(reply.len() > bytes, "short reply: {} bytes", reply.len());
    }
    println!(
        "over HTTP (connect, render, transfer, read): {:.2} ms (median of {rounds})",
        median(&mut http_ms)
    );
}
