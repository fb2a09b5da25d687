"""Chat-protocol clients for the multi-host test (tests/multihost/run.sh).

Run inside the client network namespace; it connects to the gateways by their
test-subnet addresses, never loopback:

    GWA_URL=ws://10.213.0.21:7272 GWB_URL=ws://10.213.0.22:7272 python3 clients.py

Prints one `PASS: <check>` or `FAIL: <check>: <reason>` line per check (always
the same set of checks, so the caller can count them) and exits 0 only when
every check passed. Needs only `websockets` (>= 12).
"""

import asyncio
import json
import os
import sys
import uuid

import websockets

GWA = os.environ["GWA_URL"]
GWB = os.environ["GWB_URL"]
RECV_TIMEOUT = float(os.environ.get("GW_RECV_TIMEOUT", "5"))
TOTAL_TIMEOUT = float(os.environ.get("GW_CLIENTS_TIMEOUT", "40"))
_WS_MAJOR = int(websockets.__version__.split(".")[0])

results = []  # (ok, name, reason)


def report(ok, name, reason=""):
    results.append((ok, name, reason))
    print(f"PASS: {name}" if ok else f"FAIL: {name}: {reason}", flush=True)


class Client:
    def __init__(self, name, url, ws):
        self.name, self.url, self.ws = name, url, ws
        self.client_id = None
        self.pending = []

    @classmethod
    async def open(cls, name, url):
        kwargs = {"open_timeout": RECV_TIMEOUT, "close_timeout": 2}
        if _WS_MAJOR >= 15:
            kwargs["proxy"] = None  # never go through an HTTP(S)_PROXY from the environment
        c = cls(name, url, await websockets.connect(url, **kwargs))
        welcome = await c.expect(lambda m: m.get("type") == "welcome", "welcome")
        if set(welcome) != {"type", "client_id"} or not isinstance(welcome["client_id"], str):
            raise AssertionError(f"bad welcome {welcome!r}")
        c.client_id = welcome["client_id"]
        return c

    async def send(self, obj):
        await self.ws.send(json.dumps(obj))

    async def expect(self, pred, what, timeout=RECV_TIMEOUT):
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
            if not isinstance(raw, str):
                raise AssertionError(f"binary frame {raw!r}")
            m = json.loads(raw)
            if not isinstance(m, dict):
                raise AssertionError(f"non-object message {raw!r}")
            if pred(m):
                return m
            self.pending.append(m)
        raise AssertionError(
            f"client {self.name} ({self.client_id} on {self.url}): no {what} within "
            f"{timeout}s; unmatched messages: {self.pending!r}"
        )

    async def expect_exact(self, expected, what):
        keys = ("room", "from", "uid")
        m = await self.expect(
            lambda m: m.get("type") == expected["type"]
            and all(m.get(k) == expected[k] for k in keys if k in expected),
            what,
        )
        if m != expected:
            raise AssertionError(f"got {m!r}, expected exactly {expected!r}")
        return m

    async def count(self, room):
        await self.send({"type": "count", "room": room})
        m = await self.expect(
            lambda m: m.get("type") == "count" and m.get("room") == room, "count reply"
        )
        if set(m) != {"type", "room", "clients", "online"}:
            raise AssertionError(f"count reply has wrong fields: {m!r}")
        return m


async def check(name, coro_fn):
    try:
        await coro_fn()
    except Exception as e:  # noqa: BLE001  (report every failure as a FAIL line)
        report(False, name, f"{type(e).__name__}: {e}")
        return False
    report(True, name)
    return True


async def scenario():
    tag = uuid.uuid4().hex[:10]
    room, uid_a, uid_b = f"room-{tag}", f"alice-{tag}", f"bob-{tag}"
    c = {}

    async def open_a():
        c["a"] = await Client.open("A", GWA)

    async def open_b():
        c["b"] = await Client.open("B", GWB)

    ok_a = await check(f"client A connects to gateway A ({GWA}) and gets a welcome", open_a)
    ok_b = await check(f"client B connects to gateway B ({GWB}) and gets a welcome", open_b)
    later = [
        "A and B are on different gateways (client_id gateway prefixes differ)",
        f"A and B join room {room!r} (joined replies)",
        "A says in the room -> B (other gateway) receives `said` with exact fields",
        "A says in the room -> A receives its own `said` with exact fields",
        "A and B log in as different uids (logged_in replies)",
        "A whispers to B's uid across gateways -> B receives exact `whisper`",
        "B whispers to A's uid across gateways -> A receives exact `whisper`",
        "count from A: clients=2 in the room, online>=2",
        "count from B: clients=2 in the room, online>=2",
    ]
    if not (ok_a and ok_b):
        for name in later:
            report(False, name, "not run: a client could not connect")
        return
    a, b = c["a"], c["b"]

    async def different_gateways():
        pa, pb = a.client_id[:12], b.client_id[:12]
        if pa == pb:
            raise AssertionError(f"both client ids start with gateway id {pa!r}: {a.client_id}, {b.client_id}")

    async def join():
        for cl in (a, b):
            await cl.send({"type": "join", "room": room})
        for cl in (a, b):
            await cl.expect_exact({"type": "joined", "room": room}, "joined reply")

    text = {"msg": f"hello across hosts {tag}", "n": [1, 2.5, None, True], "u": "h\u00e9\u2603"}
    said = None

    async def say_to_b():
        nonlocal said
        said = {"type": "said", "room": room, "from": a.client_id, "text": text}
        await a.send({"type": "say", "room": room, "text": text})
        await b.expect_exact(said, "said from A")

    async def say_to_a():
        if said is None:
            raise AssertionError("not run: the say was not sent")
        await a.expect_exact(said, "own said")

    async def login():
        await a.send({"type": "login", "uid": uid_a})
        await b.send({"type": "login", "uid": uid_b})
        await a.expect_exact({"type": "logged_in", "uid": uid_a}, "logged_in reply")
        await b.expect_exact({"type": "logged_in", "uid": uid_b}, "logged_in reply")

    async def whisper(src, dst, to_uid, words):
        await src.send({"type": "whisper", "to": to_uid, "text": words})
        await dst.expect_exact(
            {"type": "whisper", "from": src.client_id, "text": words}, f"whisper from {src.name}"
        )

    async def count(cl):
        m = await cl.count(room)
        clients, online = m["clients"], m["online"]
        for k, v in (("clients", clients), ("online", online)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise AssertionError(f"{k} is not an integer: {m!r}")
        if clients != 2 or online < 2:
            raise AssertionError(f"expected clients=2 and online>=2, got {m!r}")

    await check(later[0], different_gateways)
    await check(later[1], join)
    await check(later[2], say_to_b)
    await check(later[3], say_to_a)
    await check(later[4], login)
    await check(later[5], lambda: whisper(a, b, uid_b, f"psst B {tag}"))
    await check(later[6], lambda: whisper(b, a, uid_a, f"psst A {tag}"))
    await check(later[7], lambda: count(a))
    await check(later[8], lambda: count(b))
    for cl in (a, b):
        try:
            await asyncio.wait_for(cl.ws.close(), 3)
        except Exception:  # noqa: BLE001
            pass


def main():
    try:
        asyncio.run(asyncio.wait_for(scenario(), TOTAL_TIMEOUT))
    except Exception as e:  # noqa: BLE001
        report(False, "client scenario finished in time", f"{type(e).__name__}: {e}")
    sys.exit(0 if results and all(ok for ok, _, _ in results) else 1)


if __name__ == "__main__":
    main()
