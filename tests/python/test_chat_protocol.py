"""Wire-contract tests for the chat demo, run against a live cluster.

The cluster (register + >= 2 gateways + business workers running the chat
example) must already be running.  Point the tests at it with

    GW_WS_URLS=ws://127.0.0.1:7272,ws://127.0.0.1:7273 pytest tests/python

Each URL must be a *different* gateway, so that every cross-gateway path
(say, whisper, count, gone) is exercised.  Without GW_WS_URLS the whole
module is skipped.

Only needs `pytest` and `websockets` (>= 12); no pytest-asyncio: every test
is a plain function that runs its own event loop with asyncio.run().
"""

import asyncio
import functools
import json
import os
import uuid

import pytest

_RAW_URLS = os.environ.get("GW_WS_URLS", "").strip()
if not _RAW_URLS:
    pytest.skip(
        "GW_WS_URLS is not set: set it to a comma-separated list of at least "
        "two gateway WebSocket URLs of a running chat cluster, e.g. "
        "GW_WS_URLS=ws://127.0.0.1:7272,ws://127.0.0.1:7273",
        allow_module_level=True,
    )

GW = [u.strip() for u in _RAW_URLS.split(",") if u.strip()]
if len(GW) < 2:
    raise RuntimeError(
        f"GW_WS_URLS must list at least two gateway URLs (one per gateway), got {GW!r}"
    )

import websockets  # noqa: E402  (imported after the skip on purpose)
from websockets.exceptions import ConnectionClosed  # noqa: E402

# Seconds to wait for a message that must arrive.
RECV_TIMEOUT = float(os.environ.get("GW_RECV_TIMEOUT", "5"))
# Seconds to wait when checking that a message does NOT arrive.
QUIET = float(os.environ.get("GW_QUIET_TIMEOUT", "0.5"))

_WS_MAJOR = int(websockets.__version__.split(".")[0])


def run_async(fn):
    """Run an async test function in a fresh event loop (no plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 25))

    return wrapper


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex}"


class Client:
    """A WebSocket connection plus a buffer of not-yet-consumed messages."""

    def __init__(self, ws, url):
        self.ws = ws
        self.url = url
        self.client_id = None
        self.pending = []  # decoded messages received but not yet expected

    @classmethod
    async def open(cls, url):
        kwargs = {"open_timeout": RECV_TIMEOUT, "close_timeout": 2}
        if _WS_MAJOR >= 15:
            # websockets >= 15 honours HTTP(S)_PROXY by default; the cluster is local.
            kwargs["proxy"] = None
        ws = await websockets.connect(url, **kwargs)
        c = cls(ws, url)
        welcome = await c.expect(lambda m: m.get("type") == "welcome")
        assert set(welcome) == {"type", "client_id"}, welcome
        cid = welcome["client_id"]
        assert isinstance(cid, str) and cid, welcome
        assert cid.isprintable() and cid.strip() == cid, welcome
        c.client_id = cid
        return c

    async def send(self, obj):
        await self.ws.send(json.dumps(obj))

    async def send_raw(self, data):
        await self.ws.send(data)  # str -> text frame, bytes -> binary frame

    async def _recv(self, timeout):
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
        msg = json.loads(raw)
        assert isinstance(msg, dict), f"server sent a non-object: {raw!r}"
        return msg

    async def expect(self, pred, timeout=RECV_TIMEOUT, what=None):
        """Return the first message (buffered or new) matching pred.

        Non-matching messages are kept in the buffer for later expects.
        """
        for i, m in enumerate(self.pending):
            if pred(m):
                return self.pending.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                m = await self._recv(left)
            except asyncio.TimeoutError:
                break
            if pred(m):
                return m
            self.pending.append(m)
        raise AssertionError(
            f"{self.url} client {self.client_id}: no message matching "
            f"{what or pred} within {timeout}s; unmatched: {self.pending!r}"
        )

    async def expect_exact(self, expected, timeout=RECV_TIMEOUT):
        """Wait for a message of expected's type (and room if any), compare exactly."""

        def pred(m):
            if m.get("type") != expected["type"]:
                return False
            for key in ("room", "from", "client_id", "uid"):
                if key in expected and m.get(key) != expected[key]:
                    return False
            return True

        m = await self.expect(pred, timeout, what=expected)
        assert m == expected, f"got {m!r}, expected exactly {expected!r}"
        return m

    async def expect_none(self, pred, timeout=QUIET, what=None):
        """Assert that no message matching pred arrives within timeout."""
        for m in self.pending:
            assert not pred(m), f"unexpected message {m!r} ({what})"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                m = await self._recv(left)
            except asyncio.TimeoutError:
                return
            assert not pred(m), f"{self.client_id}: unexpected message {m!r} ({what})"
            self.pending.append(m)

    async def join(self, room):
        await self.send({"type": "join", "room": room})
        await self.expect_exact({"type": "joined", "room": room})

    async def leave(self, room):
        await self.send({"type": "leave", "room": room})
        await self.expect_exact({"type": "left", "room": room})

    async def login(self, uid):
        await self.send({"type": "login", "uid": uid})
        await self.expect_exact({"type": "logged_in", "uid": uid})

    async def echo(self, text):
        await self.send({"type": "echo", "text": text})
        m = await self.expect(lambda m: m.get("type") == "echo", what="echo reply")
        assert m == {"type": "echo", "text": text}, m
        return m

    async def count(self, room):
        await self.send({"type": "count", "room": room})
        m = await self.expect(
            lambda m: m.get("type") == "count" and m.get("room") == room,
            what=f"count reply for {room!r}",
        )
        assert set(m) == {"type", "room", "clients", "online"}, m
        assert isinstance(m["clients"], int) and not isinstance(m["clients"], bool), m
        assert isinstance(m["online"], int) and not isinstance(m["online"], bool), m
        return m

    async def close(self):
        await self.ws.close()


async def open_clients(*gateway_indexes):
    """Open one client per index (index into GW, modulo the number of gateways)."""
    return list(
        await asyncio.gather(*(Client.open(GW[i % len(GW)]) for i in gateway_indexes))
    )


async def close_all(clients):
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def is_error(m):
    return m.get("type") == "error"


# --------------------------------------------------------------------------


@run_async
async def test_welcome_ids_unique_across_gateways():
    clients = await open_clients(*range(20))
    try:
        ids = [c.client_id for c in clients]
        assert len(set(ids)) == 20, f"duplicate client_ids: {ids}"
        # Both gateways really were used.
        assert {c.url for c in clients} == set(GW)
    finally:
        await close_all(clients)


@run_async
async def test_join_joined():
    room = unique("join")
    (a,) = await open_clients(0)
    try:
        await a.send({"type": "join", "room": room})
        await a.expect_exact({"type": "joined", "room": room})
        # Joining a second room is fine too.
        room2 = unique("join2")
        await a.join(room2)
    finally:
        await close_all([a])


@run_async
async def test_say_reaches_every_member_on_both_gateways():
    room = unique("say")
    a1, b1, a2, b2, outsider = await open_clients(0, 1, 0, 1, 1)
    members = [a1, b1, a2, b2]
    try:
        for c in members:
            await c.join(room)

        text = {"name": "alice", "body": "héllo <b>&</b> 🎉", "n": [1, 2.5, None, True]}
        await a1.send({"type": "say", "room": room, "text": text})
        for c in members:
            await c.expect_exact(
                {"type": "said", "room": room, "from": a1.client_id, "text": text}
            )

        # From the other gateway, with a plain string text.
        await b2.send({"type": "say", "room": room, "text": "plain string"})
        for c in members:
            await c.expect_exact(
                {"type": "said", "room": room, "from": b2.client_id, "text": "plain string"}
            )

        await outsider.expect_none(
            lambda m: m.get("type") == "said", what="non-member got said"
        )
    finally:
        await close_all(members + [outsider])


@run_async
async def test_leave_left_then_not_receiving():
    room = unique("leave")
    a, b = await open_clients(0, 1)
    try:
        await a.join(room)
        await b.join(room)
        await b.send({"type": "leave", "room": room})
        await b.expect_exact({"type": "left", "room": room})

        await a.send({"type": "say", "room": room, "text": "after leave"})
        await a.expect_exact(
            {"type": "said", "room": room, "from": a.client_id, "text": "after leave"}
        )
        await b.expect_none(
            lambda m: m.get("type") == "said", what="said after leaving the room"
        )

        # b is no longer in the room, so closing it must not produce a gone there.
        await b.close()
        await a.expect_none(
            lambda m: m.get("type") == "gone" and m.get("room") == room,
            what="gone for a room the client had left",
        )
        assert (await a.count(room))["clients"] == 1
    finally:
        await close_all([a, b])


@run_async
async def test_login_and_whisper_across_gateways():
    uid = unique("uid")
    u1, u2, sender, bystander = await open_clients(0, 1, 1, 0)
    try:
        await u1.send({"type": "login", "uid": uid})
        await u1.expect_exact({"type": "logged_in", "uid": uid})
        await u2.login(uid)
        await bystander.login(unique("other"))

        text = {"name": "bob", "body": "psst"}
        await sender.send({"type": "whisper", "to": uid, "text": text})
        for c in (u1, u2):
            await c.expect_exact(
                {"type": "whisper", "from": sender.client_id, "text": text}
            )
        await sender.expect_none(
            lambda m: m.get("type") == "whisper", what="whisper to the sender"
        )
        await bystander.expect_none(
            lambda m: m.get("type") == "whisper", what="whisper to another uid"
        )

        # And the other direction: u1 (gateway 0) whispers to the sender's uid.
        uid2 = unique("uid")
        await sender.login(uid2)
        await u1.send({"type": "whisper", "to": uid2, "text": "back at you"})
        await sender.expect_exact(
            {"type": "whisper", "from": u1.client_id, "text": "back at you"}
        )
    finally:
        await close_all([u1, u2, sender, bystander])


@pytest.mark.parametrize(
    "text",
    [
        {"name": "x", "body": "y", "nested": {"a": [1, "2", None]}},
        {},
        42,
        -7,
        1.5,
        "a string with \"quotes\" and \\ and \u00e9 and \U0001f600",
        "",
        None,
        True,
        [1, "two", {"three": 3}],
    ],
    ids=[
        "object", "empty-object", "int", "negative-int", "float", "string",
        "empty-string", "null", "bool", "array",
    ],
)
@run_async
async def test_echo_passes_text_through(text):
    clients = await open_clients(0, 1)
    try:
        for c in clients:
            await c.echo(text)
    finally:
        await close_all(clients)


@run_async
async def test_count_room_across_gateways():
    room = unique("count")
    a1, a2, b1, c = await open_clients(0, 0, 1, 1)
    everyone = [a1, a2, b1, c]
    try:
        m = await c.count(room)
        assert m["clients"] == 0, m
        assert m["online"] >= len(everyone), m

        for x in (a1, a2, b1):
            await x.join(room)

        for asker in (c, a1):
            m = await asker.count(room)
            assert m == {"type": "count", "room": room, "clients": 3,
                         "online": m["online"]}, m
            assert m["online"] >= len(everyone), m

        await a2.leave(room)
        assert (await b1.count(room))["clients"] == 2
    finally:
        await close_all(everyone)


@run_async
async def test_gone_sent_to_room_members_on_close():
    room1 = unique("gone1")
    room2 = unique("gone2")
    leaver, a, b, c = await open_clients(1, 0, 1, 0)
    try:
        await leaver.join(room1)
        await leaver.join(room2)
        await a.join(room1)
        await b.join(room1)
        await c.join(room2)
        gone_id = leaver.client_id

        await leaver.close()

        for x in (a, b):
            await x.expect_exact({"type": "gone", "room": room1, "client_id": gone_id})
        await c.expect_exact({"type": "gone", "room": room2, "client_id": gone_id})
        # a is only in room1: it must not hear about room2.
        await a.expect_none(
            lambda m: m.get("type") == "gone" and m.get("room") == room2,
            what="gone for a room the receiver is not in",
        )
        m = await a.count(room1)
        assert m["clients"] == 2, m
    finally:
        await close_all([leaver, a, b, c])


MALFORMED = [
    ("not-json", "this is {not json"),
    ("json-array", "[1, 2, 3]"),
    ("json-string", '"join"'),
    ("json-number", "42"),
    ("empty-object", "{}"),
    ("unknown-type", json.dumps({"type": "no-such-type", "room": "r"})),
    ("non-string-type", json.dumps({"type": 7})),
    ("join-missing-room", json.dumps({"type": "join"})),
    ("join-empty-room", json.dumps({"type": "join", "room": ""})),
    ("say-missing-room", json.dumps({"type": "say", "text": "x"})),
    ("say-empty-room", json.dumps({"type": "say", "room": "", "text": "x"})),
    ("count-missing-room", json.dumps({"type": "count"})),
    ("login-missing-uid", json.dumps({"type": "login"})),
    ("login-empty-uid", json.dumps({"type": "login", "uid": ""})),
    ("whisper-missing-to", json.dumps({"type": "whisper", "text": "x"})),
    ("binary-frame", json.dumps({"type": "echo", "text": "in a binary frame"}).encode()),
]


@pytest.mark.parametrize("gw_index", [0, 1], ids=["gw0", "gw1"])
@run_async
async def test_malformed_input_gets_error_and_connection_stays_usable(gw_index):
    (c,) = await open_clients(gw_index)
    try:
        for name, payload in MALFORMED:
            await c.send_raw(payload)
            m = await c.expect(is_error, what=f"error reply to {name}")
            assert set(m) == {"type", "reason"}, (name, m)
            assert isinstance(m["reason"], str) and m["reason"], (name, m)
            # Still open and usable.
            await c.echo({"after": name})
        assert not c.pending, f"unexpected extra messages: {c.pending!r}"
    finally:
        await close_all([c])


@run_async
async def test_error_goes_only_to_the_offender():
    room = unique("err")
    bad, good = await open_clients(0, 1)
    try:
        await bad.join(room)
        await good.join(room)
        await bad.send_raw("nope")
        await bad.expect(is_error, what="error reply")
        await good.expect_none(is_error, what="error delivered to another client")
    finally:
        await close_all([bad, good])


@run_async
async def test_room_zero_and_uid_zero():
    # "0" is falsy in PHP; it must still be a valid room and uid here.
    # These names are shared, so match on a per-run marker and do not
    # assume the room is otherwise empty.
    marker = unique("zero")
    a, b = await open_clients(0, 1)
    try:
        await a.join("0")
        await b.join("0")
        await a.send({"type": "say", "room": "0", "text": marker})
        for c in (a, b):
            await c.expect_exact(
                {"type": "said", "room": "0", "from": a.client_id, "text": marker}
            )
        m = await a.count("0")
        assert m["room"] == "0" and m["clients"] >= 2, m

        await b.login("0")
        await a.send({"type": "whisper", "to": "0", "text": marker})
        await b.expect_exact({"type": "whisper", "from": a.client_id, "text": marker})

        await a.leave("0")
        await b.close()
        # a left "0" before b closed: no gone for a.
        await a.expect_none(
            lambda m: m.get("type") == "gone" and m.get("client_id") == b.client_id,
            what="gone after leaving room 0",
        )
    finally:
        await close_all([a, b])


@run_async
async def test_idle_connection_stays_open():
    """Sanity: a connection sitting idle for a moment is not dropped."""
    (c,) = await open_clients(1)
    try:
        await asyncio.sleep(QUIET)
        await c.echo("still here")
    except ConnectionClosed as e:  # pragma: no cover - diagnostic only
        pytest.fail(f"server closed an idle connection: {e!r}")
    finally:
        await close_all([c])
