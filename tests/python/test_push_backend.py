"""Runs examples/push-backend/backend.py against a live cluster.

The browser -> backend -> push flow of docs/push-api.md, end to end: real
WebSocket clients on two gateways get their client_id from the chat worker's
welcome, "log in" through the backend (which calls bind_uid and join_group
on the gateway's push API), and receive what the backend pushes
(send_to_group, send_to_uid).

Same variables as test_push_api.py: GW_API_URL, GW_API_KEY and GW_WS_URLS
(two gateways); skipped without them. Needs `websockets` (>= 12); HTTP with
urllib only.
"""

import asyncio
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

API_URL = os.environ.get("GW_API_URL", "").strip()
API_KEY = os.environ.get("GW_API_KEY", "").strip()
_RAW_URLS = os.environ.get("GW_WS_URLS", "").strip()
if not (API_URL and API_KEY and _RAW_URLS):
    pytest.skip(
        "GW_API_URL, GW_API_KEY and GW_WS_URLS must all be set to run the push "
        "backend example against a running cluster (see test_push_api.py)",
        allow_module_level=True,
    )
GW = [u.strip() for u in _RAW_URLS.split(",") if u.strip()]
if len(GW) < 2:
    raise RuntimeError(f"GW_WS_URLS must list two gateways' URLs, got {GW!r}")

import websockets  # noqa: E402

BACKEND = pathlib.Path(__file__).resolve().parents[2] / "examples" / "push-backend" / "backend.py"
RECV_TIMEOUT = float(os.environ.get("GW_RECV_TIMEOUT", "5"))
QUIET = float(os.environ.get("GW_QUIET_TIMEOUT", "0.5"))
_WS_MAJOR = int(websockets.__version__.split(".")[0])
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_async(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 25))

    return wrapper


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    def __init__(self, proc, url):
        self.proc = proc
        self.url = url

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=15) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def post(self, path, body):
        return self.request("POST", path, body)

    async def apost(self, path, body):
        return await asyncio.to_thread(self.post, path, body)


def wait_until_the_api_sees_both_gateways():
    """Right after a cluster starts, the API gateway may not be linked to the other yet."""

    async def check():
        clients = await open_clients(0, 1)
        try:
            deadline = time.monotonic() + 15
            while True:
                seen = [await asyncio.to_thread(api_is_online, c.client_id) for c in clients]
                if all(seen):
                    return
                assert time.monotonic() < deadline, f"the push API does not see both gateways: {seen}"
                await asyncio.sleep(0.2)
        finally:
            await close_all(clients)

    asyncio.run(check())


def api_is_online(client_id):
    req = urllib.request.Request(API_URL.rstrip("/") + "/v1/is_online", method="POST",
                                 data=json.dumps({"client_id": client_id}).encode(),
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with _OPENER.open(req, timeout=10) as r:
            return json.loads(r.read()).get("result") is True
    except urllib.error.HTTPError:
        return False


@pytest.fixture(scope="module")
def backend():
    wait_until_the_api_sees_both_gateways()
    port = free_port()
    env = {**os.environ, "GW_API_URL": API_URL, "GW_API_KEY": API_KEY}
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: it could fill up and block the backend
    proc = subprocess.Popen([sys.executable, str(BACKEND), str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    b = Backend(proc, f"http://127.0.0.1:{port}")

    def output():
        log.seek(0)
        return log.read()

    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"backend.py exited with {proc.returncode}: {output()}")
            try:
                if b.request("GET", "/healthz") == (200, {"status": "ok"}):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"backend.py did not answer /healthz within 10 s: {output()}")
            time.sleep(0.1)
        yield b
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Client:
    """A browser stand-in: a WebSocket connection that learns its client_id."""

    def __init__(self, ws, url):
        self.ws = ws
        self.url = url
        self.client_id = None
        self.pending = []

    @classmethod
    async def open(cls, url):
        kwargs = {"open_timeout": RECV_TIMEOUT, "close_timeout": 2}
        if _WS_MAJOR >= 15:
            kwargs["proxy"] = None
        c = cls(await websockets.connect(url, **kwargs), url)
        welcome = await c.expect(lambda m: m.get("type") == "welcome")
        c.client_id = welcome["client_id"]
        return c

    async def expect(self, pred, timeout=RECV_TIMEOUT):
        for i, m in enumerate(self.pending):
            if pred(m):
                return self.pending.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                break
            m = json.loads(raw)
            if pred(m):
                return m
            self.pending.append(m)
        raise AssertionError(f"{self.url} {self.client_id}: no matching message in {timeout}s; got {self.pending}")

    async def expect_none(self, pred, what):
        try:
            m = await self.expect(pred, QUIET)
        except AssertionError:
            return
        raise AssertionError(f"{self.client_id}: unexpected {m} ({what})")

    async def close(self):
        await self.ws.close()


async def open_clients(*gateways):
    return list(await asyncio.gather(*(Client.open(GW[g]) for g in gateways)))


async def close_all(clients):
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@run_async
async def test_login_send_notify_across_gateways(backend):
    room, other_room = unique("room"), unique("other")
    alice_name, bob_name, carol_name = unique("alice"), unique("bob"), unique("carol")
    alice, bob, carol = await open_clients(0, 1, 1)  # alice on the API gateway, bob and carol on the other
    try:
        assert alice.client_id[:12] != bob.client_id[:12], "the two URLs must be two gateways"
        for c, user, r in ((alice, alice_name, room), (bob, bob_name, room), (carol, carol_name, other_room)):
            assert await backend.apost("/login", {"client_id": c.client_id, "user": user, "room": r}) == \
                (200, {"ok": True, "user": user, "room": r})

        # /send: stored, then pushed to the room's members on both gateways.
        status, answer = await backend.apost("/send", {"room": room, "text": "hello, room", "from": alice_name})
        assert status == 200 and answer["ok"] is True and answer["delivered"] == 2, answer
        said = {"type": "said", "id": answer["id"], "room": room, "from": alice_name, "text": "hello, room"}
        for c in (alice, bob):
            assert await c.expect(lambda m: m.get("type") == "said") == said
        await carol.expect_none(lambda m: m.get("type") == "said", "a message of a room she is not in")

        status, history = await asyncio.to_thread(
            backend.request, "GET", "/history?" + urllib.parse.urlencode({"room": room}))
        assert status == 200, history
        assert [(m["from"], m["text"]) for m in history["messages"]] == [(alice_name, "hello, room")]
        assert history["messages"][0]["id"] == answer["id"]

        # /notify: only the user's connection.
        status, answer = await backend.apost("/notify", {"user": bob_name, "text": "you have mail"})
        assert (status, answer) == (200, {"ok": True, "delivered": 1})
        assert await bob.expect(lambda m: m.get("type") == "notify") == {"type": "notify", "text": "you have mail"}
        for c in (alice, carol):
            await c.expect_none(lambda m: m.get("type") == "notify", "another user's notification")
    finally:
        await close_all([alice, bob, carol])


@run_async
async def test_every_connection_of_a_user_is_notified(backend):
    room, user = unique("room"), unique("dave")
    tabs = await open_clients(0, 1)  # one user, two tabs, on two gateways
    try:
        for c in tabs:
            assert (await backend.apost("/login", {"client_id": c.client_id, "user": user, "room": room}))[0] == 200
        assert await backend.apost("/notify", {"user": user, "text": "both tabs"}) == (200, {"ok": True, "delivered": 2})
        for c in tabs:
            assert (await c.expect(lambda m: m.get("type") == "notify"))["text"] == "both tabs"
    finally:
        await close_all(tabs)


def test_login_of_a_connection_that_is_gone_is_refused(backend):
    # A well-formed client_id on no gateway of the cluster: bind_uid affects nobody.
    status, answer = backend.post("/login", {"client_id": "dead0000000000000001", "user": "u", "room": "r"})
    assert (status, answer["ok"]) == (409, False), answer


def test_bad_requests(backend):
    assert backend.post("/login", {"client_id": "c", "user": "u"})[0] == 400  # no room
    status, answer = backend.post("/login", {"client_id": "not-a-client-id", "user": "u", "room": "r"})
    assert status == 400 and answer["field"] == "client_id", answer  # refused by the push API
    assert backend.post("/send", {"room": "r", "text": ""})[0] == 400
    assert backend.request("GET", "/history")[0] == 400
    assert backend.post("/nope", {})[0] == 404
    assert backend.request("GET", "/history?room=" + unique("empty"))[1]["messages"] == []
