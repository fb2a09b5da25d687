"""Checks docs/openapi.yaml and docs/push-api.md against a live gateway's push API.

Needs a running cluster: a register, two gateways (the first started with
``--api HOST:PORT --api-key KEY``) and chat workers (``gw-chat``). Point the
tests at it with

    GW_API_URL=http://127.0.0.1:8080 GW_API_KEY=... \
    GW_WS_URLS=ws://127.0.0.1:7272,ws://127.0.0.1:7273 pytest tests/python/test_push_api.py

GW_WS_URLS: the first URL must be a client listener of the gateway that
serves the API, the second one of another gateway. Without the three
variables the module is skipped. GW_MAX_MESSAGE_BYTES (default 65536) must
match the API gateway's ``max_message_bytes``.

What is checked:

* every path in openapi.yaml: its example request answers the documented
  status, with a body that matches the documented schema (a small validator
  for the subset of JSON Schema the file uses; the file may use no other
  keyword) and the documented example response;
* every documented required argument really is required, and wrong types,
  empty or over-long names, bad client_ids and unknown encodings are refused
  with 400 naming the field; ``data`` over the size limit gets 413; missing
  or wrong keys 401; unknown methods 404; unreachable gateways 502 -- each
  body matching the schema documented for that status;
* the documented ``/v1/`` methods are exactly ``METHODS`` in
  crates/gw-gateway/src/api.rs;
* every ``curl`` example in push-api.md is run (parsed, not shelled out) and
  its answer compared with the response block that follows it;
* messages really arrive, as text or binary frames, on both gateways.

Every example starts from the state both documents describe: three
connections (two on the API gateway, one on the other), uids ``alice`` and
``bob``, groups ``room1`` and ``room2``, one session. The documented
client_ids and names are replaced by real, per-test unique ones on the way in
and mapped back on the way out.

Only the standard library (urllib) is used for HTTP, plus ``websockets``
(>= 12) for the clients and PyYAML for the spec. No pytest-asyncio: async
tests run their own loop.
"""

import asyncio
import base64
import functools
import json
import os
import pathlib
import re
import shlex
import urllib.error
import urllib.request
import uuid

import pytest

API_URL = os.environ.get("GW_API_URL", "").strip().rstrip("/")
API_KEY = os.environ.get("GW_API_KEY", "").strip()
_RAW_URLS = os.environ.get("GW_WS_URLS", "").strip()
if not (API_URL and API_KEY and _RAW_URLS):
    pytest.skip(
        "GW_API_URL, GW_API_KEY and GW_WS_URLS must all be set to test the push "
        "API against a running cluster, e.g. GW_API_URL=http://127.0.0.1:8080 "
        "GW_API_KEY=<the gateway's --api-key> "
        "GW_WS_URLS=ws://127.0.0.1:7272,ws://127.0.0.1:7273 (the first URL on "
        "the gateway that serves the API)",
        allow_module_level=True,
    )
GW = [u.strip() for u in _RAW_URLS.split(",") if u.strip()]
if len(GW) < 2:
    raise RuntimeError(f"GW_WS_URLS must list two gateways' URLs, got {GW!r}")

import websockets  # noqa: E402  (after the skip on purpose)
import yaml  # noqa: E402

MAX_MESSAGE_BYTES = int(os.environ.get("GW_MAX_MESSAGE_BYTES", "65536"))
RECV_TIMEOUT = float(os.environ.get("GW_RECV_TIMEOUT", "5"))
QUIET = float(os.environ.get("GW_QUIET_TIMEOUT", "0.3"))

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8"))
GUIDE = (ROOT / "docs" / "push-api.md").read_text(encoding="utf-8")
API_RS = (ROOT / "crates" / "gw-gateway" / "src" / "api.rs").read_text(encoding="utf-8")

# The example state (see the module docstring and both documents).
DOC_IDS = ["7f3a9c2b1d4e00000001", "7f3a9c2b1d4e00000002", "b28e6d0f5a1c00000001"]
DOC_NAMES = ["alice", "bob", "carol", "room1", "room2", "room3"]
# A client_id on a gateway that is not in the cluster.
DEAD_ID = "dead0000000000000001"
# Answers that cover the whole cluster: other connections may add to them,
# so the documented answer must be contained in the real one.
CLUSTER_WIDE = {
    "send_to_all", "get_client_count", "get_client_id_list", "get_client_sessions",
    "get_uid_list", "get_uid_count", "get_group_id_list", "get_all_group_uid_list",
    "get_all_group_uid_count", "get_all_group_client_id_list",
    "get_all_group_client_id_count",
}
# Answers that depend on the cluster's make-up: only their shape is compared.
SHAPE_ONLY = {"/readyz"}

_WS_MAJOR = int(websockets.__version__.split(".")[0])


def run_async(fn):
    """Runs an async test in a fresh event loop (no plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 25))

    return wrapper


# ----- HTTP (urllib only) ------------------------------------------------------

# The cluster is local: never go through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def content_type(self):
        return (self.headers.get("content-type") or "").split(";")[0].strip()

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.content_type} {self.body[:300]!r}>"


def http(method, path, body=None, *, key=API_KEY, headers=None, raw=None):
    """One request. body: JSON-encoded; raw: bytes sent as they are; key=None: no auth."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = dict(headers or {})
    if key is not None:
        h.setdefault("Authorization", f"Bearer {key}")
    req = urllib.request.Request(API_URL + path, data=data, method=method, headers=h)
    try:
        with _OPENER.open(req, timeout=15) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def api(method, body=None, **kw):
    return http("POST", f"/v1/{method}", {} if body is None else body, **kw)


def api_ok(method, body=None):
    r = api(method, body)
    assert r.status == 200, f"{method} {body}: {r!r}"
    v = r.json()
    assert v.get("ok") is True, v
    return v


async def aapi_ok(method, body=None):
    return await asyncio.to_thread(api_ok, method, body)


# ----- a small validator for the subset of JSON Schema openapi.yaml uses -------

SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum",
    "nullable", "minLength", "maxLength", "pattern", "minimum", "oneOf", "allOf",
    "$ref", "description", "example", "default",
}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def deref(obj):
    """Follows local $refs (#/components/...)."""
    while isinstance(obj, dict) and "$ref" in obj:
        ref = obj["$ref"]
        assert ref.startswith("#/"), ref
        node = SPEC
        for part in ref[2:].split("/"):
            node = node[part]
        obj = node
    return obj


def effective(schema):
    """The schema with its $ref and allOf parts merged in (for introspection)."""
    schema = deref(schema)
    out = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema.get("allOf", []):
        for k, v in effective(part).items():
            out.setdefault(k, v)
    return out


def validate(value, schema, where="$"):
    """Errors (a list of strings) of value against schema; empty when it matches."""
    schema = deref(schema)
    unknown = set(schema) - SCHEMA_KEYWORDS
    assert not unknown, f"schema at {where} uses unsupported keywords {unknown}"
    errors = []
    for part in schema.get("allOf", []):
        errors += validate(value, part, where)
    if "oneOf" in schema:
        matches = [i for i, s in enumerate(schema["oneOf"]) if not validate(value, s, where)]
        if len(matches) != 1:
            errors.append(f"{where}: matches {len(matches)} of the oneOf schemas, not exactly 1: {value!r}")
    if value is None:
        if not schema.get("nullable") and ("type" in schema or "enum" in schema):
            errors.append(f"{where}: null is not allowed")
        return errors
    t = schema.get("type")
    if t is not None and not _TYPES[t](value):
        return errors + [f"{where}: expected {t}, got {type(value).__name__} {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                errors.append(f"{where}: required key {k!r} missing")
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += validate(v, props[k], f"{where}.{k}")
            elif extra is False:
                errors.append(f"{where}: key {k!r} is not documented")
            elif isinstance(extra, dict):
                errors += validate(v, extra, f"{where}.{k}")
    return errors


def assert_valid(value, schema, what):
    errors = validate(value, schema)
    assert not errors, f"{what}: {value!r} does not match the documented schema:\n" + "\n".join(errors)


# ----- the documents ------------------------------------------------------------


def rs_methods():
    m = re.search(r"pub const METHODS: &\[&str\] = &\[(.*?)\];", API_RS, re.S)
    assert m, "METHODS not found in crates/gw-gateway/src/api.rs"
    return re.findall(r'"([^"]+)"', m.group(1))


V1_PATHS = sorted(p for p in SPEC["paths"] if p.startswith("/v1/"))
OTHER_PATHS = sorted(p for p in SPEC["paths"] if not p.startswith("/v1/"))


def post_op(path):
    return SPEC["paths"][path]["post"]


def request_media(path):
    return post_op(path)["requestBody"]["content"]["application/json"]


def response_for(op, status):
    """(schema, example) documented for this status; fails if the status is undocumented."""
    responses = op["responses"]
    assert str(status) in responses, f"status {status} is not documented (have {sorted(responses)})"
    resp = deref(responses[str(status)])
    (ctype, media), = resp["content"].items()
    example = media.get("example")
    if example is None and "examples" in media:
        example = next(iter(media["examples"].values()))["value"]
    return ctype, media["schema"], example


def request_props(path):
    schema = effective(request_media(path)["schema"])
    return {k: effective(v) for k, v in schema.get("properties", {}).items()}, schema.get("required", [])


def method_of(path):
    return path.rsplit("/", 1)[-1]


# ----- substitution of the documented ids and names -----------------------------


def substitute(value, mapping):
    """Replaces strings equal to a mapping key (values and object keys), recursively."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {mapping.get(k, k): substitute(v, mapping) for k, v in value.items()}
    return value


def compare(doc, actual, mode, where="$"):
    """Differences between a documented answer and the real one (after mapping back).

    exact: equal, except that lists of strings are compared sorted and an
    error's "message" only needs to be a string. at_least: the documented
    answer is contained in the real one (more keys, more list elements,
    larger counts). shape: same keys and JSON types.
    """
    out = []
    if isinstance(doc, dict) and isinstance(actual, dict):
        if mode != "at_least" and set(doc) != set(actual):
            return [f"{where}: keys {sorted(actual)} != documented {sorted(doc)}"]
        for k, v in doc.items():
            if k not in actual:
                out.append(f"{where}: documented key {k!r} missing")
            elif k == "message" and where.endswith("error"):
                if not isinstance(actual[k], str):
                    out.append(f"{where}.message: not a string")
            else:
                out += compare(v, actual[k], mode, f"{where}.{k}")
        return out
    if isinstance(doc, list) and isinstance(actual, list):
        if mode == "shape":
            return []
        if all(isinstance(x, str) for x in doc + actual):
            if mode == "at_least":
                missing = set(doc) - set(actual)
                return [f"{where}: missing {sorted(missing)}"] if missing else []
            return [] if sorted(doc) == sorted(actual) else [f"{where}: {actual!r} != documented {doc!r}"]
        if len(doc) != len(actual):
            return [f"{where}: {len(actual)} elements, documented {len(doc)}"]
        for i, (d, a) in enumerate(zip(doc, actual)):
            out += compare(d, a, mode, f"{where}[{i}]")
        return out
    if type(doc) is not type(actual) and not (
        isinstance(doc, (int, float)) and isinstance(actual, (int, float))
        and not isinstance(doc, bool) and not isinstance(actual, bool)
    ):
        return [f"{where}: {actual!r} is not of the documented type ({doc!r})"]
    if mode == "shape":
        return []
    if mode == "at_least" and isinstance(doc, int) and not isinstance(doc, bool):
        return [] if actual >= doc else [f"{where}: {actual} < documented {doc}"]
    return [] if doc == actual else [f"{where}: {actual!r} != documented {doc!r}"]


def assert_matches_example(doc, actual, mode, what):
    diffs = compare(doc, actual, mode)
    assert not diffs, f"{what}: the answer differs from the documented one ({mode}):\n" + "\n".join(diffs) + \
        f"\ndocumented: {json.dumps(doc)}\nactual (mapped back): {json.dumps(actual)}"


def mode_for(path):
    if path in SHAPE_ONLY:
        return "shape"
    return "at_least" if method_of(path) in CLUSTER_WIDE else "exact"


# ----- WebSocket clients and the example state ----------------------------------


class Client:
    """A WebSocket connection plus the messages received but not yet expected."""

    def __init__(self, ws, url):
        self.ws = ws
        self.url = url
        self.client_id = None
        self.pending = []

    @classmethod
    async def open(cls, url):
        kwargs = {"open_timeout": RECV_TIMEOUT, "close_timeout": 2}
        if _WS_MAJOR >= 15:
            kwargs["proxy"] = None  # websockets >= 15 honours HTTP(S)_PROXY; the cluster is local
        c = cls(await websockets.connect(url, **kwargs), url)
        welcome = await c.expect(lambda m: isinstance(m, str) and '"welcome"' in m)
        c.client_id = json.loads(welcome)["client_id"]
        return c

    async def expect(self, pred, timeout=RECV_TIMEOUT, what=None):
        """The first frame (str: text, bytes: binary) matching pred; others stay pending."""
        for i, m in enumerate(self.pending):
            if pred(m):
                return self.pending.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                m = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                break
            if pred(m):
                return m
            self.pending.append(m)
        raise AssertionError(f"{self.client_id}: nothing matching {what or pred} within {timeout}s; got {self.pending!r}")

    async def expect_none(self, pred, timeout=QUIET, what=None):
        try:
            m = await self.expect(pred, timeout)
        except AssertionError:
            return
        raise AssertionError(f"{self.client_id}: unexpected {m!r} ({what})")

    async def close(self):
        await self.ws.close()


class Scene:
    """The documented example state, made of real connections and unique names."""

    def __init__(self, clients, mapping):
        self.clients = clients
        self.fwd = mapping
        self.back = {v: k for k, v in mapping.items()}

    def to_real(self, v):
        return substitute(v, self.fwd)

    def to_doc(self, v):
        return substitute(v, self.back)

    async def close(self):
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


async def build_scene():
    clients = list(await asyncio.gather(Client.open(GW[0]), Client.open(GW[0]), Client.open(GW[1])))
    tag = uuid.uuid4().hex[:10]
    mapping = dict(zip(DOC_IDS, (c.client_id for c in clients)))
    mapping.update({n: f"{n}-{tag}" for n in DOC_NAMES})
    scene = Scene(clients, mapping)
    c1, c2, c3 = DOC_IDS
    setup = [
        ("bind_uid", {"client_id": c1, "uid": "alice"}),
        ("bind_uid", {"client_id": c2, "uid": "bob"}),
        ("bind_uid", {"client_id": c3, "uid": "bob"}),
        ("join_group", {"client_id": c1, "group": "room1"}),
        ("join_group", {"client_id": c3, "group": "room1"}),
        ("join_group", {"client_id": c1, "group": "room2"}),
        ("join_group", {"client_id": c2, "group": "room2"}),
        ("set_session", {"client_id": c3, "session": {"name": "Bob"}}),
    ]
    try:
        for method, body in setup:
            v = await aapi_ok(method, scene.to_real(body))
            assert v == {"ok": True, "affected": 1}, f"setting up the example state, {method} {body}: {v}"
    except BaseException:
        await scene.close()
        raise
    return scene


async def run_in_scene(fn):
    scene = await build_scene()
    try:
        return await fn(scene)
    finally:
        await scene.close()


_ready = False


def wait_until_ready():
    """Waits (once) until the API gateway reaches clients on both gateways."""
    global _ready
    if _ready:
        return

    async def check():
        clients = await asyncio.gather(Client.open(GW[0]), Client.open(GW[1]))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:
                online = []
                for c in clients:
                    r = await asyncio.to_thread(api, "is_online", {"client_id": c.client_id})
                    online.append(r.status == 200 and r.json().get("result") is True)
                if all(online):
                    return
                assert loop.time() < deadline, f"the push API at {API_URL} does not see clients on both gateways: {online}"
                await asyncio.sleep(0.2)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    asyncio.run(check())
    _ready = True


@pytest.fixture(autouse=True)
def _cluster_ready():
    wait_until_ready()


# ================================================================================
# The documents against each other and against api.rs
# ================================================================================


def test_documented_methods_are_exactly_api_rs_methods():
    methods = rs_methods()
    assert len(methods) == len(set(methods)), f"duplicates in METHODS: {methods}"
    documented = {method_of(p) for p in V1_PATHS}
    assert documented == set(methods), (
        f"in api.rs METHODS only: {sorted(set(methods) - documented)}; "
        f"in openapi.yaml only: {sorted(documented - set(methods))}"
    )
    assert set(OTHER_PATHS) == {"/healthz", "/readyz", "/metrics"}, OTHER_PATHS


def test_documented_error_codes_are_exactly_api_rs_codes():
    codes = set(re.findall(r'code: "([a-z_]+)"', API_RS))
    assert codes, "no error codes found in api.rs"
    documented = set(SPEC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    assert documented == codes, (
        f"in api.rs only: {sorted(codes - documented)}; in openapi.yaml only: {sorted(documented - codes)}")
    in_guide = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", GUIDE, re.M))
    assert in_guide == codes, (
        f"push-api.md's error table: missing {sorted(codes - in_guide)}, extra {sorted(in_guide - codes)}")


def test_openapi_document_is_well_formed():
    assert SPEC["openapi"] == "3.0.3"
    schemes = SPEC["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert SPEC["security"] == [{"bearerAuth": []}]
    for path in V1_PATHS:
        op = post_op(path)
        assert op["operationId"] == method_of(path)
        assert "example" in request_media(path), f"{path}: no request example"
        props, required = request_props(path)
        assert set(required) <= set(props), f"{path}: required {required} not all in {sorted(props)}"
        for status in ("200", "400", "401"):
            assert status in op["responses"], f"{path}: {status} not documented"
        if "data" in props:
            assert "413" in op["responses"], f"{path} takes data but does not document 413"
        assert_valid(request_media(path)["example"], request_media(path)["schema"], f"{path} request example")
        _, schema, example = response_for(op, 200)
        assert_valid(example, schema, f"{path} 200 example")
        for status in op["responses"]:
            if status != "200":
                ctype, schema, example = response_for(op, status)
                assert_valid(example, schema, f"{path} {status} example")
    for path in OTHER_PATHS:
        op = SPEC["paths"][path]["get"]
        assert op.get("security") == [], f"{path} must document that it needs no key"


def test_openapi_passes_openapi_spec_validator_when_installed():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(SPEC)


# ================================================================================
# openapi.yaml: every path's example, and its errors
# ================================================================================


@pytest.mark.parametrize("path", V1_PATHS)
@run_async
async def test_openapi_example_answers_as_documented(path):
    op = post_op(path)
    ctype, schema, doc_answer = response_for(op, 200)

    async def go(scene):
        r = await asyncio.to_thread(api, method_of(path), scene.to_real(request_media(path)["example"]))
        assert r.status == 200, f"{path} example: {r!r}"
        assert r.content_type == ctype, r
        body = r.json()
        assert_valid(body, schema, f"{path} answer")
        assert_matches_example(doc_answer, scene.to_doc(body), mode_for(path), path)

    await run_in_scene(go)


@pytest.mark.parametrize("path", OTHER_PATHS)
def test_openapi_health_paths_answer_without_a_key(path):
    op = SPEC["paths"][path]["get"]
    ctype, schema, example = response_for(op, 200)
    r = http("GET", path, key=None)
    assert r.status == 200, r
    assert r.content_type == ctype, r
    if ctype == "application/json":
        body = r.json()
        assert_valid(body, schema, path)
        assert_matches_example(example, body, mode_for(path), path)
    else:
        text = r.body.decode()
        assert_valid(text, schema, path)
        for line in example.splitlines():
            if line.startswith("#"):
                assert line in text.splitlines(), f"{path}: documented line {line!r} not served"
            elif line.strip():
                assert re.search(rf"^{re.escape(line.split()[0])} ", text, re.M), f"{path}: no metric {line.split()[0]}"


@pytest.mark.parametrize("path", V1_PATHS)
def test_openapi_missing_or_wrong_key_is_401(path):
    op = post_op(path)
    ctype, schema, _ = response_for(op, 401)
    example = request_media(path)["example"]
    for key, headers in [(None, None), ("wrong-key-" + API_KEY, None), (None, {"Authorization": f"bearer {API_KEY}"}),
                         (None, {"Authorization": API_KEY})]:
        r = api(method_of(path), example, key=key, headers=headers)
        assert r.status == 401, f"{path} key={key!r} headers={headers}: {r!r}"
        assert r.content_type == ctype
        body = r.json()
        assert_valid(body, schema, f"{path} 401")
        assert body["error"]["code"] == "unauthorized"


def _bad_input_cases():
    """(path, field, label, body) with one required argument missing or one bad value."""
    cases = []
    for path in V1_PATHS:
        example = request_media(path)["example"]
        props, required = request_props(path)
        for field in required:
            body = {k: v for k, v in example.items() if k != field}
            cases.append((path, field, "missing", body))
        for field, sch in props.items():
            for label, value in _bad_values(sch, recurse=method_of(path) != "batch"):
                cases.append((path, field, label, {**example, field: value}))
    return cases


def _bad_values(sch, recurse=True):
    t = sch.get("type")
    out = []
    if t == "string":
        out.append(("wrong type", 12345))
        if sch.get("minLength"):
            out.append(("empty", ""))
        if "maxLength" in sch:
            out.append(("too long", "x" * (sch["maxLength"] + 1)))
        if "pattern" in sch:
            out.append(("not matching the pattern", "NOT-A-VALID-ID"))
        if "enum" in sch:
            out.append(("not in the enum", "no-such-value"))
    elif t == "array":
        out.append(("wrong type", "not-an-array"))
        if recurse:  # a batch's ops are checked one by one (see the batch test)
            out += [(f"item {label}", [value]) for label, value in _bad_values(effective(sch["items"]))]
    elif t == "object":
        out.append(("wrong type", [1]))
    return out


def _bad_input_param(case):
    path, field, label, body = case
    marks = []
    return pytest.param(path, field, body, id=f"{method_of(path)}-{field}-{label}", marks=marks)


@pytest.mark.parametrize("path,field,body", [_bad_input_param(c) for c in _bad_input_cases()])
def test_openapi_bad_input_is_400_naming_the_field(path, field, body):
    ctype, schema, _ = response_for(post_op(path), 400)
    r = api(method_of(path), body)
    assert r.status == 400, f"{path} {json.dumps(body)[:200]}: {r!r}"
    assert r.content_type == ctype
    v = r.json()
    assert_valid(v, schema, f"{path} 400")
    assert v["error"]["code"] == "invalid_argument", v
    assert v["error"]["field"] == field, v


def _optional_cases():
    for path in V1_PATHS:
        example = request_media(path)["example"]
        _, required = request_props(path)
        for field in example:
            if field not in required:
                yield pytest.param(path, field, id=f"{method_of(path)}-{field}")


@pytest.mark.parametrize("path,field", list(_optional_cases()))
def test_openapi_optional_arguments_may_be_left_out(path, field):
    # The documented client_ids are on no live gateway: commands reach nobody.
    body = {k: v for k, v in request_media(path)["example"].items() if k != field}
    r = api(method_of(path), body)
    assert r.status == 200, f"{path} without {field}: {r!r}"


DATA_PATHS = [p for p in V1_PATHS if "data" in request_props(p)[0]]


@pytest.mark.parametrize("path", DATA_PATHS)
def test_openapi_data_over_the_limit_is_413(path):
    ctype, schema, _ = response_for(post_op(path), 413)
    example = {k: v for k, v in request_media(path)["example"].items() if k != "encoding"}
    raw = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    for body in ({**example, "data": "x" * (MAX_MESSAGE_BYTES + 1)},
                 {**example, "data": base64.b64encode(raw).decode(), "encoding": "base64"}):
        r = api(method_of(path), body)
        assert r.status == 413, f"{path}: {r!r}"
        assert r.content_type == ctype
        v = r.json()
        assert_valid(v, schema, f"{path} 413")
        assert (v["error"]["code"], v["error"].get("field")) == ("payload_too_large", "data"), v


def test_data_at_the_limit_is_accepted():
    uid = f"nobody-{uuid.uuid4().hex}"
    v = api_ok("send_to_uid", {"uid": uid, "data": "x" * MAX_MESSAGE_BYTES})
    assert v == {"ok": True, "delivered": 0}
    v = api_ok("send_to_uid", {"uid": uid, "data": base64.b64encode(b"\xff" * MAX_MESSAGE_BYTES).decode(),
                               "encoding": "base64"})
    assert v == {"ok": True, "delivered": 0}


def test_invalid_base64_is_400_on_data():
    for body in ({"uid": "u", "data": "!!", "encoding": "base64"}, {"uid": "u", "data": 5, "encoding": "base64"}):
        r = api("send_to_uid", body)
        assert r.status == 400, r
        assert r.json()["error"]["field"] == "data", r


def test_request_body_over_the_transport_limit_is_413():
    limit = 2 * MAX_MESSAGE_BYTES + 64 * 1024
    r = api("send_to_all", {"data": "x" * (limit + 1)})
    assert r.status == 413, r


def test_request_body_over_the_transport_limit_is_a_json_error():
    limit = 2 * MAX_MESSAGE_BYTES + 64 * 1024
    r = api("send_to_all", {"data": "x" * (limit + 1)})
    assert r.content_type == "application/json", r
    assert r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("path", [p for p in V1_PATHS if "502" in post_op(p)["responses"]])
def test_openapi_unreachable_gateway_is_502(path):
    ctype, schema, _ = response_for(post_op(path), 502)
    body = {**request_media(path)["example"], "client_id": DEAD_ID}
    r = api(method_of(path), body)
    if method_of(path) == "is_online":
        # Documented: a gateway that is not in the cluster at all means offline
        # (502 is for a listed gateway that cannot be reached).
        assert (r.status, r.json()) == (200, {"ok": True, "result": False}), r
        return
    assert r.status == 502, r
    assert r.content_type == ctype
    v = r.json()
    assert_valid(v, schema, f"{path} 502")
    assert v["error"]["code"] == "gateway_unavailable"
    assert v["error"]["missing_gateways"] == [DEAD_ID[:12]]


def test_a_gone_gateway_is_no_error_for_commands_and_is_online():
    """As documented: 0 affected, and offline."""
    assert api_ok("bind_uid", {"client_id": DEAD_ID, "uid": "u"}) == {"ok": True, "affected": 0}
    assert api_ok("send_to_client", {"client_id": DEAD_ID, "data": "x"}) == {"ok": True, "delivered": 0}
    assert api_ok("is_online", {"client_id": DEAD_ID}) == {"ok": True, "result": False}


def _error(r, status, code, field=None):
    assert r.status == status, r
    assert r.content_type == "application/json", r
    v = r.json()
    assert_valid(v, SPEC["components"]["schemas"]["Error"], f"{status} body")
    assert v["error"]["code"] == code, v
    assert v["error"].get("field") == field, v
    return v


def test_unknown_method_is_404_and_checked_after_the_key():
    _error(api("fly", {}), 404, "unknown_method", "method")
    _error(api("fly", {}, key=None), 401, "unauthorized")


def test_body_must_be_a_json_object():
    _error(http("POST", "/v1/get_client_count", raw=b""), 400, "malformed_json", "body")
    _error(http("POST", "/v1/bind_uid", raw=b"{not json"), 400, "malformed_json", "body")
    _error(api("bind_uid", [1]), 400, "invalid_argument", "body")
    _error(api("get_client_count", "x"), 400, "invalid_argument", "body")


def test_other_paths_and_methods_answer_404_and_405_without_a_body():
    r = http("GET", "/nope", key=None)
    assert (r.status, r.body) == (404, b""), r
    r = http("GET", "/v1/get_client_count")
    assert (r.status, r.body) == (405, b""), r


def test_batch_reports_each_op_in_order():
    tag = uuid.uuid4().hex
    big = "x" * (MAX_MESSAGE_BYTES + 1)
    v = api_ok("batch", {"ops": [
        {"op": "batch", "ops": []},
        5,
        {"uid": "u"},
        {"op": "send_to_uid", "uid": f"u-{tag}", "data": big},
        {"op": "is_uid_online", "uid": f"u-{tag}"},
    ]})
    r = v["results"]
    assert [x.get("error", {}).get("field") for x in r] == ["ops[0].op", "ops[1]", "ops[2].op", "data", None], r
    assert r[3]["error"]["code"] == "payload_too_large"
    assert r[4] == {"ok": True, "result": False}
    _, schema, _ = response_for(post_op("/v1/batch"), 200)
    assert_valid(v, schema, "batch answer")
    _error(api("batch", {"ops": {}}), 400, "invalid_argument", "ops")
    assert api_ok("batch", {"ops": []}) == {"ok": True, "results": []}


# ================================================================================
# Messages really arrive
# ================================================================================


@run_async
async def test_sends_arrive_as_text_json_and_binary_frames_on_both_gateways():
    async def go(s):
        c1, c2, c3 = s.clients
        # text, to one connection on the other gateway
        assert (await aapi_ok("send_to_client", s.to_real({"client_id": DOC_IDS[2], "data": "héllo"})))["delivered"] == 1
        assert await c3.expect(lambda m: m == "héllo") == "héllo"
        # a JSON value: its compact JSON text, to both of bob's connections
        data = {"type": "notice", "n": [1, 2.5, None, True], "s": "é"}
        assert (await aapi_ok("send_to_uid", s.to_real({"uid": "bob", "data": data})))["delivered"] == 2
        for c in (c2, c3):
            m = await c.expect(lambda m: isinstance(m, str) and '"notice"' in m)
            assert json.loads(m) == data
            compact = json.dumps(json.loads(m), separators=(",", ":"), ensure_ascii=False)
            assert len(m) == len(compact), f"not compact JSON text: {m!r}"
        # base64: a binary frame; exclude is honoured
        r = await aapi_ok("send_to_group", s.to_real(
            {"group": "room1", "data": "AAEC", "encoding": "base64", "exclude": [DOC_IDS[0]]}))
        assert r["delivered"] == 1
        assert await c3.expect(lambda m: isinstance(m, bytes)) == b"\x00\x01\x02"
        await c1.expect_none(lambda m: isinstance(m, bytes), what="excluded from the group send")
        # one copy per connection across groups
        marker = f"groups-{uuid.uuid4().hex}"
        r = await aapi_ok("send_to_groups", s.to_real({"groups": ["room1", "room2"], "data": marker}))
        assert r["delivered"] == 3
        for c in (c1, c2, c3):
            await c.expect(lambda m: m == marker)
        await c1.expect_none(lambda m: m == marker, what="a second copy")
        # close_client: the last message, then close code 4500
        assert (await aapi_ok("close_client", s.to_real({"client_id": DOC_IDS[1], "data": "bye"})))["affected"] == 1
        assert await c2.expect(lambda m: m == "bye") == "bye"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(c2.ws.recv(), RECV_TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4500, closed.value
        # its uid binding went with it
        assert (await aapi_ok("get_client_id_by_uid", s.to_real({"uid": "bob"})))["result"] == [c3.client_id]

    await run_in_scene(go)


@run_async
async def test_documented_counting_rules():
    """The `affected` / `delivered` rules stated in openapi.yaml and push-api.md."""

    async def go(s):
        c1, c2, c3 = DOC_IDS

        async def n(method, body):
            v = await aapi_ok(method, s.to_real(body))
            return v.get("affected", v.get("delivered"))

        assert await n("join_group", {"client_id": c1, "group": "room1"}) == 1  # already a member
        assert await n("leave_group", {"client_id": c2, "group": "room1"}) == 0  # not a member
        assert await n("unbind_uid", {"client_id": c2}) == 1
        assert await n("unbind_uid", {"client_id": c2}) == 0  # no uid left
        assert await n("bind_uid", {"client_id": c2, "uid": "carol"}) == 1
        assert (await aapi_ok("get_uid_by_client_id", s.to_real({"client_id": c2})))["result"] == s.fwd["carol"]
        assert await n("bind_uid", {"client_id": c1, "uid": "carol"}) == 1  # replaces alice
        assert (await aapi_ok("is_uid_online", s.to_real({"uid": "alice"})))["result"] is False
        assert await n("send_to_clients", {"client_ids": [c3, c3], "data": "twice"}) == 2
        assert await n("send_to_uids", {"uids": ["bob", "bob"], "data": "twice"}) == 2
        assert await n("send_to_uids", {"uids": [], "data": "nobody"}) == 0
        assert await n("update_session", {"client_id": c3, "session": {"name": None, "k": 1}}) == 1
        assert (await aapi_ok("get_session", s.to_real({"client_id": c3})))["result"] == {"name": None, "k": 1}
        assert await n("ungroup", {"group": "room1"}) == 2
        assert await n("ungroup", {"group": "room1"}) == 0
        assert await n("destroy_client", {"client_id": c3}) == 1
        for _ in range(50):  # the close completes on the other gateway
            if not (await aapi_ok("is_online", s.to_real({"client_id": c3})))["result"]:
                break
            await asyncio.sleep(0.1)
        assert await n("close_client", {"client_id": c3}) == 0
        assert (await aapi_ok("get_session", s.to_real({"client_id": c3})))["result"] is None
        assert (await aapi_ok("get_uid_by_client_id", s.to_real({"client_id": c3})))["result"] is None

    await run_in_scene(go)


# ================================================================================
# push-api.md: every curl example
# ================================================================================

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _guide_blocks():
    return [(m.group(1), m.group(2), GUIDE.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(GUIDE)]


def parse_curl(text):
    """method, url, headers, data of a curl command line as written in the guide."""
    argv = shlex.split(text.replace("\\\n", " "))
    assert argv and argv[0] == "curl", f"not one curl command: {text!r}"
    method, url, headers, data = None, None, {}, None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-s", "-S", "-sS", "-i"):
            pass
        elif a == "-X":
            i += 1
            method = argv[i]
        elif a == "-H":
            i += 1
            k, v = argv[i].split(":", 1)
            headers[k.strip()] = v.strip()
        elif a in ("-d", "--data"):
            i += 1
            data = argv[i]
        elif a.startswith("-"):
            raise AssertionError(f"curl option {a!r} is not understood by this test: keep the examples simple")
        else:
            assert url is None, f"two URLs in {text!r}"
            url = a
        i += 1
    assert url and url.startswith("$GW_API_URL/"), f"examples must call $GW_API_URL/...: {url!r}"
    url = url.replace("$GW_API_URL", "", 1)
    headers = {k: v.replace("$GW_API_KEY", API_KEY) for k, v in headers.items()}
    for part in [url, data or ""] + list(headers.values()):
        assert "$" not in part, f"unknown shell variable in {text!r}"
    return method or ("POST" if data is not None else "GET"), url, headers, data


def parse_response(text):
    head, _, body = text.partition("\n\n")
    m = re.match(r"HTTP/1\.1 (\d{3}) ", head)
    assert m, f"a response block must start with its status line: {text!r}"
    return int(m.group(1)), body.strip()


def guide_examples():
    blocks = _guide_blocks()
    examples = []
    for i, (lang, text, line) in enumerate(blocks):
        if "curl" in text:
            assert lang == "sh", f"push-api.md:{line}: a curl example must be in a sh block"
            assert i + 1 < len(blocks) and blocks[i + 1][0] == "http", \
                f"push-api.md:{line}: a curl example must be followed by its http response block"
            examples.append((line, text, blocks[i + 1][1]))
        elif lang == "http":
            assert i > 0 and "curl" in blocks[i - 1][1], f"push-api.md:{line}: a response without its curl example"
    return examples


GUIDE_EXAMPLES = guide_examples()


def test_guide_has_a_curl_example_for_every_method():
    answered = set()
    for _, curl, response in GUIDE_EXAMPLES:
        _, url, _, _ = parse_curl(curl)
        status, _ = parse_response(response)
        if url.startswith("/v1/") and status == 200:
            answered.add(method_of(url))
    missing = set(rs_methods()) - answered
    assert not missing, f"push-api.md has no successful curl example for {sorted(missing)}"
    for path in OTHER_PATHS:
        assert any(parse_curl(c)[1] == path for _, c, _ in GUIDE_EXAMPLES), f"no curl example for {path}"


@pytest.mark.parametrize(
    "line,curl,response", GUIDE_EXAMPLES,
    ids=[f"line{line}-{parse_curl(c)[1].strip('/').replace('/', '-')}" for line, c, _ in GUIDE_EXAMPLES])
@run_async
async def test_guide_curl_example_answers_as_shown(line, curl, response):
    method, url, headers, data = parse_curl(curl)
    status, doc_body = parse_response(response)

    async def go(scene):
        raw = None
        if data is not None:
            try:
                raw = json.dumps(scene.to_real(json.loads(data))).encode()
            except ValueError:
                raw = data.encode()  # a deliberately malformed body
        r = await asyncio.to_thread(http, method, url, key=None, headers=headers, raw=raw)
        where = f"push-api.md:{line} ({method} {url})"
        assert r.status == status, f"{where}: documented {status}, got {r!r}"
        if url == "/metrics":
            text = r.body.decode()
            for doc_line in doc_body.splitlines():
                if doc_line.startswith("#"):
                    assert doc_line in text.splitlines(), f"{where}: {doc_line!r} not served"
            return
        assert r.content_type == "application/json", f"{where}: {r!r}"
        actual = scene.to_doc(r.json()) if scene else r.json()
        assert_matches_example(json.loads(doc_body), actual, mode_for(url), where)
        # ... and the answer is what openapi.yaml documents for that status.
        if url.startswith("/v1/"):
            op = post_op(url) if url in SPEC["paths"] else None
            schema = response_for(op, status)[1] if op else SPEC["components"]["schemas"]["Error"]
            assert_valid(r.json(), schema, where)

    if url.startswith("/v1/"):
        await run_in_scene(go)
    else:
        await go(None)
