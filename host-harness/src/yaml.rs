//! Block-style YAML for the CLI's `-o yaml` and the `.yaml` manifests: a JSON value written
//! the way people write Kubernetes YAML (mappings and sequences in block style; strings
//! plain where YAML reads them back as the same string, double-quoted otherwise).

use std::fmt::Write as _;

use serde_json::Value;

/// `value` as a YAML document (multi-document streams join these with `---`).
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => mapping(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => sequence(&mut out, a, 0),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(' ');
    }
}

fn mapping(out: &mut String, m: &serde_json::Map<String, Value>, depth: usize) {
    for (i, (k, v)) in m.iter().enumerate() {
        // The first key of a mapping inside a sequence item follows its `- `.
        if i > 0 || depth == 0 || !out.ends_with("- ") {
            indent(out, depth);
        }
        out.push_str(&string(k));
        out.push(':');
        value_after_key(out, v, depth);
    }
}

fn sequence(out: &mut String, a: &[Value], depth: usize) {
    for v in a {
        indent(out, depth);
        out.push_str("- ");
        match v {
            Value::Object(m) if !m.is_empty() => mapping(out, m, depth + 2),
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                sequence(out, inner, depth + 2);
            }
            scalar => {
                out.push_str(&inline(scalar));
                out.push('\n');
            }
        }
    }
}

fn value_after_key(out: &mut String, v: &Value, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, depth + 2);
        }
        // Kubernetes style: a sequence under a key at the key's own indentation.
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            sequence(out, a, depth);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
}

fn inline(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string as a scalar that reads back as the same string.
fn string(s: &str) -> String {
    if plain_is_safe(s) {
        return s.to_owned();
    }
    // JSON's escapes are YAML's double-quoted escapes.
    let mut quoted = String::new();
    let _ = write!(quoted, "{}", Value::from(s));
    quoted
}

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let reserved = [
        "null", "Null", "NULL", "~", "true", "True", "TRUE", "false", "False", "FALSE", "yes",
        "no", "on", "off", "y", "n", "Yes", "No", "On", "Off",
    ];
    if reserved.contains(&s) || s.parse::<f64>().is_ok() || s.starts_with("0x") {
        return false;
    }
    let starts_ok = first.is_ascii_alphanumeric() || first == '/' || first == '_' || first == '.';
    let body_ok = s.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '-' | '_' | '.' | '/' | '|' | '(' | ')' | '+' | ' ' | '=' | '@' | '$'
            )
    });
    starts_ok && body_ok && !s.ends_with(' ') && !s.contains(" #") && !s.contains(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_it_writes_reads_back_as_the_same_value() {
        let v = json!({
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": "meshroute", "namespace": "istio-system", "labels": {}},
            "spec": {
                "selector": {"matchLabels": {"istio": "ingressgateway"}},
                "url": "oci://registry/meshroute-filter:0.1",
                "pluginConfig": {"version": 3, "on": "yes", "empty": "", "n": null, "flag": true},
                "list": [
                    {"name": "a", "ports": [80, 443], "nested": [[1, 2], []]},
                    "plain",
                    "needs: quoting",
                    "- dash",
                    "12",
                    "line\nbreak \"quoted\"",
                ],
            },
        });
        let text = to_string(&v);
        let back: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, v, "{text}");
        assert!(text.starts_with("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"));
    }
}
