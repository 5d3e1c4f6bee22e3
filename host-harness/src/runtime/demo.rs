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

/// The hello-world example the demo runs, built into the binary.
const DEMO_FILES: [(&str, &str); 3] = [
    (
        "registry.yaml",
        include_str!("../../../examples/hello/registry.yaml"),
    ),
    (
        "case5-subsets.yaml",
        include_str!("../../../examples/hello/case5-subsets.yaml"),
    ),
    (
        "demo-gateway.yaml",
        include_str!("../../../examples/hello/demo-gateway.yaml"),
    ),
];

/// Writes the demo's configuration into `dir` (so it can be edited and hot-reloaded) and
/// returns the file paths.
pub fn demo_files(dir: &std::path::Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    DEMO_FILES
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        })
        .collect()
}
