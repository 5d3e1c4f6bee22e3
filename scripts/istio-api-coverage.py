#!/usr/bin/env python3
"""Writes docs/istio-api.md: every spec field of Istio's networking API, whether meshroute
acts on it or reports it, and the test that shows it.

Input: docs/istio-api-fields.tsv (the fields of istio/api's protos, with their source).
A field is `reported` when the compiler says at its path why it has no effect (or refuses
it); REPORTED below names the words the compiler uses, which the docs test finds in the
compiler's source. Every other field `acts`, shown by the first test whose configuration
writes it, searched in this order: the conformance scenarios (run on Envoy + filter and on
`meshroute run`), the integration tests, the compiler's tests, then unit tests.

Run from the repository root: python3 scripts/istio-api-coverage.py
`docs::the_istio_api_coverage_table_has_a_row_per_field` fails when the table is stale.
"""

import glob
import re

# Field -> the words of the compiler's warning or error for it.
REPORTED = {
    "Server.bind": "bind has no effect in meshroute",
    "TrafficPolicy.tunnel": "tunnel has no effect in meshroute",
    "TrafficPolicy.TunnelSettings.protocol": "tunnel has no effect in meshroute",
    "TrafficPolicy.TunnelSettings.targetHost": "tunnel has no effect in meshroute",
    "TrafficPolicy.TunnelSettings.targetPort": "tunnel has no effect in meshroute",
    "TrafficPolicy.proxyProtocol": "proxyProtocol has no effect in meshroute",
    "TrafficPolicy.ProxyProtocol.version": "proxyProtocol has no effect in meshroute",
    "TrafficPolicy.retryBudget": "retryBudget has no effect in meshroute",
    "TrafficPolicy.RetryBudget.percent": "retryBudget has no effect in meshroute",
    "TrafficPolicy.RetryBudget.minRetryConcurrency": "retryBudget has no effect in meshroute",
    "LoadBalancerSettings.warmupDurationSecs": "a new endpoint gets its full share of requests at once",
    "LoadBalancerSettings.warmup": "a new endpoint gets its full share of requests at once",
    "WarmupConfiguration.duration": "a new endpoint gets its full share of requests at once",
    "WarmupConfiguration.minimumPercent": "a new endpoint gets its full share of requests at once",
    "WarmupConfiguration.aggression": "a new endpoint gets its full share of requests at once",
    "ConnectionPoolSettings.HTTPSettings.useClientProtocol": "useClientProtocol has no effect in meshroute",
    "OutlierDetection.consecutiveErrors": "outlier detection consecutive errors is deprecated",
    "ServerTLSSettings.TLSCertificate.caCertificates": "caCertificates of a tlsCertificates entry has no effect",
    "ServerTLSSettings.insecureSkipVerify": "insecureSkipVerify has no effect in meshroute",
    "IstioIngressListener.tls": "ingress tls is not supported by meshroute",
    "IstioIngressListener.bind": "has no effect in meshroute: every port is served on the sidecar's capture",
    "IstioIngressListener.captureMode": "has no effect in meshroute: every port is served on the sidecar's capture",
    "IstioEgressListener.bind": "has no effect in meshroute: every port is served on the sidecar's capture",
    "IstioEgressListener.captureMode": "has no effect in meshroute: every port is served on the sidecar's capture",
    "OutboundTrafficPolicy.egressProxy": "egressProxy has no effect in meshroute",
    "HTTPMatchRequest.statPrefix": "statPrefix has no effect in meshroute",
    "L4MatchAttributes.sourceSubnet": "sourceSubnet has no effect: istiod does not apply it either",
    "ServiceEntry.subjectAltNames": "subjectAltNames has no effect in meshroute",
    "WorkloadEntry.network": "network has no effect in meshroute",
    "WorkloadEntry.serviceAccount": "serviceAccount has no effect in meshroute",
    "HTTPFaultInjection.Delay.exponentialDelay": "exponentialDelay not supported yet",
    "HTTPFaultInjection.Abort.http2Error": "HTTP/2 abort fault injection not supported yet",
    "Port.targetPort": "targetPort has no impact on Gateways",
    "SidecarPort.targetPort": "targetPort has no impact on Sidecars",
    "ServiceSpec.externalIPs": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.loadBalancerIP": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.loadBalancerSourceRanges": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.loadBalancerClass": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.externalTrafficPolicy": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.healthCheckNodePort": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.allocateLoadBalancerNodePorts": "has no effect in meshroute: it exposes the Service outside the cluster",
    "KubeServicePort.nodePort": "has no effect in meshroute: it exposes the Service outside the cluster",
    "ServiceSpec.sessionAffinity": "client IP affinity is a DestinationRule consistentHash with useSourceIp",
    "ServiceSpec.sessionAffinityConfig": "client IP affinity is a DestinationRule consistentHash with useSourceIp",
    "ServiceSpec.internalTrafficPolicy": "meshroute knows no nodes, and every endpoint is used",
    "ServiceSpec.trafficDistribution": "locality preference is a DestinationRule localityLbSetting",
    "ServiceSpec.publishNotReadyAddresses": "endpoints are the WorkloadEntries given, ready or not",
    "ServiceSpec.ipFamilyPolicy": "the Service's addresses are its clusterIPs",
    "ServiceSpec.ipFamilies": "the Service's addresses are its clusterIPs",
}

# Where the search above cannot see the field (the test builds the YAML in a helper), the
# test that shows it.
SHOWN_BY = {
    "ServerTLSSettings.caCrl": "`tests/tests/all/conformance_l4.rs` `mutual_gateway_checks_names_pins_and_revocation`",
    "ServerTLSSettings.subjectAltNames": "`tests/tests/all/conformance_l4.rs` `mutual_gateway_checks_names_pins_and_revocation`",
    "ServerTLSSettings.verifyCertificateSpki": "`tests/tests/all/conformance_l4.rs` `mutual_gateway_checks_names_pins_and_revocation`",
    "ServerTLSSettings.verifyCertificateHash": "`tests/tests/all/conformance_l4.rs` `mutual_gateway_checks_names_pins_and_revocation`",
    "ServerTLSSettings.credentialNames": "`tests/tests/all/conformance_l4.rs` `gateway_serves_the_certificate_each_client_can_verify`",
    "ServerTLSSettings.tlsCertificates": "`tests/tests/all/conformance_l4.rs` `gateway_serves_the_certificate_each_client_can_verify`",
    "ServerTLSSettings.TLSCertificate.serverCertificate": "`tests/tests/all/conformance_l4.rs` `gateway_serves_the_certificate_each_client_can_verify`",
    "ServerTLSSettings.TLSCertificate.privateKey": "`tests/tests/all/conformance_l4.rs` `gateway_serves_the_certificate_each_client_can_verify`",
    "ClientTLSSettings.credentialName": "`tests/tests/all/conformance_l4.rs` `mutual_origination_from_credential_name`",
    "ClientTLSSettings.clientCertificate": "`tests/tests/all/conformance_l4.rs` `mutual_origination_from_certificate_files`",
    "ClientTLSSettings.privateKey": "`tests/tests/all/conformance_l4.rs` `mutual_origination_from_certificate_files`",
    "ClientTLSSettings.insecureSkipVerify": "`tests/tests/all/conformance_l4.rs` `tls_origination_can_skip_verification`",
    "ClientTLSSettings.caCrl": "`tests/tests/all/conformance_l4.rs` `origination_matches_spiffe_names_and_checks_revocation`",
    "WorkloadEntry.locality": "`filter/compiler/tests/balancing.rs` `locality_failover_prefers_the_nearest_healthy_endpoints`",
}

KINDS = {
    "destination_rule.proto": ["DestinationRule"],
    "gateway.proto": ["Gateway"],
    "service_entry.proto": ["ServiceEntry"],
    "sidecar.proto": ["Sidecar"],
    "virtual_service.proto": ["VirtualService"],
    "workload_entry.proto": ["WorkloadEntry", "ServiceEntry"],
    "k8s:core/v1": ["Service"],
}


def fields():
    for line in open("docs/istio-api-fields.tsv"):
        if line.startswith("#") or not line.strip():
            continue
        proto, field, typ, deprecated = (line.rstrip("\n").split("\t") + [""])[:4]
        yield proto, field, typ, deprecated == "deprecated"


def scenarios():
    """(label, text) for each conformance scenario, in file order."""
    out = []
    for path in sorted(glob.glob("tests/conformance/*.yaml")):
        if path.endswith("deviations.yaml"):
            continue
        text = open(path).read()
        parts = re.split(r"(?m)^- name: ", text)[1:]
        for part in parts:
            name = part.split("\n", 1)[0].strip()
            # Only the Istio configuration: the steps have keys of their own.
            config = re.search(r"(?ms)^  config: [^\n]*\n(.*?)(?=^  \S|\Z)", part)
            if config:
                out.append((f"conformance `{name}` ({path.split('/')[-1]})", config.group(1)))
    return out


# A test function: `#[test]`-like attributes, or the both-host tests of tests/tests/all,
# which take the host they run on.
TEST_FN = re.compile(
    r"#\[(?:test|wasm_bindgen_test[^\]]*|tokio::test[^\]]*)\]\s*(?:async\s+)?fn (\w+)\("
    r"|^fn (\w+)\(host: Host\)",
    re.M,
)


def test_fns(pattern):
    out = []
    for path in sorted(glob.glob(pattern, recursive=True)):
        text = open(path).read()
        starts = [(m.start(), m.group(1) or m.group(2)) for m in TEST_FN.finditer(text)]
        for i, (start, name) in enumerate(starts):
            # The function's body: up to its closing brace at the start of a line.
            close = text.find("\n}\n", start)
            end = close if close >= 0 else len(text)
            out.append((f"`{path}` `{name}`", text[start:end]))
    return out


def main():
    sources = [
        scenarios(),
        test_fns("tests/tests/all/*.rs"),
        test_fns("filter/compiler/tests/*.rs"),
        test_fns("host-harness/tests/*.rs"),
        test_fns("filter/**/src/**/*.rs") + test_fns("host-harness/src/**/*.rs"),
    ]
    listed = list(fields())
    # The keys a message is written under: the fields whose type it is.
    owners = {}
    for _, field, typ, _ in listed:
        owners.setdefault(typ, set()).add(field.split(".")[-1])
    rows = []
    missing = []
    for proto, field, _, deprecated in listed:
        leaf = field.split(".")[-1]
        snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), leaf)
        # Written as a YAML key (or, in unit tests, as the field of a Rust value).
        key = re.compile(r"\b(?:" + re.escape(leaf) + "|" + re.escape(snake) + r")\b\s*:")
        kinds = KINDS[proto]
        message = field.split(".")[-2]
        within = [
            re.compile(r"\b" + re.escape(o) + r"\b\s*:") for o in sorted(owners.get(message, ()))
        ]
        reported = REPORTED.get(field)
        order = sources if not reported else [sources[2]] + sources
        shown = SHOWN_BY.get(field)
        for group in [] if shown else order:
            for label, text in group:
                if not key.search(text):
                    continue
                if group is sources[0] and not any(re.search(rf"kind: {k}\b", text) for k in kinds):
                    continue
                # A nested message's field counts where the message itself is written.
                if within and not any(w.search(text) for w in within):
                    continue
                # A test that writes YAML of other kinds only does not show this kind.
                if not reported and "kind: " in text and not any(re.search(rf"kind: {k}\b", text) for k in kinds):
                    continue
                # A reported field's test names the field where it checks what is said.
                named = [leaf] + sorted(owners.get(message, ()))
                if reported and not any(
                    re.search(r"[.\"]" + re.escape(n) + r"\b", text) for n in named
                ):
                    continue
                shown = label
                break
            if shown:
                break
        if shown is None:
            missing.append(field)
            shown = "-"
        cls = "reported" if reported else "acts"
        note = f"“{reported}”" if reported else ""
        if deprecated:
            note = (note + " " if note else "") + "(deprecated in Istio)"
        rows.append((field, cls, shown, note))
    with open("docs/istio-api.md", "w") as out:
        out.write("# Istio's networking API in meshroute\n\n")
        out.write(
            "Every spec field of istio/api `networking/v1alpha3` (tag 1.30.3) and of the Kubernetes "
            "Service the registry reads (core/v1 `ServiceSpec`, and `ServicePort` as `KubeServicePort`; the list is "
            "`docs/istio-api-fields.tsv`), whether meshroute **acts** on it or **reports** it "
            "at its file, line and field path with the reason (the quoted words), and a test "
            "that shows it. Conformance scenarios run on Envoy + filter and on `meshroute run`. "
            "Fields not in the list are refused as unknown, in istiod's words. Generated by "
            "`python3 scripts/istio-api-coverage.py`; `docs::the_istio_api_coverage_table_has_a_row_per_field` "
            "fails when a field has no row, a row names no test that exists, or a reported "
            "field's words are not the compiler's.\n\n"
        )
        acts = sum(1 for r in rows if r[1] == "acts")
        out.write(f"{len(rows)} fields: {acts} act, {len(rows) - acts} are reported, 0 accepted in silence.\n\n")
        out.write("| field | class | shown by | reason |\n|---|---|---|---|\n")
        for field, cls, shown, note in rows:
            out.write(f"| `{field}` | {cls} | {shown} | {note} |\n")
    if missing:
        print("no test found for:", *missing, sep="\n  ")


if __name__ == "__main__":
    main()
