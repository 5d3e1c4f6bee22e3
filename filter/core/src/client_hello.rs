//! The server name of a TLS ClientHello, read without consuming anything, as Envoy's
//! tls_inspector reads it: both hosts route TLS connections on it before any handshake.

/// A ClientHello larger than this is not read further (Envoy's inspector stops at 64 KiB).
pub const CLIENT_HELLO_LIMIT: usize = 64 * 1024;

/// What a ClientHello read so far says.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    NeedMore,
    /// Not TLS, or no SNI in it.
    NoSni,
    Sni(String),
}

/// Reads the SNI out of a TLS ClientHello (record header, handshake header, then the
/// `server_name` extension), without consuming anything. The handshake message may span
/// several records (clients with large extensions split it): their payloads are joined
/// until the message is whole.
pub fn sni(buf: &[u8]) -> Hello {
    fn be16(b: &[u8], at: usize) -> Option<usize> {
        Some(usize::from(*b.get(at)?) << 8 | usize::from(*b.get(at + 1)?))
    }
    if buf.is_empty() {
        return Hello::NeedMore;
    }
    if buf[0] != 0x16 {
        return Hello::NoSni;
    }
    // Join handshake records until the ClientHello message (4-byte header + body) is whole.
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(record_len) = be16(buf, at + 3) else {
            return Hello::NeedMore;
        };
        if buf[at] != 0x16 {
            return Hello::NoSni;
        }
        let Some(payload) = buf.get(at + 5..at + 5 + record_len) else {
            return if buf.len() >= CLIENT_HELLO_LIMIT {
                Hello::NoSni
            } else {
                Hello::NeedMore
            };
        };
        message.extend_from_slice(payload);
        at += 5 + record_len;
        if message.len() >= 4 {
            let wanted = 4
                + (usize::from(message[1]) << 16
                    | usize::from(message[2]) << 8
                    | usize::from(message[3]));
            if wanted > CLIENT_HELLO_LIMIT {
                return Hello::NoSni;
            }
            if message.len() >= wanted {
                message.truncate(wanted);
                break;
            }
        }
        if at >= buf.len() {
            return Hello::NeedMore;
        }
    }
    let body = message.as_slice();
    let parse = || -> Option<Option<String>> {
        if *body.first()? != 1 {
            return Some(None);
        }
        // handshake type, length (3), version (2), random (32)
        let mut at = 4 + 2 + 32;
        at += 1 + usize::from(*body.get(at)?); // session id
        at += 2 + be16(body, at)?; // cipher suites
        at += 1 + usize::from(*body.get(at)?); // compression methods
        let ext_end = at + 2 + be16(body, at)?;
        at += 2;
        while at + 4 <= ext_end.min(body.len()) {
            let (kind, len) = (be16(body, at)?, be16(body, at + 2)?);
            at += 4;
            if kind == 0 {
                // server_name list: length (2), type (1), name length (2), name
                let name_len = be16(body, at + 3)?;
                let name = body.get(at + 5..at + 5 + name_len)?;
                return Some(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
            }
            at += len;
        }
        Some(None)
    };
    match parse() {
        Some(Some(sni)) => Hello::Sni(sni),
        _ => Hello::NoSni,
    }
}
