//! Compile time at 100, 1,000 and 10,000 services, each with a VirtualService and a
//! DestinationRule. Run: `cargo bench -p meshroute-compiler --bench compile`.

use std::fmt::Write as _;

use meshroute_compiler::{compile, Config, MeshOptions, ProxyOptions};

fn main() {
    divan::main();
}

fn config_text(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: default}}\nspec:\n  selector: {{app: svc{i}}}\n  ports: [{{name: http, port: 8080}}]\n---\n\
apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc{i}}}\nspec:\n  host: svc{i}\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc{i}}}\nspec:\n  hosts: [svc{i}]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route:\n    - destination: {{host: svc{i}, subset: v2}}\n  - route:\n    - destination: {{host: svc{i}, subset: v1}}\n      weight: 90\n    - destination: {{host: svc{i}, subset: v2}}\n      weight: 10\n---\n"
        );
    }
    s
}

/// Loading (YAML parse with positions) of the whole configuration.
#[divan::bench(args = [100, 1_000, 10_000], sample_count = 5)]
fn load(bencher: divan::Bencher<'_, '_>, n: usize) {
    let text = config_text(n);
    bencher.bench(|| {
        let mut c = Config::default();
        c.add_text("bench.yaml", &text);
        c
    });
}

/// Validation, resolution and lowering of already loaded objects.
#[divan::bench(args = [100, 1_000, 10_000], sample_count = 5)]
fn validate_and_lower(bencher: divan::Bencher<'_, '_>, n: usize) {
    let text = config_text(n);
    let mut c = Config::default();
    c.add_text("bench.yaml", &text);
    bencher.bench(|| compile(&c, &ProxyOptions::default(), &MeshOptions::default()));
}
