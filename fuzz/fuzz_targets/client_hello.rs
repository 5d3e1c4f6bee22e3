//! Any bytes as the start of a TLS connection: the ClientHello reader never panics, answers
//! the same for the same bytes however they arrive, and where rustls reads a ClientHello with
//! a server name out of them, finds that name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshroute_core::client_hello::{sni, Hello};

fuzz_target!(|data: &[u8]| {
    let whole = sni(data);
    // A reader that has its answer keeps it as more bytes arrive.
    if whole != Hello::NeedMore {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\x16\x03\x01\x00\x00more");
        assert_eq!(sni(&longer), whole, "more bytes changed a settled answer");
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = data;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Ok(Some(accepted)) = acceptor.accept() {
        if let Some(name) = accepted.client_hello().server_name() {
            // rustls drops a trailing dot (which RFC 6066 forbids); the reader keeps the name
            // as the client sent it.
            let read = match &whole {
                Hello::Sni(s) => Hello::Sni(s.strip_suffix('.').unwrap_or(s).to_owned()),
                other => panic!("rustls reads server name {name:?}, the reader {other:?}"),
            };
            assert_eq!(
                read,
                Hello::Sni(name.to_ascii_lowercase()),
                "rustls reads server name {name:?}"
            );
        }
    }
});
