//! `meshroute demo`: two in-process hello-world upstreams and a gateway in front of them,
//! configured by the hello-world example.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves `Hello server - <version>` on `address` until the process ends.
pub async fn hello_upstream(address: SocketAddr, version: &'static str) -> Result<(), String> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| format!("demo upstream {version} on {address}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        format!("Hello server - {version}\n"),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

/// The example files the demo runs (relative to the repository).
pub fn demo_files(root: &std::path::Path) -> Vec<PathBuf> {
    ["registry.yaml", "case5-subsets.yaml", "demo-gateway.yaml"]
        .iter()
        .map(|f| root.join("examples/hello").join(f))
        .collect()
}
