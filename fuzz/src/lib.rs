//! What the fuzz targets share: running a loaded engine on requests built from its own
//! rules and the fuzzer's bytes, so that every route table, virtual host and connection
//! table is decided on.

use meshroute_core::engine::{ConnectionView, Engine, NoEndpointState, RequestView, SplitMix64};
use meshroute_core::ir::RulesDocument;

/// At most this many route tables, hosts per table and paths are tried per input: an input
/// is decided on in bounded time whatever its size.
const TRIED: usize = 8;

/// Decides requests for the hosts `doc` serves (and for names taken from `data`), on each of
/// its ports, and connections on each of its connection tables.
pub fn exercise(engine: &Engine, doc: &RulesDocument, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let words: Vec<&str> = text.split(['\n', ' ']).take(TRIED).collect();
    let seed = data
        .iter()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(*b));
    for table in doc.route_tables.iter().take(TRIED) {
        let hosts = table
            .virtual_hosts
            .iter()
            .flat_map(|v| v.domains.iter().map(|d| d.replace('*', "x")))
            .take(TRIED)
            .chain(words.iter().map(|w| (*w).to_owned()));
        for host in hosts {
            for path in ["/", "/reviews/1?x=1"]
                .into_iter()
                .chain(words.iter().copied())
            {
                let headers = vec![
                    (":authority".to_owned(), host.clone()),
                    (":path".to_owned(), path.to_owned()),
                    (":method".to_owned(), "GET".to_owned()),
                    (":scheme".to_owned(), "http".to_owned()),
                    ("end-user".to_owned(), "jason".to_owned()),
                    ("cookie".to_owned(), format!("user={path}")),
                ];
                let view = RequestView {
                    method: "GET",
                    scheme: "http",
                    authority: &host,
                    path,
                    port: table.port,
                    headers: &headers,
                    source_ip: Some("10.0.0.1"),
                    transparent: seed % 2 == 0,
                };
                let _ = engine.decide(&view, &mut SplitMix64(seed));
            }
        }
    }
    for table in doc.l4_tables.iter().take(TRIED) {
        for sni in words.iter().copied().chain(["", "db.example.com"]) {
            let conn = ConnectionView {
                port: table.port,
                sni,
                destination: "10.96.0.1:5432",
                source_ip: Some("10.0.0.1"),
            };
            let _ = engine.decide_connection(&conn, &mut SplitMix64(seed), &NoEndpointState);
        }
    }
}
