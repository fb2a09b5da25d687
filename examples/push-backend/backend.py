#!/usr/bin/env python3
"""A small web backend that pushes through the gateway's HTTP API.

Python standard library only. It shows the browser -> backend -> push flow
(docs/push-api.md):

    POST /login   {"client_id", "user", "room"}  bind the browser's connection
                  to the user (bind_uid) and put it in the room (join_group)
    POST /send    {"room", "text", "from"}        store the message (in memory,
                  standing in for a database), then push
                  {"type":"said","id","room","from","text"} to the room (send_to_group)
    POST /notify  {"user", "text"}                push {"type":"notify","text"}
                  to every connection of the user (send_to_uid)
    GET  /history?room=ROOM                       the room's stored messages
    GET  /healthz                                 {"status":"ok"}

Configuration: GW_API_URL (e.g. http://127.0.0.1:8080) and GW_API_KEY from
the environment; the port to listen on as the first argument (default 8000),
on 127.0.0.1 unless BACKEND_HOST says otherwise.

    GW_API_URL=http://127.0.0.1:8080 GW_API_KEY=... python3 backend.py 8000

A demo: it takes the user name from the request body. A real backend takes
it from its own authenticated session (see README.md).
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GatewayError(Exception):
    """The push API answered an error (or could not be reached)."""

    def __init__(self, status, code, message, field=None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class GatewayApi:
    """A client of the gateway's push API: one POST per call."""

    def __init__(self, url, key, timeout=10.0):
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        # The API listens on a private address: never go through a proxy.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method, **args):
        """Calls /v1/<method> with args; returns the answer's object, raises GatewayError."""
        req = urllib.request.Request(
            f"{self.url}/v1/{method}",
            data=json.dumps(args).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with self.opener.open(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                raise GatewayError(e.code, "http_error", f"HTTP {e.code} from the push API") from None
            raise GatewayError(e.code, err.get("code"), err.get("message"), err.get("field")) from None
        except OSError as e:
            raise GatewayError(503, "unreachable", f"push API not reachable: {e}") from None

    # The calls this backend uses, named as in the API.
    def bind_uid(self, client_id, uid):
        return self.call("bind_uid", client_id=client_id, uid=uid)["affected"]

    def join_group(self, client_id, group):
        return self.call("join_group", client_id=client_id, group=group)["affected"]

    def send_to_group(self, group, data):
        return self.call("send_to_group", group=group, data=data)["delivered"]

    def send_to_uid(self, uid, data):
        return self.call("send_to_uid", uid=uid, data=data)["delivered"]


class Store:
    """Messages by room, in memory: a stand-in for the database."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rooms = {}
        self.next_id = 1

    def add(self, room, sender, text):
        with self.lock:
            msg = {"id": self.next_id, "room": room, "from": sender, "text": text, "ts": time.time()}
            self.next_id += 1
            self.rooms.setdefault(room, []).append(msg)
            return msg

    def history(self, room):
        with self.lock:
            return list(self.rooms.get(room, []))


class BadRequest(Exception):
    pass


def need(body, *names):
    """The named fields of body, each a non-empty string."""
    out = []
    for n in names:
        v = body.get(n)
        if not isinstance(v, str) or not v:
            raise BadRequest(f"`{n}` must be a non-empty string")
        out.append(v)
    return out


class Handler(BaseHTTPRequestHandler):
    server_version = "push-backend/1"
    api: GatewayApi = None
    store: Store = None

    # ----- routes -----

    def login(self, body):
        client_id, user, room = need(body, "client_id", "user", "room")
        # A real backend: user = the logged-in user of this HTTP session.
        if self.api.bind_uid(client_id, user) == 0:
            # The connection is gone (or never existed): nothing was bound.
            return 409, {"ok": False, "error": "that client_id is not connected"}
        self.api.join_group(client_id, room)
        return 200, {"ok": True, "user": user, "room": room}

    def send(self, body):
        room, text, sender = need(body, "room", "text", "from")
        msg = self.store.add(room, sender, text)  # store first, then push
        delivered = self.api.send_to_group(
            room, {"type": "said", "id": msg["id"], "room": room, "from": sender, "text": text})
        return 200, {"ok": True, "id": msg["id"], "delivered": delivered}

    def notify(self, body):
        user, text = need(body, "user", "text")
        delivered = self.api.send_to_uid(user, {"type": "notify", "text": text})
        return 200, {"ok": True, "delivered": delivered}

    POST = {"/login": login, "/send": send, "/notify": notify}

    # ----- plumbing -----

    def do_POST(self):
        route = self.POST.get(urllib.parse.urlsplit(self.path).path)
        if route is None:
            return self.reply(404, {"ok": False, "error": "no such route"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise BadRequest("expected a JSON object")
            status, answer = route(self, body)
        except (ValueError, BadRequest) as e:
            status, answer = 400, {"ok": False, "error": str(e)}
        except GatewayError as e:
            # The gateway refused (400: our bug or bad input) or is in trouble.
            status = 400 if e.status == 400 else 502
            answer = {"ok": False, "error": f"push API: {e.code}: {e.message}", "field": e.field}
        self.reply(status, answer)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            return self.reply(200, {"status": "ok"})
        if url.path == "/history":
            room = urllib.parse.parse_qs(url.query).get("room", [""])[0]
            if not room:
                return self.reply(400, {"ok": False, "error": "`room` is required"})
            return self.reply(200, {"ok": True, "room": room, "messages": self.store.history(room)})
        self.reply(404, {"ok": False, "error": "no such route"})

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"backend: {self.address_string()} {fmt % args}\n")


def main():
    url = os.environ.get("GW_API_URL")
    key = os.environ.get("GW_API_KEY")
    if not url or not key:
        sys.exit("set GW_API_URL (e.g. http://127.0.0.1:8080) and GW_API_KEY")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    host = os.environ.get("BACKEND_HOST", "127.0.0.1")
    Handler.api = GatewayApi(url, key)
    Handler.store = Store()
    server = ThreadingHTTPServer((host, port), Handler)
    print(f"backend: listening on http://{host}:{server.server_address[1]}, pushing via {url}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
