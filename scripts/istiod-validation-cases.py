#!/usr/bin/env python3
"""Turn istiod's validation test tables into YAML cases meshroute can validate.

Reads istio/istio's pkg/config/validation/validation_test.go (Go struct literals of the
networking types) and the YAML cases under pkg/config/validation/testdata/crds, and writes
tests/istio/validation/istiod-cases.yaml: one entry per case with its source line, whether
istiod accepts it, istiod's expected error words where the test names them, and the object as
Kubernetes YAML. Cases whose input cannot be written as YAML (nil inputs, Go variables, wrong
message types) are counted and left out.

Usage: scripts/istiod-validation-cases.py ISTIO_REPO_GIT_DIR COMMIT
"""

import base64
import re
import subprocess
import sys

import yaml

OUT = "tests/istio/validation/istiod-cases.yaml"
MESSAGES_OUT = "tests/istio/validation/istiod-messages.txt"
# Where istiod's validation messages are written.
MESSAGE_SOURCES = [
    "pkg/config/validation/validation.go",
    "pkg/config/validation/validation_istiod.go",
    "pkg/config/validation/virtualservice.go",
    "pkg/config/validation/header_value_validator.go",
    "pkg/config/validation/agent/validation.go",
    "pkg/config/labels/instance.go",
    "pkg/config/security/security.go",
]
# The CRDs' own rules (x-kubernetes-validations), which the API server checks first.
CRD_SCHEMA = "manifests/charts/base/files/crd-all.gen.yaml"

# Test function -> (input field, verdict field, kind, how the input sits in the object).
# The verdict field is `valid` (a bool) or `out` (istiod's error words, "" when valid).
TESTS = {
    "TestValidateGateway": ("in", "out", "Gateway", lambda x: x),
    "TestValidateServer": ("in", "out", "Gateway", lambda x: {"selector": {"istio": "ingressgateway"}, "servers": [x]}),
    "TestValidateTlsOptions": ("in", "out", "Gateway", lambda x: {"servers": [{
        "port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"], "tls": x}]}),
    "TestValidateCORSPolicy": ("in", "valid", "VirtualService", lambda x: vs({"corsPolicy": x})),
    "TestValidateHTTPFaultInjectionAbort": ("in", "valid", "VirtualService", lambda x: vs({"fault": {"abort": x}})),
    "TestValidateHTTPFaultInjectionDelay": ("in", "valid", "VirtualService", lambda x: vs({"fault": {"delay": x}})),
    "TestValidateHTTPRetry": ("in", "valid", "VirtualService", lambda x: vs({"retries": x})),
    "TestValidateHTTPRewrite": ("in", "valid", "VirtualService", lambda x: vs({"rewrite": x})),
    "TestValidateHTTPRedirect": ("redirect", "valid", "VirtualService", lambda x: vs({"redirect": x}, route=False)),
    "TestValidateHTTPDirectResponse": ("directResponse", "valid", "VirtualService",
                                       lambda x: vs({"directResponse": x}, route=False)),
    "TestValidateHTTPRoute": ("route", "valid", "VirtualService", lambda x: {"hosts": ["foo.bar"], "http": [x]}),
    "TestValidateVirtualService": ("in", "valid", "VirtualService", lambda x: x),
    "TestValidateWorkloadEntry": ("in", "valid", "WorkloadEntry", lambda x: x),
    "TestValidateDestinationRule": ("in", "valid", "DestinationRule", lambda x: x),
    "TestValidateTrafficPolicy": ("in", "valid", "DestinationRule", lambda x: {"host": "reviews", "trafficPolicy": x}),
    "TestValidateConnectionPool": ("in", "valid", "DestinationRule",
                                   lambda x: {"host": "reviews", "trafficPolicy": {"connectionPool": x}}),
    "TestValidateLoadBalancer": ("in", "valid", "DestinationRule",
                                 lambda x: {"host": "reviews", "trafficPolicy": {"loadBalancer": x}}),
    "TestValidateOutlierDetection": ("in", "valid", "DestinationRule",
                                     lambda x: {"host": "reviews", "trafficPolicy": {"outlierDetection": x}}),
    "TestValidateServiceEntries": ("in", "valid", "ServiceEntry", lambda x: x),
    "TestValidateSidecar": ("in", "valid", "Sidecar", lambda x: x),
}

# Messages whose Go type is the kind itself (cases of a wrong type are left out).
KIND_TYPES = {"Gateway", "VirtualService", "WorkloadEntry", "DestinationRule", "ServiceEntry", "Sidecar"}
CRD_FILES = ["destinationrule", "serviceentry", "workloadentry"]


def vs(fields, route=True):
    http = dict(fields)
    if route:
        http = {"route": [{"destination": {"host": "foo.baz"}}], **http}
    return {"hosts": ["foo.bar"], "http": [http]}


class Unconvertible(Exception):
    pass


TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:\\.|[^"\\])*"|`[^`]*`)
  | (?P<num>\d+\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|0x[0-9a-fA-F]+)
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<rune>'(?:\\.|[^'\\])*')
  | (?P<op>:=|==|!=|<=|>=|&&|\|\||[{}()\[\],:&*+\-/.=!<>;%|^])
""", re.S | re.X)


def tokens(src):
    pos, out = 0, []
    while pos < len(src):
        m = TOKEN.match(src, pos)
        if not m:
            raise ValueError(f"cannot tokenize at {src[pos:pos + 40]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group(kind), src.count("\n", 0, m.start()) + 1))
    return out


TIME = {"time.Nanosecond": 1, "time.Microsecond": 10**3, "time.Millisecond": 10**6,
        "time.Second": 10**9, "time.Minute": 60 * 10**9, "time.Hour": 3600 * 10**9}
WRAPPERS = ("wrapperspb.", "wrappers.", "types.")


class Parser:
    def __init__(self, toks, i=0):
        self.t, self.i = toks, i

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("eof", "", 0)

    def take(self, value=None):
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r} at line {tok[2]}, got {tok[1]!r}")
        self.i += 1
        return tok

    def skip_braces(self):
        depth = 0
        while True:
            v = self.take()[1]
            if v == "{":
                depth += 1
            elif v == "}":
                depth -= 1
                if depth == 0:
                    return

    def type_expr(self):
        """A composite literal's type: `[]*networking.X`, `map[string]*X`, `networking.X`."""
        parts = []
        while True:
            kind, v, _ = self.peek()
            if v in ("[", "]", "*"):
                parts.append(self.take()[1])
            elif kind == "id" and v == "map":
                parts.append(self.take()[1])
            elif kind == "id":
                parts.append(self.take()[1])
                if self.peek()[1] != "]":
                    return "".join(parts)
            else:
                return "".join(parts)

    def value(self, elided=None):
        """A Go expression as a Python value; `Unconvertible` when it is not plain data."""
        kind, v, line = self.peek()
        if v == "&":
            self.take()
            return self.value(elided)
        if v == "{":
            return self.composite(elided)
        if v == "-":
            self.take()
            return -self.value()
        if kind == "str":
            self.take()
            return self.expr_rest(go_string(v))
        if kind == "num":
            self.take()
            n = float(v) if "." in v or "e" in v.lower() else int(v, 0)
            return self.expr_rest(n)
        if kind == "id":
            if v in ("true", "false"):
                self.take()
                return v == "true"
            if v == "nil":
                self.take()
                return None
            if v in TIME:
                self.take()
                return self.expr_rest(Nanos(TIME[v]))
            if v == "durationpb.New":
                self.take()
                self.take("(")
                d = self.value()
                self.take(")")
                return duration(int(d))
            if v.startswith(WRAPPERS) and self.peek(1)[1] == "(":
                self.take()
                self.take("(")
                x = self.value()
                self.take(")")
                return Wrapped(x)
            if v in ("int", "int32", "int64", "uint32", "uint64", "float64", "float32") and self.peek(1)[1] == "(":
                self.take()
                self.take("(")
                x = self.value()
                self.take(")")
                return self.expr_rest(x)
            if v.startswith(("[", "map")) or self.peek(1)[1] == "{" or v.startswith("networking.") and "{" == self.peek(1)[1]:
                pass
            if self.peek(1)[1] in ("{", "[") or v == "map":
                typ = self.type_expr()
                return self.composite(typ)
            if self.peek(1)[1] == "(":
                raise Unconvertible(f"call {v} at line {line}")
            self.take()
            return enum_value(v, line)
        if v == "[":
            typ = self.type_expr()
            if typ == "[]byte" and self.peek()[1] == "(":
                self.take("(")
                x = self.value()
                self.take(")")
                return base64.b64encode(str(x).encode()).decode()
            return self.composite(typ)
        raise Unconvertible(f"{v!r} at line {line}")

    def expr_rest(self, x):
        while self.peek()[1] in ("*", "/", "+"):
            op = self.take()[1]
            y = self.value()
            if op == "*":
                x = Nanos(int(x) * int(y)) if isinstance(x, Nanos) or isinstance(y, Nanos) else x * y
            elif op == "/":
                x = int(x) // int(y)
            else:
                x = x + y
        return x

    def composite(self, typ):
        """`{...}` of type `typ` (None when elided: the element type of the enclosing one)."""
        if typ and typ.startswith("[]"):
            elem = typ[2:].lstrip("*")
            self.take("{")
            items = []
            while self.peek()[1] != "}":
                x = self.value(elem)
                items.append({} if x is None else x)
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
            return items
        if typ and typ.startswith("map["):
            elem = typ.split("]", 1)[1].lstrip("*")
            self.take("{")
            out = {}
            while self.peek()[1] != "}":
                k = self.value()
                self.take(":")
                out[str(k)] = self.value(elem)
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
            return out
        self.take("{")
        fields = {}
        while self.peek()[1] != "}":
            if self.peek()[0] == "id" and self.peek(1)[1] == ":":
                name = self.take()[1]
                self.take(":")
                fields[name] = self.value(None)
            else:
                fields.setdefault("_positional", []).append(self.value(None))
            if self.peek()[1] == ",":
                self.take()
        self.take("}")
        return message(typ or "", fields)


class Nanos(int):
    pass


class Wrapped:
    """A wrapper message's value: set even when it is zero."""

    def __init__(self, value):
        self.value = value


class Msg(dict):
    """A converted message; `go_type` is its Go type name, without the package."""

    go_type = ""


def go_string(lit):
    if lit.startswith("`"):
        return lit[1:-1]
    return bytes(lit[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def duration(nanos):
    s, ns = divmod(int(nanos), 10**9)
    return f"{s}s" if ns == 0 else f"{s}.{ns:09d}".rstrip("0") + "s"


def enum_value(ident, line):
    name = ident.split(".")[-1]
    parts = name.split("_")
    for i in range(1, len(parts)):
        if re.search("[a-z]", parts[i - 1]) and all(re.fullmatch("[A-Z0-9]+", p) for p in parts[i:]):
            return "_".join(parts[i:])
    raise Unconvertible(f"identifier {ident} at line {line}")


def json_name(go_field):
    go_field = go_field.rstrip("_")  # Go's suffix on names that are keywords (`String_`)
    return go_field[0].lower() + go_field[1:]


def message(typ, fields):
    short = typ.split(".")[-1]
    if typ.startswith(WRAPPERS) or short.endswith("Value") and set(fields) == {"Value"}:
        return Wrapped(fields.get("Value", 0))
    if short == "Duration" and typ.startswith(("durationpb", "duration", "types")):
        return duration(int(fields.get("Seconds", 0)) * 10**9 + int(fields.get("Nanos", 0)))
    if "_positional" in fields:
        return fields  # a test case, mapped onto its struct's fields by the caller
    out = Msg()
    out.go_type = short
    for name, x in fields.items():
        if x is None or x in ("", 0, False, []) and not isinstance(x, Wrapped):
            continue  # proto3: a zero scalar is an unset field
        if isinstance(x, Msg) and is_oneof_wrapper(x):
            out.update(x)  # the oneof's name is not a JSON field; its chosen member is
            continue
        out[json_name(name)] = x
    return out


def is_oneof_wrapper(m):
    go_type = m.go_type.rstrip("_")
    suffix = go_type.rsplit("_", 1)[-1] if "_" in go_type else None
    return bool(suffix) and len(m) == 1 and json_name(suffix) in m


def plain(x):
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    if isinstance(x, Wrapped):
        return plain(x.value)
    if isinstance(x, Nanos):
        return int(x)
    return x


def struct_fields(p):
    """The field names of `[]struct{ ... }{` at the parser's position."""
    p.take("[")
    p.take("]")
    p.take("struct")
    p.take("{")
    names = []
    while p.peek()[1] != "}":
        line = p.peek()[2]
        group = [p.take()[1]]
        while p.peek()[1] == ",":
            p.take()
            group.append(p.take()[1])
        p.type_expr()
        while p.peek()[2] == line and p.peek()[1] != "}":
            p.take()
        names.extend(group)
    p.take("}")
    return names


def go_cases(src, path):
    toks = tokens(src)
    cases, skipped = [], {}
    i = 0
    while i < len(toks):
        kind, v, _ = toks[i]
        if kind == "id" and v in TESTS and i > 0 and toks[i - 1][1] == "func":
            test = v
            field, verdict, kind_name, wrap = TESTS[test]
            j = i
            while not (toks[j][1] == "[" and toks[j + 1][1] == "]" and toks[j + 2][1] == "struct"):
                j += 1
            p = Parser(toks, j)
            names = struct_fields(p)
            p.take("{")
            while p.peek()[1] != "}":
                line = p.peek()[2]
                start = p.i
                try:
                    raw = p.composite(None)
                    case = dict(zip(names, raw.pop("_positional", [])))
                    case.update({json_name(k): x for k, x in raw.items()})
                    if case.get(field) is None:
                        raise Unconvertible("nil input")
                    obj = case[field]
                    go_type = getattr(obj, "go_type", "")
                    if wrap(obj) is obj and go_type != kind_name:
                        raise Unconvertible(f"input of type {go_type}")
                    if verdict == "valid":
                        valid, words = bool(case.get("valid")), None
                    else:
                        words = case.get("out") or None
                        valid = words is None
                    cases.append({
                        "source": f"{path}:{line}",
                        "test": f"{test}/{case.get('name', '')}",
                        "valid": valid,
                        **({"words": words} if words else {}),
                        "yaml": to_yaml(kind_name, plain(wrap(obj)), plain(case.get("labels"))),
                    })
                except (Unconvertible, ValueError) as e:
                    reason = str(e).split(" at line")[0]
                    skipped[reason] = skipped.get(reason, 0) + 1
                    p.i = start
                    p.skip_braces()
                if p.peek()[1] == ",":
                    p.take()
            i = p.i
        i += 1
    return cases, skipped


def to_yaml(kind, spec, labels=None):
    api = "networking.istio.io/v1"
    meta = {"name": "c", "namespace": "default", **({"labels": labels} if labels else {})}
    doc = {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def crd_cases(repo, commit):
    out = []
    for name in CRD_FILES:
        for verdict in ("valid", "invalid"):
            path = f"pkg/config/validation/testdata/crds/{name}-{verdict}.yaml"
            text = git_show(repo, commit, path)
            line = 1
            for chunk in re.split(r"^---\s*$", text, flags=re.M):
                start = line
                line += chunk.count("\n") + (1 if start > 1 or chunk.startswith("\n") else 0)
                doc = yaml.safe_load(chunk)
                if not doc:
                    continue
                words = doc.pop("_err", None)
                out.append({
                    "source": f"{path}:{start}",
                    "test": f"TestCRDs/{name}-{verdict}/{doc['metadata']['name']}",
                    "valid": verdict == "valid",
                    **({"words": words} if words else {}),
                    "yaml": yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100),
                })
    return out


class Dumper(yaml.SafeDumper):
    """Writes each case's YAML as a literal block, as it would sit in a file."""


Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def git_show(repo, commit, path):
    return subprocess.run(["git", "--git-dir", repo, "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def messages(repo, commit):
    """The fixed words of istiod's error and warning messages: each literal of an
    Errorf/Warningf/errors.New call, cut at its format verbs, pieces of two words or more."""
    out = set()
    call = re.compile(r'(?:Errorf|Warningf|errors\.New|Sprintf|fmt\.Errorf)\(\s*"((?:\\.|[^"\\])*)"')
    for path in MESSAGE_SOURCES:
        for lit in call.findall(git_show(repo, commit, path)):
            for piece in re.split(r"%[-+# 0-9.]*[a-zA-Z]|\\n", lit):
                piece = piece.strip(" :;,.()'\"=")
                if len(piece) >= 10 and " " in piece:
                    out.add(piece)
    def walk(node):
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations") or []:
                if isinstance(rule, dict) and rule.get("message"):
                    out.add(" ".join(rule["message"].split()))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    for doc in yaml.safe_load_all(git_show(repo, commit, CRD_SCHEMA)):
        walk(doc)
    return sorted(out)


def main():
    repo, commit = sys.argv[1], sys.argv[2]
    path = "pkg/config/validation/validation_test.go"
    cases, skipped = go_cases(git_show(repo, commit, path), path)
    cases += crd_cases(repo, commit)
    header = (
        f"# istiod's validation test cases as YAML, from istio/istio commit {commit}.\n"
        "# Generated by scripts/istiod-validation-cases.py; checked by\n"
        "# filter/compiler/tests/istiod_table.rs. `valid` is istiod's verdict, `words` the error\n"
        "# words istiod's test expects. Left out (input not writable as YAML): "
        + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) + ".\n"
    )
    with open(OUT, "w") as f:
        f.write(header)
        yaml.dump(cases, f, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)
    words = messages(repo, commit)
    with open(MESSAGES_OUT, "w") as f:
        f.write(f"# The fixed words of istiod's validation messages, from istio/istio commit {commit}\n")
        f.write("# (" + ", ".join(MESSAGE_SOURCES + [CRD_SCHEMA]) + ");\n")
        f.write("# generated by scripts/istiod-validation-cases.py.\n")
        f.writelines(w + "\n" for w in words)
    print(f"{len(words)} message pieces", file=sys.stderr)
    print(f"{len(cases)} cases, left out {sum(skipped.values())}: {skipped}", file=sys.stderr)


if __name__ == "__main__":
    main()
