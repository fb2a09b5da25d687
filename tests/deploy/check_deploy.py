#!/usr/bin/env python3
"""Checks the deployment files under deploy/ against each other and the code.

    python3 tests/deploy/check_deploy.py        (needs PyYAML: pip install pyyaml)

What it checks:
  * every YAML file under deploy/ parses (all documents);
  * Kubernetes objects: apiVersion / kind / metadata.name, one namespace,
    Deployment selectors that match their pod labels, images, resources,
    restricted security contexts, the gateway's /readyz and /healthz probes on
    the API port, grace periods that cover the drain, Services that select
    some Deployment's pods and name real container ports, secret references
    that exist, $(VAR) references that are defined;
  * compose: images / builds that exist, commands that run one of the
    binaries with flags it has, --advertise / --register pointing at services,
    published ports that something listens on, stop grace periods;
  * the Dockerfile and the suggested .dockerignore;
  * TOML examples: they parse, hold only (and every one of) the fields of
    GatewayConfig / RegisterConfig in the Rust sources, with the default
    values of the Default impls, and the built binary accepts them;
  * systemd units: sections, ExecStart binaries, environment files,
    hardening, stop timeouts, `systemd-analyze verify` where available;
  * flags and GW_* variables used anywhere against the binaries' --help
    (target/debug, else target/release; skipped when neither is built).

One line per check (PASS / FAIL / SKIP, with NOTE lines for information),
then "N passed, M failed". Exits 1 if anything failed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BINARIES = ("gw-register", "gw-gateway", "gw-chat")

# Flags and variables the deploy files use before the binaries have them (the
# gateway's HTTP API is being added). Using one is reported as a NOTE, not a
# failure; once `--help` lists it, a NOTE says the entry can go.
PENDING: dict = {}

# Variables a deploy file may set that no binary reads.
UNIT_VARIABLES = {"GW_WORKER_BIN"}  # gw-worker@.service's program

# After shutdown_grace_ms the gateway waits this long for its worker links
# (crates/gw-gateway/src/lib.rs: run).
GATEWAY_LINK_CLOSE_S = 2
# The register keeps no state worth draining.
REGISTER_STOP_S = 5

LOOPBACK = ("127.", "localhost", "[::1]", "::1")


# --------------------------------------------------------------------------
# reporting


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def check(self, name: str, problems: list[str], ok_detail: str = "") -> None:
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for p in problems:
                print(f"       - {p}")
        else:
            self.passed += 1
            print(f"PASS {name}" + (f" ({ok_detail})" if ok_detail else ""))

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"SKIP {name}: {why}")

    @staticmethod
    def note(text: str) -> None:
        print(f"NOTE {text}")


R = Report()


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------
# the binaries' --help


class Help:
    def __init__(self, binary: str, text: str, path: Path) -> None:
        self.binary = binary
        self.path = path
        self.flags = {"--help", "--version", "-h", "-V"}
        self.env: set[str] = set()
        for line in text.splitlines():
            m = re.match(r"\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", line)
            if m:
                self.flags.add(m.group(1))
            self.env.update(re.findall(r"\[env: (\w+)", line))


def load_helps() -> dict[str, Help] | None:
    for d in ("target/debug", "target/release"):
        found = {b: ROOT / d / b for b in BINARIES}
        if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
            helps = {}
            for b, p in found.items():
                try:
                    out = subprocess.run(
                        [str(p), "--help"], capture_output=True, text=True, timeout=20,
                        env=clean_env(),
                    )
                except (OSError, subprocess.TimeoutExpired) as e:
                    print(f"NOTE {rel(p)} --help failed: {e}")
                    return None
                if out.returncode != 0:
                    print(f"NOTE {rel(p)} --help exited {out.returncode}")
                    return None
                helps[b] = Help(b, out.stdout, p)
            print(f"NOTE flags and variables are checked against the --help of {d}/{{{','.join(BINARIES)}}}")
            newest_src = max(
                (f.stat().st_mtime for d in ("crates", "examples") for f in (ROOT / d).rglob("*.rs")),
                default=0,
            )
            stale = [b for b, h in helps.items() if h.path.stat().st_mtime < newest_src]
            if stale:
                print(f"NOTE {', '.join(stale)} in {d} are older than some crates/ or examples/ source: "
                      "their --help may be stale (rebuild to be sure)")
            return helps
    return None


def clean_env() -> dict[str, str]:
    """The environment without GW_* variables (so they cannot change a result)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GW_")}


def check_usage(helps: dict[str, Help] | None, binary: str, flags: list[str], env: list[str]) -> tuple[list[str], list[str]]:
    """Problems and notes for flags / GW_* variables used with `binary`."""
    problems: list[str] = []
    notes: list[str] = []
    if helps is None or binary not in helps:
        return problems, notes
    h = helps[binary]
    pending = PENDING.get(binary, set())
    for f in flags:
        if f in h.flags:
            if f in pending:
                notes.append(f"{binary} now lists {f}: drop it from PENDING in {rel(Path(__file__))}")
        elif f in pending:
            notes.append(f"{binary} {f} is not in --help yet (expected: being added)")
        else:
            problems.append(f"{binary} has no flag {f} (its --help: {', '.join(sorted(h.flags))})")
    for v in env:
        if not v.startswith("GW_") or v in UNIT_VARIABLES:
            continue
        if v in h.env:
            if v in pending:
                notes.append(f"{binary} now reads {v}: drop it from PENDING in {rel(Path(__file__))}")
        elif v in pending:
            notes.append(f"{binary} does not read {v} yet (expected: being added)")
        else:
            problems.append(f"{binary} reads no variable {v} (its --help: {', '.join(sorted(h.env))})")
    return problems, notes


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if isinstance(a, str) and a.startswith("--")]


def flag_values(argv: list[str], flag: str) -> list[str]:
    """Values of `flag` in argv, written `--flag V` or `--flag=V`."""
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append(str(argv[i + 1]))
        elif isinstance(a, str) and a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out


def host_port(addr: str) -> tuple[str, int | None]:
    addr = re.sub(r"^\w+://", "", addr).rstrip("/")
    host, _, port = addr.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return host, None


def is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK)


def binds_problems(binary: str, argv: list[str], env: dict[str, str]) -> list[str]:
    """In a container nothing on loopback is reachable: the defaults
    (127.0.0.1) must be overridden where peers or clients connect."""
    problems = []

    def values(flag: str, var: str) -> list[str]:
        vs = flag_values(argv, flag)
        if not vs and var in env:
            vs = [x for x in str(env[var]).split(",") if x]
        return vs

    if binary == "gw-register":
        listen = values("--listen", "GW_LISTEN")
        if not listen or any(is_loopback(host_port(v)[0]) for v in listen):
            problems.append(f"gw-register must --listen on a non-loopback address (has {listen or 'the default 127.0.0.1:1236'})")
    elif binary == "gw-gateway":
        listen = values("--listen", "GW_LISTEN")
        if not listen or any(is_loopback(host_port(v)[0]) for v in listen):
            problems.append(f"gw-gateway must --listen on non-loopback addresses (has {listen or 'the default ws://127.0.0.1:7272'})")
        internal = values("--internal", "GW_INTERNAL")
        if not internal or is_loopback(host_port(internal[0])[0]):
            problems.append(f"gw-gateway's --internal must be non-loopback for workers in other containers (has {internal or 'the default 127.0.0.1:2900'})")
        advertise = values("--advertise", "GW_ADVERTISE")
        if internal and host_port(internal[0])[0] in ("0.0.0.0", "[::]", "::") and not advertise:
            problems.append("gw-gateway binds --internal to a wildcard address but sets no --advertise: workers would be told to dial 0.0.0.0")
    for w in values("--web", "GW_WEB"):
        if is_loopback(host_port(w)[0]):
            problems.append(f"{binary} --web {w} is unreachable from outside its container")
    return problems


# --------------------------------------------------------------------------
# the Rust sources


def struct_fields(path: Path, struct: str) -> list[str]:
    text = path.read_text()
    m = re.search(r"pub struct " + struct + r"\s*\{(.*?)\n\}", text, re.S)
    if not m:
        raise ValueError(f"no `pub struct {struct}` in {rel(path)}")
    return re.findall(r"pub (\w+):", m.group(1))


_NONE = object()


class Unknown(Exception):
    pass


def rust_consts() -> dict[str, str]:
    consts = {}
    for f in list((ROOT / "crates").rglob("*.rs")):
        for m in re.finditer(r"const (\w+): [\w:<>]+ = ([^;]+);", f.read_text()):
            consts.setdefault(m.group(1), m.group(2))
    return consts


def rust_value(expr: str, consts: dict[str, str]):
    e = expr.strip()
    if e == "None":
        return _NONE
    if e in ("Vec::new()", "vec![]"):
        return []
    if e == "String::new()":
        return ""
    if e in ("true", "false"):
        return e == "true"
    m = re.fullmatch(r"Some\((.*)\)", e, re.S)
    if m:
        return rust_value(m.group(1), consts)
    m = re.fullmatch(r"vec!\[(.*)\]", e, re.S)
    if m:
        items = [x for x in re.findall(r'"(?:[^"\\]|\\.)*"[^,]*|[^,]+', m.group(1)) if x.strip()]
        return [rust_value(x, consts) for x in items]
    m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"(?:\.into\(\)|\.to_string\(\)|\.to_owned\(\)|\.into_owned\(\))?', e)
    if m:
        return m.group(1).encode().decode("unicode_escape")
    if re.fullmatch(r"[\w:\s*()]+", e) and "*" in e or re.fullmatch(r"[\w:]+", e):
        product = 1
        for part in e.split("*"):
            part = part.strip().strip("()")
            if re.fullmatch(r"[0-9_]+(?:u\d+|usize|i\d+)?", part):
                product *= int(re.sub(r"(u\d+|usize|i\d+)$", "", part).replace("_", ""))
            elif part.split("::")[-1] in consts:
                v = rust_value(consts[part.split("::")[-1]], consts)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise Unknown(e)
                product *= v
            else:
                raise Unknown(e)
        return product
    raise Unknown(e)


def rust_defaults(path: Path, struct: str) -> dict[str, str]:
    text = path.read_text()
    m = re.search(r"impl Default for " + struct + r"\s*\{.*?" + struct + r"\s*\{(.*?)\n\s*\}\s*\n\s*\}", text, re.S)
    if not m:
        return {}
    return dict(re.findall(r"^\s*(\w+):\s*(.+?),\s*$", m.group(1), re.M))


def worker_drain_s() -> int:
    try:
        text = (ROOT / "crates/gw-worker/src/worker.rs").read_text()
        return int(re.search(r"drain_timeout: Duration::from_secs\((\d+)\)", text).group(1))
    except (OSError, AttributeError):
        return 30


def gateway_drain_s() -> float:
    try:
        d = rust_defaults(ROOT / "crates/gw-gateway/src/config.rs", "GatewayConfig")
        return rust_value(d["shutdown_grace_ms"], {}) / 1000 + GATEWAY_LINK_CLOSE_S
    except (OSError, KeyError, Unknown, TypeError):
        return 10 + GATEWAY_LINK_CLOSE_S


def drain_s(binary: str) -> float:
    if binary == "gw-gateway":
        return gateway_drain_s()
    if binary == "gw-register":
        return REGISTER_STOP_S
    return worker_drain_s()


# --------------------------------------------------------------------------
# YAML


def load_yaml_files() -> dict[Path, list]:
    loaded = {}
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        R.check("YAML files under deploy/", ["none found"])
    for p in files:
        try:
            docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        except yaml.YAMLError as e:
            R.check(f"YAML parses: {rel(p)}", [str(e)])
            continue
        problems = [] if docs else ["no documents"]
        problems += [f"document {i + 1} is not a mapping" for i, d in enumerate(docs) if not isinstance(d, dict)]
        R.check(f"YAML parses: {rel(p)}", problems, f"{len(docs)} document(s)")
        if not problems:
            loaded[p] = docs
    return loaded


# --------------------------------------------------------------------------
# Kubernetes


NAMESPACED_KINDS = {"Deployment", "Service", "Secret", "ConfigMap", "StatefulSet", "DaemonSet",
                    "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount", "Ingress", "HorizontalPodAutoscaler"}


def container_binary(c: dict) -> str | None:
    argv = (c.get("command") or []) + (c.get("args") or [])
    if argv:
        name = os.path.basename(str(argv[0]))
        if name in BINARIES:
            return name
    return None


def subset(small: dict, big: dict) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def port_of(c_list: list[dict], ref) -> int | None:
    """A probe's / Service's target port (name or number) as a container port."""
    for c in c_list:
        for p in c.get("ports") or []:
            if ref == p.get("name") or ref == p.get("containerPort"):
                return p.get("containerPort")
    return None


def check_kubernetes(files: dict[Path, list], helps: dict[str, Help] | None) -> None:
    kdir = DEPLOY / "kubernetes"
    kfiles = {p: d for p, d in files.items() if kdir in p.parents}
    if not kfiles:
        R.check("kubernetes manifests", ["no YAML under deploy/kubernetes/"])
        return
    objects: list[tuple[Path, dict]] = []
    for p, docs in sorted(kfiles.items()):
        problems = []
        names = []
        for d in docs:
            md = d.get("metadata") or {}
            for field, v in (("apiVersion", d.get("apiVersion")), ("kind", d.get("kind")), ("metadata.name", md.get("name"))):
                if not isinstance(v, str) or not v:
                    problems.append(f"an object has no {field}: {str(d)[:80]}")
            names.append(f"{d.get('kind')}/{md.get('name')}")
            objects.append((p, d))
        R.check(f"k8s objects have apiVersion, kind, metadata.name: {rel(p)}", problems, ", ".join(names))

    by_kind: dict[str, list[dict]] = {}
    for _, d in objects:
        by_kind.setdefault(d.get("kind"), []).append(d)

    # one namespace, defined by a Namespace object
    namespaces = [d["metadata"]["name"] for d in by_kind.get("Namespace", [])]
    problems = []
    if len(namespaces) != 1:
        problems.append(f"expected one Namespace object, found {namespaces}")
    else:
        for _, d in objects:
            if d.get("kind") in NAMESPACED_KINDS and (d.get("metadata") or {}).get("namespace") != namespaces[0]:
                problems.append(f"{d['kind']}/{d['metadata'].get('name')} is not in namespace {namespaces[0]}")
    R.check("k8s namespaced objects are in the manifests' Namespace", problems, namespaces[0] if len(namespaces) == 1 else "")

    secrets = {}
    for s in by_kind.get("Secret", []):
        secrets[s["metadata"]["name"]] = set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())

    deployments = by_kind.get("Deployment", [])
    if not deployments:
        R.check("k8s Deployments", ["none found"])
    binaries_seen = set()
    for dep in deployments:
        name = dep["metadata"]["name"]
        spec = dep.get("spec") or {}
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        pod = tmpl.get("spec") or {}
        containers = pod.get("containers") or []

        # selector
        problems = []
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        if not sel:
            problems.append("spec.selector.matchLabels is empty")
        elif not subset(sel, labels):
            problems.append(f"selector {sel} does not match template labels {labels}")
        for t in pod.get("topologySpreadConstraints") or []:
            ls = (t.get("labelSelector") or {}).get("matchLabels") or {}
            if not subset(ls, labels):
                problems.append(f"topologySpreadConstraints selector {ls} does not match the pods' labels")
        R.check(f"k8s Deployment/{name}: selector matches template labels", problems)

        # containers: image, resources, security
        problems = []
        if not containers:
            problems.append("no containers")
        psc = pod.get("securityContext") or {}
        for c in containers:
            cn = c.get("name", "?")
            if not c.get("name"):
                problems.append("a container has no name")
            if not c.get("image"):
                problems.append(f"container {cn} has no image")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        problems.append(f"container {cn} has no resources.{part}.{r}")
            csc = c.get("securityContext") or {}
            if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
                problems.append(f"container {cn} does not set runAsNonRoot")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"container {cn} does not set allowPrivilegeEscalation: false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"container {cn} does not drop ALL capabilities")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"container {cn} has no RuntimeDefault seccomp profile")
        R.check(f"k8s Deployment/{name}: containers have image, resources, restricted security context", problems)

        for c in containers:
            cn = c.get("name", "?")
            binary = container_binary(c)
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            env_list = c.get("env") or []
            env_names = {e.get("name") for e in env_list}
            env_plain = {e.get("name"): e.get("value") for e in env_list if "value" in e}

            # $(VAR) references and secret references
            problems = []
            for a in argv:
                for var in re.findall(r"\$\((\w+)\)", a):
                    if var not in env_names:
                        problems.append(f"{a!r} uses $({var}), which the container's env does not define (Kubernetes would pass it literally)")
            for e in env_list:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    if ref.get("name") not in secrets:
                        problems.append(f"env {e.get('name')} refers to Secret {ref.get('name')}, which the manifests do not define")
                    elif ref.get("key") not in secrets[ref.get("name")]:
                        problems.append(f"env {e.get('name')} refers to key {ref.get('key')} missing from Secret {ref.get('name')}")
            for ef in c.get("envFrom") or []:
                sref = (ef.get("secretRef") or {}).get("name")
                if sref and sref not in secrets:
                    problems.append(f"envFrom refers to Secret {sref}, which the manifests do not define")
            R.check(f"k8s Deployment/{name} container {cn}: env and secret references resolve", problems)

            if binary is None:
                R.note(f"k8s Deployment/{name} container {cn} runs {argv[:1]}, not one of {BINARIES}: flags not checked")
                continue
            binaries_seen.add(binary)

            # flags and variables exist
            if helps is None:
                R.skip(f"k8s Deployment/{name} container {cn}: flags exist in {binary} --help", "binaries not built (cargo build --workspace)")
            else:
                problems, notes = check_usage(helps, binary, flags_of(argv[1:]), sorted(n for n in env_names if n))
                for n in notes:
                    R.note(f"k8s Deployment/{name}: {n}")
                R.check(f"k8s Deployment/{name} container {cn}: flags and GW_* variables exist in {binary} --help", problems)

            # reachable bind addresses
            R.check(f"k8s Deployment/{name} container {cn}: {binary} binds non-loopback addresses", binds_problems(binary, argv[1:], env_plain))

            # grace period covers the drain
            problems = []
            need = drain_s(binary)
            pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
            if len(pre) == 2 and os.path.basename(str(pre[0])) == "sleep":
                need += float(pre[1])
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if not grace > need:
                problems.append(f"terminationGracePeriodSeconds {grace} does not exceed the {binary} stop time {need:g} s (drain + preStop)")
            R.check(f"k8s Deployment/{name}: terminationGracePeriodSeconds covers the {binary} drain", problems, f"{grace} s > {need:g} s")

            # the gateway's probes and API port
            if binary == "gw-gateway":
                problems = []
                api = flag_values(argv, "--api") or ([env_plain["GW_API"]] if "GW_API" in env_plain else [])
                if not api:
                    problems.append("the gateway runs no --api listener, but its probes need it")
                elif host_port(api[0])[1] != 8080:
                    problems.append(f"--api {api[0]} is not on port 8080")
                for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                    hg = (c.get(probe) or {}).get("httpGet")
                    if not hg:
                        problems.append(f"no {probe} with httpGet")
                        continue
                    if hg.get("path") != path:
                        problems.append(f"{probe} path is {hg.get('path')}, expected {path}")
                    if port_of(containers, hg.get("port")) != 8080:
                        problems.append(f"{probe} port {hg.get('port')} is not the container's port 8080")
                adv = flag_values(argv, "--advertise")
                if not adv or "$(POD_IP)" not in adv[0]:
                    problems.append(f"--advertise should be $(POD_IP):PORT (has {adv})")
                else:
                    pod_ip = [e for e in env_list if e.get("name") == "POD_IP"]
                    if not pod_ip or ((pod_ip[0].get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != "status.podIP":
                        problems.append("env POD_IP must come from the downward API (fieldRef status.podIP)")
                    internal = flag_values(argv, "--internal")
                    if internal and host_port(adv[0])[1] not in (0, host_port(internal[0])[1]):
                        problems.append(f"--advertise port {adv[0]} differs from --internal {internal[0]}")
                R.check(f"k8s Deployment/{name}: gateway probes /readyz and /healthz on API port 8080, advertises its pod IP", problems)

    for b in ("gw-register", "gw-gateway"):
        if b not in binaries_seen:
            R.check(f"k8s: some Deployment runs {b}", [f"no container runs {b}"])

    # Services
    templates = []
    for dep in deployments:
        t = (dep.get("spec") or {}).get("template") or {}
        templates.append((dep["metadata"]["name"], (t.get("metadata") or {}).get("labels") or {}, (t.get("spec") or {}).get("containers") or []))
    services = by_kind.get("Service", [])
    service_ports: dict[str, set[int]] = {}
    for svc in services:
        name = svc["metadata"]["name"]
        spec = svc.get("spec") or {}
        sel = spec.get("selector") or {}
        problems = []
        matched = [t for t in templates if subset(sel, t[1])]
        if not sel:
            problems.append("no selector")
        elif not matched:
            problems.append(f"selector {sel} matches no Deployment's pod labels")
        service_ports[name] = set()
        for p in spec.get("ports") or []:
            service_ports[name].add(p.get("port"))
            target = p.get("targetPort", p.get("port"))
            for dname, _, containers in matched:
                if port_of(containers, target) is None:
                    problems.append(f"port {p.get('port')} targets {target!r}, which Deployment/{dname} does not declare")
        R.check(f"k8s Service/{name}: selects a Deployment's pods and its container ports", problems,
                ", ".join(f"Deployment/{t[0]}" for t in matched))

    # --register HOST:PORT points at a Service port
    problems = []
    for dep in deployments:
        for c in ((dep.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            for reg in flag_values(argv, "--register"):
                for r in reg.split(","):
                    host, port = host_port(r)
                    svc = host.split(".")[0]
                    if svc not in service_ports or port not in service_ports[svc]:
                        problems.append(f"Deployment/{dep['metadata']['name']}: --register {r} is not a Service port ({service_ports})")
    R.check("k8s --register addresses name a Service port", problems)


# --------------------------------------------------------------------------
# compose


def parse_duration_s(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*(ms|us|h|m|s|min)?", str(v)):
        total += float(num) * {"ms": 0.001, "us": 1e-6, "h": 3600, "m": 60, "min": 60, "s": 1, None: 1, "": 1}[unit]
    return total


def compose_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): str(v) for k, v in env.items()}


def check_compose(files: dict[Path, list], helps: dict[str, Help] | None) -> None:
    cfiles = [p for p in files if p.name in ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")]
    if not cfiles:
        R.check("compose file under deploy/", ["none found"])
        return
    for cf in cfiles:
        doc = files[cf][0]
        services = doc.get("services") or {}
        label = rel(cf)
        if not services:
            R.check(f"{label}: services", ["no services"])
            continue

        # images and builds
        problems = []
        builds: dict[str, list] = {}
        for name, svc in services.items():
            if not svc.get("image") and not svc.get("build"):
                problems.append(f"service {name} has neither image nor build")
            b = svc.get("build")
            if b:
                if isinstance(b, str):
                    b = {"context": b}
                ctx = (cf.parent / b.get("context", ".")).resolve()
                if not ctx.is_dir():
                    problems.append(f"service {name}: build context {b.get('context')} does not exist")
                else:
                    df = ctx / b.get("dockerfile", "Dockerfile")
                    if not df.is_file():
                        problems.append(f"service {name}: Dockerfile {rel(df)} does not exist")
            if svc.get("image"):
                builds.setdefault(svc["image"], []).append(b)
        for image, bs in builds.items():
            if any(x is None for x in bs) and any(x is not None for x in bs):
                problems.append(f"image {image}: some services build it, others would pull it")
            elif len({repr(x) for x in bs}) > 1:
                problems.append(f"image {image} is built with different build settings")
        R.check(f"{label}: services have an image or a build that exists", problems)

        # depends_on
        problems = []
        for name, svc in services.items():
            deps = svc.get("depends_on") or []
            for d in (deps if isinstance(deps, list) else deps.keys()):
                if d not in services:
                    problems.append(f"service {name} depends on unknown service {d}")
        R.check(f"{label}: depends_on names existing services", problems)

        listens: dict[str, list[str]] = {}
        cmds: dict[str, list[str]] = {}
        problems = []
        for name, svc in services.items():
            cmd = svc.get("command")
            if isinstance(cmd, str):
                cmd = cmd.split()
            if not cmd or os.path.basename(str(cmd[0])) not in BINARIES:
                problems.append(f"service {name}: command {cmd} does not start with one of {BINARIES}")
                continue
            cmds[name] = [str(a) for a in cmd]
        R.check(f"{label}: every service runs one of the binaries", problems)

        for name, argv in cmds.items():
            binary = os.path.basename(argv[0])
            env = compose_env(services[name])
            if helps is None:
                R.skip(f"{label} service {name}: flags exist in {binary} --help", "binaries not built (cargo build --workspace)")
            else:
                problems, notes = check_usage(helps, binary, flags_of(argv[1:]), sorted(env))
                for n in notes:
                    R.note(f"{label} service {name}: {n}")
                R.check(f"{label} service {name}: flags and GW_* variables exist in {binary} --help", problems)
            R.check(f"{label} service {name}: {binary} binds non-loopback addresses", binds_problems(binary, argv[1:], env))

            # what it listens on, for published ports and --register
            ports = []
            for f in ("--listen", "--web", "--api", "--internal"):
                ports += [host_port(v)[1] for v in flag_values(argv, f)]
            listens[name] = ports

            # stop grace
            need = drain_s(binary)
            got = parse_duration_s(services[name].get("stop_grace_period")) or 10.0
            R.check(f"{label} service {name}: stop_grace_period covers the {binary} drain",
                    [] if got > need else [f"stop_grace_period {got:g} s does not exceed {need:g} s"], f"{got:g} s > {need:g} s")

        # cross references: --advertise, --register, published ports
        problems = []
        host_ports = []
        for name, argv in cmds.items():
            binary = os.path.basename(argv[0])
            if binary == "gw-gateway":
                adv = flag_values(argv, "--advertise")
                internal = flag_values(argv, "--internal")
                if not adv:
                    problems.append(f"gateway {name} sets no --advertise")
                else:
                    h, p = host_port(adv[0])
                    if h != name:
                        problems.append(f"gateway {name} advertises {adv[0]}: the host should be its service name {name}")
                    if internal and p not in (0, host_port(internal[0])[1]):
                        problems.append(f"gateway {name} advertises port {p} but --internal is {internal[0]}")
            for reg in flag_values(argv, "--register"):
                for r in reg.split(","):
                    h, p = host_port(r)
                    target = cmds.get(h)
                    if target is None or os.path.basename(target[0]) != "gw-register":
                        problems.append(f"service {name}: --register {r} is not a gw-register service")
                    elif p not in listens.get(h, []):
                        problems.append(f"service {name}: --register {r}, but {h} listens on {listens.get(h)}")
            for spec in services[name].get("ports") or []:
                s = str(spec["target"] if isinstance(spec, dict) else spec)
                container_port = int(s.split("/")[0].rsplit(":", 1)[-1])
                host_ports.append(s.split("/")[0].rsplit(":", 1)[0] if ":" in s else s)
                if container_port not in listens.get(name, []):
                    problems.append(f"service {name} publishes {s}, but listens on {listens.get(name)}")
        if len(host_ports) != len(set(host_ports)):
            problems.append(f"a host port is published twice: {host_ports}")
        R.check(f"{label}: --advertise, --register and published ports are consistent", problems)

        gws = [n for n, a in cmds.items() if os.path.basename(a[0]) == "gw-gateway"]
        chats = [n for n, a in cmds.items() if os.path.basename(a[0]) == "gw-chat"]
        regs = [n for n, a in cmds.items() if os.path.basename(a[0]) == "gw-register"]
        R.check(f"{label}: the local cluster has a register, gateways and workers",
                [] if regs and gws and chats else [f"registers {regs}, gateways {gws}, workers {chats}"],
                f"{len(regs)} register, {len(gws)} gateways, {len(chats)} chat workers")


# --------------------------------------------------------------------------
# Dockerfile and dockerignore


def workspace_binaries() -> set[str]:
    root = tomllib.loads((ROOT / "Cargo.toml").read_text())
    bins = set()
    for member in root.get("workspace", {}).get("members", []):
        for d in ROOT.glob(member):
            manifest = d / "Cargo.toml"
            if not manifest.is_file():
                continue
            m = tomllib.loads(manifest.read_text())
            explicit = [b.get("name") for b in m.get("bin", [])]
            bins.update(explicit)
            if (d / "src/main.rs").is_file() and not any(b.get("path") == "src/main.rs" for b in m.get("bin", [])):
                bins.add(m.get("package", {}).get("name"))
    return bins


def check_docker() -> None:
    df = DEPLOY / "docker" / "Dockerfile"
    if not df.is_file():
        R.check("deploy/docker/Dockerfile", ["missing"])
        return
    text = df.read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    problems = []
    if not froms or not re.match(r"FROM rust:1-bookworm AS \w+", froms[0], re.I):
        problems.append(f"first stage should be `FROM rust:1-bookworm AS <name>` (has {froms[:1]})")
    if not froms or not froms[-1].lower().startswith("from debian:bookworm-slim"):
        problems.append(f"final stage should be debian:bookworm-slim (has {froms[-1:]})")
    if not any("cargo build --release --workspace --bins" in l for l in lines if l.upper().startswith("RUN ")):
        problems.append("no RUN with `cargo build --release --workspace --bins`")
    final = lines[lines.index(froms[-1]):] if froms else []
    build = lines[: lines.index(froms[-1])] if froms else []
    build_text = " ".join(build)
    copies = " ".join(l for l in final if l.upper().startswith("COPY --FROM"))
    ws_bins = workspace_binaries()
    # gwctl ships in the image too (status and pushes from inside a pod).
    for b in BINARIES + ("gwctl",):
        if b not in ws_bins:
            problems.append(f"the workspace builds no binary {b} (it builds {sorted(ws_bins)})")
        if f"target/release/{b}" not in build_text:
            problems.append(f"the build stage does not take target/release/{b}")
        if b not in copies:
            problems.append(f"the runtime stage does not copy {b}")
    users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"the runtime stage must end as a non-root USER (has {users})")
    elif not users[-1].split(":")[0].isdigit():
        problems.append(f"USER {users[-1]}: use a numeric uid so that Kubernetes runAsNonRoot can verify it")
    R.check("deploy/docker/Dockerfile: rust:1-bookworm build, debian:bookworm-slim runtime, three daemons + gwctl, non-root", problems)

    di = DEPLOY / "docker" / "dockerignore"
    problems = []
    if not di.is_file():
        problems.append("deploy/docker/dockerignore is missing")
    else:
        patterns = [l.strip() for l in di.read_text().splitlines() if l.strip() and not l.startswith("#")]
        excl = [p.strip("/") for p in patterns if not p.startswith("!")]
        for needed in ("target", ".git"):
            if not any(fnmatch.fnmatch(needed, p) for p in excl):
                problems.append(f"does not exclude {needed}/")
        inputs = ["Cargo.toml", "Cargo.lock", "proto", "proto/gateworker/link/v1/link.proto"]
        for member in tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]:
            inputs += [member, member + "/Cargo.toml", member + "/src/main.rs", member + "/src/lib.rs"]
        inputs += [rel(p) for p in (ROOT / "examples").rglob("*") if p.is_file() and "target" not in p.parts]
        for path in inputs:
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            for p in excl:
                if any(fnmatch.fnmatch(x, p) for x in prefixes) and not any(
                    fnmatch.fnmatch(x, q[1:].strip("/")) for q in patterns if q.startswith("!") for x in prefixes
                ):
                    problems.append(f"pattern {p!r} excludes the build input {path}")
                    break
    R.check("deploy/docker/dockerignore: excludes target/ and .git, keeps the build inputs", sorted(set(problems)))


# --------------------------------------------------------------------------
# TOML


TOML_TARGETS = {
    "gateway.toml": ("gw-gateway", "crates/gw-gateway/src/config.rs", "GatewayConfig", "gateway"),
    "register.toml": ("gw-register", "crates/gw-register/src/lib.rs", "RegisterConfig", "register"),
}


def check_toml(helps: dict[str, Help] | None) -> None:
    cdir = DEPLOY / "config"
    files = sorted(cdir.glob("*.toml"))
    for want in TOML_TARGETS:
        if not (cdir / want).is_file():
            R.check(f"deploy/config/{want}", ["missing"])
    consts = rust_consts()
    for f in files:
        label = rel(f)
        text = f.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            R.check(f"TOML parses: {label}", [str(e)])
            continue
        R.check(f"TOML parses: {label}", [], f"{len(data)} keys")
        if f.name not in TOML_TARGETS:
            R.note(f"{label}: no config struct known for it; keys not checked")
            continue
        binary, src, struct, word = TOML_TARGETS[f.name]
        try:
            fields = struct_fields(ROOT / src, struct)
        except (OSError, ValueError) as e:
            R.check(f"{label}: fields of {struct}", [str(e)])
            continue
        lines = text.splitlines()
        commented = {}
        active = {}
        for i, l in enumerate(lines):
            m = re.match(r"#\s?(\w+)\s*=", l)
            if m:
                commented.setdefault(m.group(1), i)
            m = re.match(r"(\w+)\s*=", l)
            if m:
                active[m.group(1)] = i

        unknown = sorted(set(data) - set(fields))
        R.check(f"{label}: only keys {struct} knows ({src})",
                [f"unknown key {k} (the binary would refuse the file)" for k in unknown], f"{len(data)} of {len(fields)} fields set")
        missing = [k for k in fields if k not in data and k not in commented]
        R.check(f"{label}: every {struct} field is there (set, or commented out when it has no default)",
                [f"field {k} is not in the file" for k in missing])
        extra = sorted(set(commented) - set(fields))
        if extra:
            R.note(f"{label}: commented-out keys that are not {struct} fields (yet): {', '.join(extra)}")

        problems = []
        for k in fields:
            i = active.get(k, commented.get(k))
            if i is None:
                continue
            j = i - 1
            while j >= 0 and re.match(r"#\s?\w+\s*=", lines[j]):
                j -= 1
            if j < 0 or not lines[j].startswith("#"):
                problems.append(f"field {k} has no comment above it")
        R.check(f"{label}: a comment for every field", problems)

        defaults = rust_defaults(ROOT / src, struct)
        problems = []
        unknown_defaults = []
        for k in fields:
            if k not in defaults:
                unknown_defaults.append(k)
                continue
            try:
                want = rust_value(defaults[k], consts)
            except Unknown:
                unknown_defaults.append(k)
                continue
            if want is _NONE:
                if k in data:
                    problems.append(f"{k} is set, but it has no default: comment it out (the file claims to hold the defaults)")
            elif k in data and data[k] != want:
                problems.append(f"{k} = {data[k]!r}, but the default is {want!r} ({defaults[k]})")
        if unknown_defaults:
            R.note(f"{label}: defaults not compared (not understood): {', '.join(unknown_defaults)}")
        R.check(f"{label}: values are the Default impl's ({src})", problems)

        # the built binary reads it: with no secret it parses, then fails validation on `secret`.
        name = f"{label}: {binary} --config accepts it"
        if helps is None:
            R.skip(name, "binaries not built (cargo build --workspace)")
        elif data.get("secret", "") != "":
            R.skip(name, "the file sets a secret, so the daemon would start")
        else:
            try:
                out = subprocess.run([str(helps[binary].path), "--config", str(f)], capture_output=True, text=True,
                                     timeout=20, env=clean_env())
                expect = f"invalid {word} config: secret"
                ok = out.returncode == 64 and expect in out.stderr
                R.check(name, [] if ok else [f"expected exit 64 and `{expect}`, got exit {out.returncode}: {out.stderr.strip()[:400]}"])
            except subprocess.TimeoutExpired:
                R.check(name, ["the daemon did not exit (it should stop on the empty secret)"])


# --------------------------------------------------------------------------
# systemd


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    cur = None
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            cur = sections.setdefault(m.group(1), [])
            continue
        if cur is None or "=" not in line:
            raise ValueError(f"stray line: {line}")
        k, v = line.split("=", 1)
        cur.append((k.strip(), v.strip()))
    return sections


def parse_env_file(p: Path) -> tuple[dict[str, str], list[str]]:
    values, problems = {}, []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not m:
            problems.append(f"line {n}: not VAR=value: {line}")
            continue
        if re.search(r"\s#", m.group(2)) and not m.group(2).startswith('"'):
            problems.append(f"line {n}: systemd has no trailing comments; `{m.group(2)}` would be the value")
        values[m.group(1)] = m.group(2)
    return values, problems


UNITS = {
    "gw-register.service": ("gw-register", "register"),
    "gw-gateway.service": ("gw-gateway", "gateway"),
    "gw-worker@.service": ("gw-chat", "worker"),
}

HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
}


def check_systemd(helps: dict[str, Help] | None) -> None:
    sdir = DEPLOY / "systemd"
    for unit, (binary, envname) in UNITS.items():
        p = sdir / unit
        if not p.is_file():
            R.check(f"deploy/systemd/{unit}", ["missing"])
            continue
        label = rel(p)
        try:
            s = parse_unit(p.read_text())
        except ValueError as e:
            R.check(f"{label}: parses", [str(e)])
            continue
        R.check(f"{label}: has [Unit], [Service], [Install]",
                [f"no [{x}] section" for x in ("Unit", "Service", "Install") if x not in s])
        svc = s.get("Service", [])
        kv = {}
        for k, v in svc:
            kv.setdefault(k, []).append(v)

        # ExecStart -> the binary (through /usr/bin/env $VAR for the template)
        problems = []
        execs = kv.get("ExecStart", [])
        env_set = dict(v.split("=", 1) for v in kv.get("Environment", []) if "=" in v)
        argv: list[str] = []
        if len(execs) != 1:
            problems.append(f"expected one ExecStart, found {len(execs)}")
        else:
            argv = execs[0].lstrip("-@:+!").split()
            prog = argv[0]
            if prog == "/usr/bin/env" and len(argv) > 1:
                argv = argv[1:]
                prog = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env_set.get(m.group(1) or m.group(2), m.group(0)), argv[0])
                if prog == argv[0]:
                    problems.append(f"ExecStart runs {argv[0]} but the unit sets no default for it with Environment=")
            if prog != f"/usr/local/bin/{binary}":
                problems.append(f"ExecStart runs {prog}, expected /usr/local/bin/{binary}")
        R.check(f"{label}: ExecStart runs /usr/local/bin/{binary}", problems, " ".join(execs))

        if helps is not None and argv:
            problems, notes = check_usage(helps, binary, flags_of(argv[1:]), [])
            for n in notes:
                R.note(f"{label}: {n}")
            R.check(f"{label}: ExecStart flags exist in {binary} --help", problems)

        # environment file
        efs = [v.lstrip("-") for v in kv.get("EnvironmentFile", [])]
        want = f"/etc/gateworker/{envname}.env"
        R.check(f"{label}: EnvironmentFile={want}", [] if want in efs else [f"EnvironmentFile is {efs}"])
        problems = []
        for ef in efs:
            example = sdir / "env" / os.path.basename(ef).replace("%i", "1")
            if not example.is_file():
                problems.append(f"no example {rel(example)} for {ef}")
        R.check(f"{label}: every EnvironmentFile has an example in deploy/systemd/env/", problems)

        # hardening and stopping
        problems = []
        for k, v in HARDENING.items():
            if kv.get(k, [None])[-1] != v:
                problems.append(f"{k}={v} expected (has {kv.get(k)})")
        if binary == "gw-gateway" and kv.get("LimitNOFILE", [None])[-1] != "1048576":
            problems.append(f"LimitNOFILE=1048576 expected (has {kv.get('LimitNOFILE')})")
        R.check(f"{label}: hardening, Restart=on-failure, KillSignal=SIGTERM" + (", LimitNOFILE" if binary == "gw-gateway" else ""), problems)
        stop = parse_duration_s(kv.get("TimeoutStopSec", [None])[-1])
        need = drain_s(binary)
        if not stop:
            problems = ["no TimeoutStopSec: set one that covers the drain"]
        elif stop <= need:
            problems = [f"TimeoutStopSec {stop:g} s does not exceed {need:g} s"]
        else:
            problems = []
        R.check(f"{label}: TimeoutStopSec covers the {binary} drain", problems, f"{stop:g} s > {need:g} s" if stop else "")

    # env files: VAR=value lines, variables the binary reads
    env_bin = {"register": "gw-register", "gateway": "gw-gateway", "worker": "gw-chat"}
    for ef in sorted((sdir / "env").glob("*.env")):
        stem = re.sub(r"-[^-]*$", "", ef.stem) if ef.stem not in env_bin else ef.stem
        binary = env_bin.get(stem)
        values, problems = parse_env_file(ef)
        if binary is None:
            problems.append(f"no unit reads {ef.name} (expected register/gateway/worker[-N].env)")
        elif helps is not None:
            more, notes = check_usage(helps, binary, [], sorted(values))
            problems += more
            for n in notes:
                R.note(f"{rel(ef)}: {n}")
        suffix = f" and variables {binary} reads" if helps is not None and binary else ""
        R.check(f"{rel(ef)}: VAR=value lines{suffix}", problems, ", ".join(sorted(values)))

    # systemd's own parser
    sa = shutil.which("systemd-analyze")
    if not sa:
        R.skip("systemd-analyze verify", "systemd-analyze is not installed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for unit in UNITS:
            if (sdir / unit).is_file():
                dst = Path(tmp) / unit.replace("@.", "@1.")
                shutil.copy(sdir / unit, dst)
                paths.append(str(dst))
        try:
            out = subprocess.run([sa, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            R.skip("systemd-analyze verify", "timed out")
            return
        # The binaries are not installed here; everything else is a finding.
        lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
        bad = [l.replace(tmp + "/", "") for l in lines
               if not re.search(r"Command /usr/local/bin/gw-[\w-]+ is not executable", l)]
        R.check("systemd-analyze verify: the units parse without warnings", bad)


# --------------------------------------------------------------------------


def check_readme() -> None:
    p = DEPLOY / "README.md"
    if not p.is_file():
        R.check("deploy/README.md", ["missing"])
        return
    text = p.read_text()
    R.check("deploy/README.md explains each folder",
            [f"does not mention {d}/" for d in ("systemd", "config", "docker", "kubernetes") if f"{d}/" not in text])


def main() -> int:
    print(f"checking {rel(DEPLOY)}/ in {ROOT}")
    helps = load_helps()
    if helps is None:
        R.note("no built binaries in target/debug or target/release: flag checks are skipped (cargo build --workspace --bins)")
    files = load_yaml_files()
    check_kubernetes(files, helps)
    check_compose(files, helps)
    check_docker()
    check_toml(helps)
    check_systemd(helps)
    check_readme()
    if R.skipped:
        print(f"skipped: {R.skipped}")
    print(f"{R.passed} passed, {R.failed} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
