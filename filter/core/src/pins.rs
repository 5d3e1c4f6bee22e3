//! Client-certificate pins as Istio writes them (`verifyCertificateSpki`,
//! `verifyCertificateHash`) and Envoy reads them: SHA-256 digests, of the certificate's
//! SubjectPublicKeyInfo in base64, or of the whole DER certificate in hex with optional
//! colons. The compiler checks the form; the hosts compare digests.

use base64::Engine as _;

/// The digest a `verifyCertificateSpki` entry names, or `None` when it is not 32 bytes of
/// standard base64.
pub fn spki_pin(pin: &str) -> Option<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(pin.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// The digest a `verifyCertificateHash` entry names (`AB:CD:…` or `abcd…`, any case), or
/// `None` when it is not 64 hex digits.
pub fn certificate_hash(pin: &str) -> Option<[u8; 32]> {
    let hex: Vec<u8> = pin.bytes().filter(|&b| b != b':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn pins_read_as_envoy_reads_them() {
        // Envoy's documented examples (CertificateValidationContext).
        let spki = "NvqYIYSbgK2vCJpQhObf77vv+bQWtc5ek5RIOwPiC9A=";
        assert_eq!(spki_pin(spki).map(|d| d[0]), Some(0x36));
        assert_eq!(spki_pin("not base64"), None);
        assert_eq!(spki_pin("AAAA"), None, "too short for SHA-256");
        let colons = "DF:6F:F7:2F:E9:11:65:21:26:8F:6F:2D:D4:96:6F:51:DF:47:88:3F:D0:12:C7:B4:F3:9B:62:D6:E5:0B:B5:EA";
        let plain = "df6ff72fe9116521268f6f2dd4966f51df47883fd012c7b4f39b62d6e50bb5ea";
        assert_eq!(certificate_hash(colons), certificate_hash(plain));
        assert_eq!(certificate_hash(plain).map(|d| d[31]), Some(0xea));
        assert_eq!(certificate_hash("df6f"), None);
        assert_eq!(certificate_hash(&plain.replace('d', "g")), None);
    }
}
