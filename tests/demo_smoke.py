"""Runs the README's demo command (debug build, other ports, stops by itself)
and checks that the page is served and both gateways welcome clients."""
import asyncio, json, os, re, subprocess, sys, time, urllib.request
env = dict(os.environ, DEMO_PROFILE="debug", DEMO_SECONDS="6", REGISTER_PORT="21236",
           GW1_PORT="21272", GW2_PORT="21273", WEB_PORT="21080", GW1_INTERNAL="21290", GW2_INTERNAL="21291")
p = subprocess.Popen(["scripts/demo.sh"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
out = ""
deadline = time.time() + 60
while "Press Ctrl-C" not in out and time.time() < deadline:
    line = p.stdout.readline()
    if not line:
        break
    out += line
page = re.search(r"http://\S+", out)
assert page, out
html = urllib.request.urlopen(page.group(0), timeout=5).read().decode()
assert "<html" in html.lower(), html[:200]
import websockets
async def welcome(url):
    for _ in range(50):
        try:
            async with websockets.connect(url) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 3))
        except Exception:
            await asyncio.sleep(0.1)
for url in ("ws://127.0.0.1:21272", "ws://127.0.0.1:21273"):
    m = asyncio.run(welcome(url))
    assert m and m["type"] == "welcome", m
p.wait(timeout=60)
print("demo: page served, both gateways welcome clients, stopped by itself")
print("1 passed, 0 failed")
