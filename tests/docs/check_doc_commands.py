#!/usr/bin/env python3
"""Every command shown in the docs is run here, or checked for its shape.

    python3 tests/docs/check_doc_commands.py      (Python 3.11, stdlib only;
                                                   needs target/debug built)

Commands are taken from README.md and docs/*.md, from fenced code blocks:

  * ``sh`` / ``bash`` / ``shell`` / ``zsh`` blocks: every line that is not
    blank or a ``#`` comment (backslash continuations joined);
  * ``console`` blocks, and blocks without a language: lines starting with
    ``$ `` (the lines below one, up to the next ``$ ``, are its output; a
    trailing ``# ... [N]`` comment is its documented exit code).

Every command must match exactly one entry of RULES below, else it is a
FAILURE naming the doc file and line, so a new doc command cannot slip in
unchecked (an entry that matches nothing is a failure too):

  RUN    executed against local clusters this script starts itself from the
         target/debug binaries, on free ports chosen at run time. Documented
         addresses are rewritten through the explicit ADDRESSES table (an
         address missing from it is a failure), placeholders (``…``,
         ``...``, ``<pid>``) through SUBSTITUTIONS. Daemons (gw-register,
         gw-gateway, gw-chat) are started and must come up (their "listening"
         / "connected to gateway" log lines) and later stop with exit 0 on
         SIGTERM; other commands must exit 0 (or the code the doc shows) and
         print the output the doc shows (ids and ``…`` as wildcards).
  SHAPE  cannot run here (docker, kubectl, release builds, benchmarks, the
         test suite itself, building the reader's own crate): ``bash -n``,
         the binary exists, every ``--flag`` is in its ``--help``, every repo
         path it names exists. Each has a one-line reason in RULES.

One line per command (RUN / SHAPE / FAIL), then a summary; exits 1 on any
failure. Every process it starts is stopped (SIGTERM, then SIGKILL) on the
way out, also on failure, and dies with it (setpriv --pdeathsig).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "debug"
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
SECRET = "demo-secret-change-me"  # the docs' secret
DAEMONS = ("gw-register", "gw-gateway", "gw-chat")
OWN_BINARIES = DAEMONS + ("gwctl", "gw-bench")
START_TIMEOUT = 20.0  # a daemon's start-up log lines
STOP_TIMEOUT = 15.0  # a daemon's exit after SIGTERM
RUN_TIMEOUT = 20.0  # a one-shot command
DEADLINE = float(os.environ.get("DOC_COMMANDS_DEADLINE", "90"))  # the whole run (about 12 s normally)

# ---------------------------------------------------------------------------
# The rules: (doc, regex searched in the command) -> class.


@dataclass
class Rule:
    doc: str
    pattern: str
    cls: str  # "RUN" or "SHAPE"
    reason: str = ""  # one line; required for SHAPE
    flags_of: str = ""  # SHAPE: check the flags after `--` against this binary
    check_only: bool = False  # RUN daemon: start, check, stop at once (not kept for later commands)
    matched: int = 0


def run(doc, pattern, **kw):
    return Rule(doc, pattern, "RUN", **kw)


def shape(doc, pattern, reason, **kw):
    return Rule(doc, pattern, "SHAPE", reason, **kw)


RM, GS, OPS, CONF, PUSH, BENCH = (
    "README.md", "docs/getting-started.md", "docs/operations.md",
    "docs/configuration.md", "docs/push-api.md", "docs/benchmarks.md",
)

RULES = [
    # README.md
    shape(RM, r"^scripts/demo\.sh\b", "run by tests/demo_smoke.py (debug build, other ports, stops by itself)"),
    shape(RM, r"^scripts/test\.sh\b", "the whole suite, which runs this script"),
    shape(RM, r"^cargo build --release\b", "a release build takes minutes; scripts/test.sh builds the debug binaries used here"),
    run(RM, r"^S="),
    run(RM, r"^gw-(register|gateway|chat) "),
    # getting-started.md
    shape(GS, r"^scripts/demo\.sh\b", "run by tests/demo_smoke.py (debug build, other ports, stops by itself)"),
    shape(GS, r"^scripts/test\.sh\b", "the whole suite, which runs this script"),
    run(GS, r"^cargo new my-worker$"),
    run(GS, r"^cd my-worker$"),
    run(GS, r"^S="),
    run(GS, r"^target/release/gw-(register|gateway) "),
    shape(GS, r"^cargo run -- ", "builds and runs the reader's own crate (minutes, crates.io); "
          "it takes gw-chat's flags, checked against gw-chat --help", flags_of="gw-chat"),
    run(GS, r"^curl -i --http1\.1 "),
    run(GS, r"^gwctl "),
    # operations.md
    run(OPS, r"^S="),
    run(OPS, r"^gw-(register|gateway|chat) +--register|^gw-register "),
    shape(OPS, r"^docker compose ", "needs a Docker daemon and an image build; the compose file is checked by tests/deploy/check_deploy.py"),
    shape(OPS, r"^kubectl apply ", "needs a Kubernetes cluster; the manifests are checked by tests/deploy/check_deploy.py"),
    run(OPS, r"^gw-gateway … --internal 0\.0\.0\.0:0", check_only=True),
    run(OPS, r"^gw-gateway … --listen wss://", check_only=True),
    run(OPS, r"^curl -i http://127\.0\.0\.1:8081/(healthz|readyz)$"),
    run(OPS, r"^export GW_"),
    run(OPS, r"^gwctl "),
    run(OPS, r"^new-worker --register … &"),
    run(OPS, r"^kill -TERM <old worker pid>$"),
    # configuration.md
    run(CONF, r"^gw-gateway --register 10\.0\.0\.2:1236 ", check_only=True),
    run(CONF, r"^GW_SECRET=\"\$S\" gw-gateway --config ", check_only=True),
    run(CONF, r"^gw-gateway \.\.\. ", check_only=True),
    # push-api.md
    run(PUSH, r"^export GW_API_(KEY|URL)="),
    run(PUSH, r"^gw-gateway --register "),
    run(PUSH, r"^curl -sS \"\$GW_API_URL/"),
    # benchmarks.md
    shape(BENCH, r"^((RUNS|GWT|WT)=\S* )+scripts/bench\.sh\b", "builds release and runs minutes of load; the generator is tested by crates/gw-bench/tests/loopback.rs"),
    shape(BENCH, r"^scripts/bench-100k\.sh\b", "opens 100,000 connections over 13 processes for a minute; the same gateway code is tested by the cluster tests"),
]

# ---------------------------------------------------------------------------
# Documented address -> the one used here. `{name}` is a free port picked at
# run time, one per (doc, name); a daemon's documented advertise address maps
# to the port its --internal binds.

ADDRESSES: dict[str, dict[str, str]] = {
    RM: {
        "127.0.0.1:1236": "127.0.0.1:{register}",
        "127.0.0.1:7272": "127.0.0.1:{ws}",
        "127.0.0.1:2900": "127.0.0.1:{internal}",
        "10.0.0.5:2900": "127.0.0.1:{internal}",
    },
    GS: {
        "127.0.0.1:1236": "127.0.0.1:{register}",
        "127.0.0.1:7272": "127.0.0.1:{ws1}",
        "127.0.0.1:7273": "127.0.0.1:{ws2}",
        "127.0.0.1:2900": "127.0.0.1:{internal1}",
        "127.0.0.1:2901": "127.0.0.1:{internal2}",
    },
    OPS: {
        "127.0.0.1:1236": "127.0.0.1:{register}",
        "127.0.0.1:7272": "127.0.0.1:{ws1}",
        "127.0.0.1:7273": "127.0.0.1:{ws2}",
        "127.0.0.1:2900": "127.0.0.1:{internal1}",
        "127.0.0.1:2901": "127.0.0.1:{internal2}",
        "127.0.0.1:8080": "127.0.0.1:{web}",
        "127.0.0.1:8081": "127.0.0.1:{api}",
        "0.0.0.0:7443": "0.0.0.0:{wss}",
    },
    CONF: {
        "10.0.0.2:1236": "127.0.0.1:{register}",
        "10.0.0.3:1236": "127.0.0.1:{register2}",
        "0.0.0.0:7272": "0.0.0.0:{ws}",
        "0.0.0.0:7273": "0.0.0.0:{text}",
        "127.0.0.1:7273": "127.0.0.1:{text}",
        "0.0.0.0:7274": "0.0.0.0:{frame}",
        "0.0.0.0:2900": "0.0.0.0:{internal}",
        "10.0.0.5:2900": "127.0.0.1:{internal}",
    },
    PUSH: {
        "127.0.0.1:1236": "127.0.0.1:{register}",
        "0.0.0.0:7272": "0.0.0.0:{ws}",
        "127.0.0.1:8080": "127.0.0.1:{api}",
    },
}

# Placeholders and things that cannot be used as written, replaced before the
# address table: (doc, text in the command, replacement, why).
SUBSTITUTIONS = [
    (GS, "target/release/", "target/debug/",
     "scripts/test.sh builds debug binaries (the doc assumes scripts/demo.sh built release ones)"),
    (OPS, "gw-gateway … --internal",
     f"gw-gateway --register 127.0.0.1:1236 --secret {SECRET} --listen ws://127.0.0.1:0 --internal",
     "… stands for the rest of a gateway's flags"),
    (OPS, "gw-gateway … --listen wss://",
     f"gw-gateway --register 127.0.0.1:1236 --secret {SECRET} --internal 127.0.0.1:0 --listen wss://",
     "… stands for the rest of a gateway's flags"),
    (OPS, "/etc/gateworker/tls/", "{tmp}/tls/",
     "a self-signed certificate made here with openssl stands in for the operator's"),
    (OPS, "new-worker --register …",
     f"gw-chat --register 127.0.0.1:1236 --secret {SECRET} --name chat-3",
     "gw-chat is the new worker"),
    (OPS, "--api … --api-key …", "--api http://127.0.0.1:8081 --api-key ops-example-api-key-0123",
     "… stands for the API flags of the cluster above"),
    (OPS, "--register … --secret …", f"--register 127.0.0.1:1236 --secret {SECRET}",
     "… stands for the register flags of the cluster above"),
    (OPS, "<old worker pid>", "{pid:chat-1}", "the old worker is chat-1 of the cluster above"),
    (CONF, "/etc/gateworker/gateway.toml", "{tmp}/gateway.toml",
     "the doc's own /etc/gateworker/gateway.toml example, with its addresses rewritten"),
    (CONF, "gw-gateway ... ",
     "gw-gateway --register 10.0.0.2:1236 --secret \"$S\" --internal 127.0.0.1:0 ",
     "... stands for the rest of a gateway's flags"),
    (PUSH, "GW_API_KEY=...", "GW_API_KEY=\"$GW_API_KEY\"",
     "... stands for the gateway's key, set by the block above"),
]

# Variables a doc takes as already set: (doc) -> {name: value}, why.
PRESET_ENV = {
    CONF: ({"S": SECRET}, "the examples use $S for the cluster secret"),
    PUSH: ({"GW_SECRET": SECRET, "GW_INTERNAL": "127.0.0.1:0"},
           "the doc's gateway takes the secret from $GW_SECRET; its default internal "
           "address 127.0.0.1:2900 is a fixed port, so GW_INTERNAL gives it a free one"),
}
# Blocks run in a fresh temporary directory instead of the repo: (doc, regex
# of the block's first command), why.
TMP_CWD = [
    (GS, r"^cargo new ", "creates a crate; not inside the checkout"),
]
# Docs whose blocks are one shell session (variables carry over blocks).
ONE_SESSION = {PUSH}

# Documented output that cannot be compared line by line: (doc, regex of the
# command) -> regexes the output (or, for a daemon, its log) must match.
EXPECT = {
    (OPS, r"--internal 0\.0\.0\.0:0$"): [r"gateway listening .*internal=0\.0\.0\.0:(\d+) advertise=0\.0\.0\.0:\1\b"],
    (OPS, r"--advertise 127\.0\.0\.1:0$"): [r"gateway listening .*internal=0\.0\.0\.0:(\d+) advertise=127\.0\.0\.1:\1\b"],
    (OPS, r"--listen wss://"): [r"gateway listening .*public=\[\"wss://0\.0\.0\.0:\d+\"\]"],
    # the worker rows are the workers' last reports (heartbeats): their numbers vary
    (OPS, r"^gwctl status$"): [
        r"^GATEWAY\s+INTERNAL\s+CONNECTIONS\s+PUBLIC$",
        r"^[0-9a-f]{12}\s+127\.0\.0\.1:\d+\s+1\s+ws://127\.0\.0\.1:\d+$",
        r"^WORKER\s+GATEWAYS\s+EVENTS\s+EVENTS/S\s+MEAN MS\s+PANICS$",
        r"^chat-1\s+\d+\s+\d+\s+\d+\.\d\s+\d+\.\d{3}\s+0$",
        r"^chat-2\s+\d+\s+\d+\s+\d+\.\d\s+\d+\.\d{3}\s+0$",
        r"^2 gateway\(s\), 2 worker\(s\), 2 connection\(s\), 2 uid\(s\), 1 group\(s\)$",
    ],
}

# ---------------------------------------------------------------------------
# Extraction


@dataclass
class Command:
    doc: str
    line: int
    lang: str
    text: str
    output: list[str] | None = None  # documented output lines (console / http block)
    code: int = 0  # documented exit code
    block: int = 0  # line of the block's opening fence
    rule: Rule | None = None


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SH_LANGS = {"sh", "bash", "shell", "zsh"}
CONSOLE_LANGS = {"console", "shell-session", "", "text"}


def extract(doc: str) -> list[Command]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    cmds: list[Command] = []
    i = 0
    last_sh_block: list[Command] = []
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                last_sh_block = []
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*" + re.escape(fence[0]) + "{%d,}\\s*$" % len(fence), lines[i]):
            raw = lines[i]
            body.append((i + 1, raw[indent:] if raw[:indent].strip() == "" else raw.lstrip()))
            i += 1
        i += 1  # the closing fence
        if lang == "http" and last_sh_block:
            last_sh_block[-1].output = [t for _, t in body]
            last_sh_block = []
            continue
        last_sh_block = []
        if lang in SH_LANGS:
            block = []
            j = 0
            while j < len(body):
                no, text = body[j]
                if not text.strip() or text.lstrip().startswith("#"):
                    j += 1
                    continue
                full = text.rstrip()
                while full.endswith("\\") and j + 1 < len(body):
                    j += 1
                    full = full[:-1].rstrip() + " " + body[j][1].strip()
                block.append(Command(doc, no, "sh", full.strip(), block=start + 1))
                j += 1
            cmds += block
            last_sh_block = block
        elif lang in CONSOLE_LANGS:
            j = 0
            cur: Command | None = None
            while j < len(body):
                no, text = body[j]
                if text.startswith("$ "):
                    full = text[2:].rstrip()
                    while full.endswith("\\") and j + 1 < len(body):
                        j += 1
                        full = full[:-1].rstrip() + " " + body[j][1].strip()
                    cur = Command(doc, no, "console", full.strip(), output=[], block=start + 1)
                    code = re.search(r"#.*\[(\d+)\]\s*$", full)
                    if code:
                        cur.code = int(code.group(1))
                    cmds.append(cur)
                elif cur is not None:
                    cur.output.append(text)
                j += 1
    return cmds


# ---------------------------------------------------------------------------
# Reporting

FAILURES: list[str] = []
COUNTS = {"RUN": 0, "SHAPE": 0}


def where(c: Command) -> str:
    return f"{c.doc}:{c.line}"


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"FAIL {msg}", flush=True)


def short(text: str, n: int = 110) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------
# Processes

PROCS: list[subprocess.Popen] = []
# Children die with this script even if it is killed (PR_SET_PDEATHSIG, set by
# util-linux's setpriv, which then execs the command; no preexec_fn, which is
# unsafe next to the WebSocket reader threads).
DIE_WITH_ME = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GW_") and k not in ("RUST_LOG", "S")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    return env


def stop_all() -> None:
    alive = [p for p in PROCS if p.poll() is None]
    for p in alive:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + 10
    for p in alive:
        try:
            p.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    # Each command ran in a session of its own: anything it left behind goes too.
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    PROCS.clear()


atexit.register(stop_all)


def _on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_s, _on_signal)


def _on_alarm(_signum, _frame):
    raise TimeoutError(f"the whole run took longer than {DEADLINE:.0f} s")


@dataclass
class Daemon:
    label: str
    binary: str
    proc: subprocess.Popen
    log: Path
    where: str  # doc:line, or "helper: ..."
    stopped: bool = False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 8) -> str:
        return "\n".join("       | " + l for l in self.text().splitlines()[-n:])


def strip_comment(cmd: str) -> str:
    """The command without a trailing `# comment` (quotes respected)."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or cmd[i - 1].isspace()):
            return cmd[:i].rstrip()
    return cmd.rstrip()


class Ports:
    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.named: dict[tuple[str, str], int] = {}

    def get(self, doc: str, name: str) -> int:
        key = (doc, name)
        if key not in self.named:
            while True:
                s = socket.socket()
                s.bind(("", 0))
                port = s.getsockname()[1]
                s.close()
                if port not in self.taken:
                    break
            self.taken.add(port)
            self.named[key] = port
        return self.named[key]


PORTS = Ports()

# ---------------------------------------------------------------------------
# A WebSocket client (stdlib): the chat clients the docs' examples assume.


class WsClient:
    def __init__(self, url: str, name: str) -> None:
        self.name = name
        u = urllib.parse.urlsplit(url)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.sock = socket.create_connection((u.hostname, u.port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{name}: connection closed during the upgrade")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status + " ":
            raise ConnectionError(f"{name}: upgrade refused: {status}")
        self.sock.settimeout(None)
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self.lock:
            self.sock.sendall(head + mask + body)

    def _read(self) -> None:
        frag = b""
        try:
            while True:
                b0, b1 = self._recv(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(self._recv(2), "big")
                elif n == 127:
                    n = int.from_bytes(self._recv(8), "big")
                mask = self._recv(4) if b1 & 0x80 else None
                data = self._recv(n)
                if mask:
                    data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
                op = b0 & 0x0F
                if op == 9:
                    self._frame(0xA, data)
                elif op == 8:
                    break
                elif op in (0, 1, 2):
                    frag += data
                    if b0 & 0x80:
                        with self.cond:
                            self.messages.append(frag.decode(errors="replace"))
                            self.cond.notify_all()
                        frag = b""
        except (OSError, EOFError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def send(self, obj) -> None:
        self._frame(1, (obj if isinstance(obj, str) else json.dumps(obj)).encode())

    def wait_for(self, want: Callable[[str], bool], timeout: float = 5) -> str | None:
        end = time.time() + timeout
        with self.cond:
            while True:
                for m in self.messages:
                    if want(m):
                        return m
                left = end - time.time()
                if left <= 0 or self.closed:
                    return None
                self.cond.wait(left)

    def close(self) -> None:
        try:
            self._frame(8, (1000).to_bytes(2, "big"))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------
# A doc's scenario: its commands in order, its daemons, its helpers.


class Scenario:
    def __init__(self, doc: str, tmp: Path) -> None:
        self.doc = doc
        self.tmp = tmp / re.sub(r"\W", "_", doc)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.daemons: list[Daemon] = []
        self.clients: dict[str, WsClient] = {}
        self.base = base_env()
        preset = PRESET_ENV.get(doc)
        if preset:
            self.base.update(preset[0])
        self.env = dict(self.base)
        self.cwd = ROOT
        self.block = -1

    # -- addresses, substitutions ------------------------------------------
    def port(self, name: str) -> int:
        return PORTS.get(self.doc, name)

    def addr(self, documented: str) -> str:
        return self.map_addresses(documented, "helper")

    def map_addresses(self, text: str, loc: str) -> str:
        table = ADDRESSES.get(self.doc, {})

        def sub(m: re.Match) -> str:
            a = m.group(0)
            if a.endswith(":0"):
                return a
            if a not in table:
                raise LookupError(f"{loc}: address {a} has no entry in ADDRESSES[{self.doc!r}] "
                                  "(documented ports are rewritten to free ones)")
            return re.sub(r"\{(\w+)\}", lambda n: str(self.port(n.group(1))), table[a])

        return re.sub(r"(?<![\w.])(?:\d{1,3}(?:\.\d{1,3}){3}|localhost):\d+\b", sub, text)

    def prepare(self, c: Command) -> str:
        text = c.text
        for doc, old, new, _why in SUBSTITUTIONS:
            if doc == c.doc and old in text:
                text = text.replace(old, new)
        text = text.replace("{tmp}", str(self.tmp))
        text = re.sub(r"\{pid:([\w-]+)\}", lambda m: str(self.daemon(m.group(1)).proc.pid), text)
        if "…" in text:
            raise LookupError(f"{where(c)}: placeholder … left in a RUN command (add a SUBSTITUTIONS entry)")
        return self.map_addresses(text, where(c))

    def daemon(self, label: str) -> Daemon:
        for d in self.daemons:
            if d.label == label:
                return d
        raise LookupError(f"no daemon {label!r} running in {self.doc}'s scenario")

    # -- daemons -------------------------------------------------------------
    def start(self, cmd: str, loc: str, env: dict | None = None, label: str | None = None) -> Daemon:
        cmd = strip_comment(cmd)
        if cmd.endswith("&"):
            cmd = cmd[:-1].rstrip()
        words = shlex.split(cmd)
        k = 0
        while k < len(words) and re.match(r"^[A-Za-z_]\w*=", words[k]):
            k += 1
        binary = os.path.basename(words[k])
        if label is None:
            label = words[words.index("--name") + 1] if "--name" in words else f"{binary}-{len(self.daemons) + 1}"
        m = re.match(r"^((?:[A-Za-z_]\w*=(?:\"[^\"]*\"|'[^']*'|\S+)\s+)*)(.*)$", cmd)
        log = self.tmp / f"{label}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(DIE_WITH_ME + ["bash", "-c", f"{m.group(1)}exec {m.group(2)}"], cwd=self.cwd,
                                 env=env or self.env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        PROCS.append(p)
        d = Daemon(label, binary, p, log, loc)
        self._check_exec(d)
        self.daemons.append(d)
        return d

    def _check_exec(self, d: Daemon) -> None:
        """The process must become the daemon itself (bash execs it), or the
        stop and exit-status checks would miss it."""
        end = time.time() + 5
        while time.time() < end and d.proc.poll() is None:
            try:
                if os.path.basename(os.readlink(f"/proc/{d.proc.pid}/exe")) == d.binary:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        if d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            raise LookupError(f"`{d.label}` did not run as a single process (a `&` or `;` inside the command?)")

    def ready(self, d: Daemon, words: list[str]) -> str | None:
        """Waits for the daemon's start-up lines; returns a problem or None."""
        gateways = sum(1 for x in self.daemons if x.binary == "gw-gateway" and not x.stopped)
        need: list[tuple[str, int]] = {  # log line, how many times
            "gw-register": [("register listening", 1)],
            "gw-gateway": [("gateway listening", 1)] + ([("push API listening", 1)] if "--api" in words else []),
            "gw-chat": [("connected to gateway", gateways)] + ([("serving the chat page", 1)] if "--web" in words else []),
        }.get(d.binary, [])
        end = time.time() + START_TIMEOUT
        while True:
            text = d.text()
            missing = [f"{s!r} x{n}" for s, n in need if text.count(s) < n]
            if not missing:
                return None
            if d.proc.poll() is not None:
                return f"exited with {d.proc.returncode} before it was up (waiting for {', '.join(missing)}):\n{d.tail()}"
            if time.time() > end:
                return f"not up after {START_TIMEOUT:.0f} s (waiting for {', '.join(missing)}):\n{d.tail()}"
            time.sleep(0.05)

    def stop(self, ds: list[Daemon]) -> list[str]:
        problems = []
        ds = [d for d in ds if not d.stopped]
        for d in ds:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in ds:
            d.stopped = True
            try:
                code = d.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
                problems.append(f"{d.where}: {d.label} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM:\n{d.tail()}")
                continue
            if code != 0:
                problems.append(f"{d.where}: {d.label} exited with {code} after SIGTERM (expected 0):\n{d.tail()}")
        return problems

    def stop_everything(self) -> list[str]:
        for c in self.clients.values():
            c.close()
        self.clients.clear()
        order = ("gw-gateway", "gw-chat", "gw-register")  # gateways first: their closes reach the workers
        problems = []
        for b in order:
            problems += self.stop([d for d in self.daemons if d.binary == b])
        problems += self.stop(self.daemons)
        return problems

    # -- helpers (not doc commands) -----------------------------------------
    def helper(self, cmd: str, why: str, label: str | None = None) -> None:
        d = self.start(cmd, f"helper ({why})", env=self.base, label=label)
        problem = self.ready(d, shlex.split(cmd))
        if problem:
            raise RuntimeError(f"{self.doc}: helper `{cmd}` {problem}")

    def client(self, name: str, url: str, *msgs: dict) -> WsClient:
        c = WsClient(url, name)
        if not c.wait_for(lambda m: '"welcome"' in m):
            raise RuntimeError(f"{self.doc}: chat client {name} got no welcome from {url}")
        for msg in msgs:
            n = len(c.messages)
            c.send(msg)
            if not c.wait_for(lambda m, n=n: c.messages.index(m) >= n):
                raise RuntimeError(f"{self.doc}: chat client {name} got no answer to {msg}")
        self.clients[name] = c
        return c

    def received(self, name: str, *texts: str) -> None:
        c = self.clients[name]
        for t in texts:
            if c.wait_for(lambda m: m == t, timeout=3) is None:
                fail(f"{self.doc}: client {name} did not receive {t!r} as the doc says (got {c.messages[-6:]})")


# ---------------------------------------------------------------------------
# What a doc's scenario needs besides its own commands: (doc, regex of the
# command before which it runs, or None for the end) -> action.


def ops_clients(s: Scenario) -> None:
    # "with two chat clients: alice on gateway 1 (port 7272) and bob on gateway 2 (port 7273), both in room lobby"
    s.client("alice", f"ws://{s.addr('127.0.0.1:7272')}", {"type": "login", "uid": "alice"}, {"type": "join", "room": "lobby"})
    s.client("bob", f"ws://{s.addr('127.0.0.1:7273')}", {"type": "login", "uid": "bob"}, {"type": "join", "room": "lobby"})


def ops_received_register_mode(s: Scenario) -> None:
    notice = '{"type":"notice","text":"maintenance at 22:00"}'
    s.received("alice", notice, "hello alice", "to everyone")
    s.received("bob", notice, "to everyone")


def ops_received_api_mode(s: Scenario) -> None:
    s.received("alice", "via api")
    s.received("bob", "via api")


def ops_tls(s: Scenario) -> None:
    tls = s.tmp / "tls"
    tls.mkdir(exist_ok=True)
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(tls / "key.pem"),
                        "-out", str(tls / "cert.pem")], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"openssl could not make a test certificate: {r.stderr}")


def gs_worker_and_carol(s: Scenario) -> None:
    # The guide's rooms worker, started with --token let-me-in; gw-chat --token is
    # the complete example it points to, with the same 401 "missing or wrong token".
    s.helper(f"gw-chat --register {s.addr('127.0.0.1:1236')} --secret {SECRET} --token let-me-in --name rooms",
             "the guide's worker with --token let-me-in", label="rooms")
    # "the client carol (connected to the rooms worker, in kitchen)"
    s.client("carol", f"ws://{s.addr('127.0.0.1:7272')}/?token=let-me-in&uid=carol", {"type": "join", "room": "kitchen"})


def gs_received(s: Scenario) -> None:
    s.received("carol", "your order is ready", "kitchen closes at 9")


def conf_registers(s: Scenario) -> None:
    for a in ("10.0.0.2:1236", "10.0.0.3:1236"):
        s.helper(f"gw-register --listen {s.addr(a)} --secret {SECRET}", f"the register at {a}")
    # The TOML example the second command's --config names, addresses rewritten.
    block = re.search(r"```toml\n(# /etc/gateworker/gateway\.toml.*?)```", (ROOT / CONF).read_text(), re.S)
    if not block:
        raise RuntimeError(f"{CONF}: the /etc/gateworker/gateway.toml example block is gone")
    (s.tmp / "gateway.toml").write_text(s.map_addresses(block.group(1), f"{CONF} toml example"))


def push_cluster(s: Scenario) -> None:
    s.helper(f"gw-register --listen {s.addr('127.0.0.1:1236')} --secret {SECRET}", "the cluster's register")


def push_workers(s: Scenario) -> None:
    # /readyz shows "workers":2
    for n in (1, 2):
        s.helper(f"gw-chat --register {s.addr('127.0.0.1:1236')} --secret {SECRET} --name chat-{n}", "two chat workers")


HOOKS: list[tuple[str, str | None, Callable[[Scenario], None]]] = [
    (OPS, r"^export GW_REGISTER=", ops_clients),
    (OPS, r"^export GW_API_URL=", ops_received_register_mode),
    (OPS, r"^gwctl online-count +# neither", ops_received_api_mode),
    (OPS, r"--listen wss://", ops_tls),
    (GS, r"^curl -i --http1\.1 ", gs_worker_and_carol),
    (GS, None, gs_received),
    (CONF, r"^gw-gateway --register 10\.0\.0\.2", conf_registers),
    (PUSH, r"^export GW_API_KEY=\$\(openssl", push_cluster),
    (PUSH, r"^curl -sS \"\$GW_API_URL/healthz\"", push_workers),
]

# ---------------------------------------------------------------------------
# Checking output


def line_regex(expected: str) -> str:
    """A documented output line as a regex: hex ids and … are wildcards."""
    out = ""
    for tok in re.split(r"(…|\b[0-9a-f]{20}\b|\b[0-9a-f]{12}\b|\s+)", expected.strip()):
        if tok == "…":
            out += ".*"
        elif re.fullmatch(r"[0-9a-f]{20}", tok or ""):
            out += "[0-9a-f]{20}"
        elif re.fullmatch(r"[0-9a-f]{12}", tok or ""):
            out += "[0-9a-f]{12}"
        elif tok and tok.isspace():
            out += r"\s+"
        elif tok:
            out += re.escape(tok)
    return out


def expectations(c: Command, scen: Scenario) -> list[str]:
    for (doc, pat), regexes in EXPECT.items():
        if doc == c.doc and re.search(pat, c.text):
            return regexes
    if c.output is None:
        return []
    if c.doc == PUSH:
        return []  # compared in check_push_answer
    return [line_regex(scen.map_addresses(l, where(c))) for l in c.output if l.strip()]


def check_output(c: Command, text: str, regexes: list[str]) -> list[str]:
    lines = text.splitlines()
    return [r for r in regexes if not any(re.search(r, l) for l in lines)]


def documented_body(c: Command) -> tuple[str, str]:
    """push-api.md: the status line and the body of the http block after a curl example."""
    out = c.output or []
    status = out[0] if out else ""
    body = "\n".join(out[out.index(""):]).strip() if "" in out else ""
    return status, body


EXAMPLE_IDS = re.compile(r"7f3a9c2b1d4e|b28e6d0f5a1c")


def check_push_answer(c: Command, text: str) -> str | None:
    """The documented answer where it does not depend on the doc's example
    state (three connections with fixed ids, which only
    tests/python/test_push_api.py sets up): health bodies and error codes
    exactly, otherwise a JSON answer with "ok"."""
    status, body = documented_body(c)
    if not status:
        return "no ```http response block after the example"
    if c.text.endswith('/metrics"'):
        want = set(re.findall(r"^(gateworker_\w+)", body, re.M))
        have = set(re.findall(r"^(gateworker_\w+)", text, re.M))
        return f"metrics missing: {sorted(want - have)}" if want - have else None
    try:
        got = json.loads(text)
    except ValueError:
        return f"answer is not JSON: {short(text, 200)!r}"
    if "/v1/" not in c.text:
        return None if got == json.loads(body) else f"answer {text.strip()} is not the documented {body}"
    if not isinstance(got, dict) or "ok" not in got:
        return f"answer has no \"ok\": {short(text, 200)}"
    try:
        doc_json = json.loads(body)
    except ValueError:
        return None  # an indented (abridged) example
    if EXAMPLE_IDS.search(c.text):
        return None  # about the example connections: compared by tests/python/test_push_api.py
    if doc_json.get("ok") is False:
        want = doc_json.get("error", {}).get("code")
        have = (got.get("error") or {}).get("code")
        if got.get("ok") is not False or want != have:
            return f"documented error {want}, got {short(text.strip(), 200)}"
    elif got.get("ok") is not True:
        return f"documented \"ok\":true, got {short(text.strip(), 200)}"
    return None


# ---------------------------------------------------------------------------
# RUN


def run_command(s: Scenario, c: Command) -> None:
    text = s.prepare(c)
    words = shlex.split(text, comments=True)
    prog = next((w for w in words if not re.match(r"^[A-Za-z_]\w*=", w)), None)
    name = os.path.basename(prog) if prog else None
    loc = where(c)
    if words and words[0] == "cd" and len(words) == 2:
        target = (s.cwd / words[1]).resolve()
        if not target.is_dir():
            return fail(f"{loc}: `{c.text}`: no directory {target}")
        s.cwd = target
        return
    if prog is None or words[0] == "export":
        r = subprocess.run(["bash", "-c", f"set -a; {text}\nenv -0"], cwd=s.cwd, env=s.env,
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if r.returncode != 0:
            return fail(f"{loc}: `{c.text}` exited {r.returncode}: {r.stderr.strip()}")
        new = dict(kv.split("=", 1) for kv in r.stdout.split("\0") if "=" in kv)
        for k, v in new.items():
            if s.env.get(k) != v and k not in ("SHLVL", "_", "PWD", "OLDPWD", "SHELLOPTS", "BASHOPTS"):
                s.env[k] = v
        return
    if name in DAEMONS and "--help" not in words and "--version" not in words:
        d = s.start(text, loc)
        problem = s.ready(d, words)
        if problem:
            d.stopped = True  # reported here, not again at the stop
            return fail(f"{loc}: `{short(c.text)}` {problem}")
        missing = check_output(c, d.text(), expectations(c, s))
        if missing:
            fail(f"{loc}: `{short(c.text)}`: log lacks {missing}:\n{d.tail()}")
        if c.rule and c.rule.check_only:
            for p in s.stop([d]):
                fail(p)
        return
    if words[0] == "kill":
        pid = int(words[-1])
        r = subprocess.run(["bash", "-c", text], cwd=s.cwd, env=s.env, capture_output=True, text=True)
        if r.returncode != 0:
            return fail(f"{loc}: `{c.text}` exited {r.returncode}: {r.stderr.strip()}")
        for d in s.daemons:
            if d.proc.pid == pid:
                d.stopped = True
                try:
                    code = d.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    return fail(f"{loc}: {d.label} still running {STOP_TIMEOUT:.0f} s after `{text}`")
                if code != 0:
                    fail(f"{loc}: {d.label} exited {code} after `{text}` (expected 0):\n{d.tail()}")
        return
    p = subprocess.Popen(DIE_WITH_ME + ["bash", "-c", text], cwd=s.cwd, env=s.env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    PROCS.append(p)
    try:
        out, _ = p.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the command and anything it started
        p.communicate()
        return fail(f"{loc}: `{short(c.text)}` still running after {RUN_TIMEOUT:.0f} s")
    if p.returncode != c.code:
        return fail(f"{loc}: `{short(c.text)}` exited {p.returncode}, the doc shows {c.code}:\n"
                    + "\n".join("       | " + l for l in out.splitlines()[-8:]))
    if c.doc == PUSH and name == "curl":
        problem = check_push_answer(c, out)
        if problem:
            fail(f"{loc}: `{short(c.text)}`: {problem}")
        return
    missing = check_output(c, out, expectations(c, s))
    if missing:
        fail(f"{loc}: `{short(c.text)}`: output lacks the documented {missing}; it printed:\n"
             + "\n".join("       | " + l for l in out.splitlines()[-12:]))


# ---------------------------------------------------------------------------
# SHAPE

_HELP: dict[tuple[str, ...], str | None] = {}


def help_text(argv: tuple[str, ...]) -> str | None:
    if argv not in _HELP:
        try:
            r = subprocess.run(list(argv) + ["--help"], capture_output=True, text=True, timeout=20,
                               env=base_env(), cwd=ROOT, stdin=subprocess.DEVNULL)
            _HELP[argv] = r.stdout + r.stderr if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            _HELP[argv] = None
    return _HELP[argv]


def check_shape(c: Command) -> list[str]:
    problems = []
    r = subprocess.run(["bash", "-n", "-c", c.text], capture_output=True, text=True)
    if r.returncode != 0:
        problems.append(f"bash -n: {r.stderr.strip()}")
    try:
        words = shlex.split(c.text, comments=True)
    except ValueError as e:
        return problems + [f"cannot split into words: {e}"]
    words = [w for w in words if w != "&"]
    k = 0
    while k < len(words) and re.match(r"^[A-Za-z_]\w*=", words[k]):
        k += 1
    if k == len(words):
        return problems
    prog, args = words[k], words[k + 1:]
    own = args
    theirs: list[str] = []
    if "--" in args:
        own, theirs = args[: args.index("--")], args[args.index("--") + 1:]
    # the program
    if "/" in prog:
        path = ROOT / prog
        if not path.exists():
            problems.append(f"no file {prog} in the repo")
        elif not os.access(path, os.X_OK):
            problems.append(f"{prog} is not executable")
        argv0 = None  # scripts run when called; no --help
    elif os.path.basename(prog) in OWN_BINARIES:
        exe = BIN / prog
        argv0 = str(exe) if exe.exists() else None
        if argv0 is None:
            problems.append(f"{prog} is not in target/debug (is it a binary of this workspace?)")
    else:
        argv0 = shutil.which(prog)
        if argv0 is None:
            print(f"NOTE {where(c)}: {prog} is not installed here: its flags are not checked", flush=True)
    # flags against --help (the program's, and its subcommands' for the bare words used)
    if argv0:
        subs = [w for w in own if re.fullmatch(r"[a-z][a-z0-9-]*", w)][:2]
        texts = [help_text(tuple([argv0] + subs[:n])) for n in range(len(subs) + 1)]
        if prog not in OWN_BINARIES and any(t is None or t == texts[0] for t in texts[1:]):
            print(f"NOTE {where(c)}: `{' '.join([prog] + subs)}` is not available here: its flags are not checked",
                  flush=True)
            texts = []
        texts = [t for t in texts if t]
        for f in sorted({w.split("=", 1)[0] for w in own if w.startswith("--") and len(w) > 2} if texts else ()):
            if not any(re.search(re.escape(f) + r"(?![\w-])", t) for t in texts):
                problems.append(f"{prog} has no flag {f} (not in its --help)")
    if c.rule and c.rule.flags_of and theirs:
        t = help_text((str(BIN / c.rule.flags_of),)) or ""
        for f in sorted({w.split("=", 1)[0] for w in theirs if w.startswith("--")}):
            if not re.search(re.escape(f) + r"(?![\w-])", t):
                problems.append(f"{c.rule.flags_of} has no flag {f} (not in its --help)")
    # repo paths
    for w in args:
        if "://" in w or w.startswith("-") or "/" not in w or w.startswith(("/", "$", "~")):
            continue
        if w.startswith("target/"):
            continue  # build output
        if not (ROOT / w).exists():
            problems.append(f"no path {w} in the repo")
    return problems


# ---------------------------------------------------------------------------


def classify(cmds: list[Command]) -> list[Command]:
    ok = []
    for c in cmds:
        hits = [r for r in RULES if r.doc == c.doc and re.search(r.pattern, c.text)]
        if not hits:
            fail(f"{where(c)}: unclassified command `{short(c.text)}`: add a RUN or SHAPE entry to RULES "
                 f"in tests/docs/check_doc_commands.py")
            continue
        if len(hits) > 1:
            fail(f"{where(c)}: `{short(c.text)}` matches {len(hits)} RULES entries: "
                 + ", ".join(repr(h.pattern) for h in hits))
            continue
        c.rule = hits[0]
        c.rule.matched += 1
        if c.rule.cls == "SHAPE" and not c.rule.reason.strip():
            fail(f"{where(c)}: SHAPE entry {c.rule.pattern!r} has no reason")
            continue
        ok.append(c)
    for r in RULES:
        if r.matched == 0:
            fail(f"RULES entry ({r.doc}, {r.pattern!r}) matches no command any more: remove or fix it")
    return ok


def run_scenario(doc: str, cmds: list[Command], tmp: Path) -> None:
    s = Scenario(doc, tmp)
    hooks = [(pat, fn) for d, pat, fn in HOOKS if d == doc]
    used = set()
    try:
        for c in cmds:
            if c.block != s.block and doc not in ONE_SESSION:
                s.env = dict(s.base)
                s.cwd = s.tmp if any(d == doc and re.search(p, c.text) for d, p, _ in TMP_CWD) else ROOT
            s.block = c.block
            for pat, fn in hooks:
                if pat is not None and pat not in used and re.search(pat, c.text):
                    used.add(pat)
                    fn(s)
            if c.rule.cls == "SHAPE":
                COUNTS["SHAPE"] += 1
                problems = check_shape(c)
                if problems:
                    for p in problems:
                        fail(f"{where(c)}: SHAPE `{short(c.text)}`: {p}")
                else:
                    print(f"SHAPE {where(c)}: {short(c.text, 70)}  ({c.rule.reason})", flush=True)
                continue
            COUNTS["RUN"] += 1
            before = len(FAILURES)
            t0 = time.time()
            try:
                run_command(s, c)
            except (LookupError, ValueError) as e:
                fail(f"{where(c)}: `{short(c.text)}`: {e}")
            if len(FAILURES) == before:
                print(f"RUN   {where(c)}: {short(c.text, 80)}  ({time.time() - t0:.1f} s)", flush=True)
        for pat, fn in hooks:
            if pat is None:
                fn(s)
            elif pat not in used:
                fail(f"{doc}: HOOKS entry {pat!r} matches no command any more")
    finally:
        for p in s.stop_everything():
            fail(p)


def main() -> int:
    t0 = time.time()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(DEADLINE))
    missing = [b for b in OWN_BINARIES if not (BIN / b).exists()]
    if missing:
        print(f"FAIL target/debug lacks {missing}: run `cargo build --workspace --bins` first")
        return 1
    all_cmds: list[Command] = []
    for doc in DOCS:
        all_cmds += extract(doc)
    cmds = classify(all_cmds)
    by_doc: dict[str, list[Command]] = {}
    for c in cmds:
        by_doc.setdefault(c.doc, []).append(c)
    with tempfile.TemporaryDirectory(prefix="doc-commands-") as tmp:
        for doc in DOCS:
            if doc in by_doc:
                try:
                    run_scenario(doc, by_doc[doc], Path(tmp))
                except (TimeoutError, KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # a helper that did not come up, a missing tool: this doc fails, the rest runs
                    fail(f"{doc}: {type(e).__name__}: {e}")
    signal.alarm(0)
    print()
    print(f"summary ({time.time() - t0:.0f} s): {len(all_cmds)} commands in README.md and docs/*.md")
    for doc in DOCS:
        mine = [c for c in all_cmds if c.doc == doc]
        if mine:
            n = {k: sum(1 for c in mine if c.rule and c.rule.cls == k) for k in ("RUN", "SHAPE")}
            print(f"  {doc:<36} RUN {n['RUN']:>3}  SHAPE {n['SHAPE']:>3}  unclassified {len(mine) - n['RUN'] - n['SHAPE']}")
    unclassified = sum(1 for c in all_cmds if c.rule is None)
    print(f"  {'total':<36} RUN {COUNTS['RUN']:>3}  SHAPE {COUNTS['SHAPE']:>3}  unclassified {unclassified}")
    if FAILURES:
        print(f"failures ({len(FAILURES)}):")
        for f in FAILURES:
            print(f"  - {f.splitlines()[0]}")
    print(f"doc commands: {COUNTS['RUN']} run, {COUNTS['SHAPE']} shape-checked, {unclassified} unclassified, "
          f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    try:
        code = main()
    except TimeoutError as e:
        print(f"FAIL {e}")
        code = 1
    finally:
        stop_all()
    sys.exit(code)
