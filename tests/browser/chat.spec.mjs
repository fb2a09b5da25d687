// Browser check of the chat demo page (examples/chat/web/index.html) against a
// running gateworker cluster. Plain Node script, no test framework:
//
//   (cd tests/browser && npm ci)            # once; installs playwright-core only
//   GW_PAGE_URL=http://127.0.0.1:8080/index.html \
//   GW_WS_URLS=ws://127.0.0.1:7272,ws://127.0.0.1:7273 \
//   node tests/browser/chat.spec.mjs
//
// Env:
//   GW_PAGE_URL   http(s) URL serving examples/chat/web/index.html (required)
//   GW_WS_URLS    comma-separated gateway ws:// URLs, at least two (required)
//   CHROMIUM      browser binary (default /usr/bin/chromium)
//   ARTIFACT_DIR  where screenshots go (default target/test-artifacts)
//
// Page A connects to gateway 1, page B to gateway 2, both auto-join one fresh
// room; A types a message and clicks Send; B must show it in #log within 10 s.
// Prints "1 passed, 0 failed" (exit 0) or "0 passed, 1 failed" (exit 1).

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';

const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const STEP_TIMEOUT = 10_000;
const OVERALL_TIMEOUT = 90_000;

// Summary line last, and only exit once stdout has been flushed.
function finish(line, code) {
  process.stdout.write(line + '\n', () => process.exit(code));
}

function fail(err) {
  console.error(err && err.stack ? err.stack : String(err));
  finish('0 passed, 1 failed', 1);
}

async function main() {
  const pageUrl = process.env.GW_PAGE_URL;
  const wsUrls = (process.env.GW_WS_URLS || '').split(',').map((s) => s.trim()).filter(Boolean);
  if (!pageUrl) throw new Error('GW_PAGE_URL is not set (http URL serving examples/chat/web/index.html)');
  if (wsUrls.length < 2) throw new Error(`GW_WS_URLS must list at least two gateway ws URLs, got ${JSON.stringify(process.env.GW_WS_URLS)}`);

  const artifactDir = process.env.ARTIFACT_DIR || 'target/test-artifacts';
  mkdirSync(artifactDir, { recursive: true });
  const shotB = join(artifactDir, 'chat-browser.png');
  const shotA = join(artifactDir, 'chat-browser-a.png');

  const room = `browser-${randomUUID()}`;
  const body = `hello from A ${randomUUID().slice(0, 8)} <b>&amp;</b>`;

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ARGS,
    timeout: 30_000,
  });
  const diagnostics = [];
  let pageA, pageB;
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
    const open = async (label, gw, name) => {
      const page = await context.newPage();
      page.setDefaultTimeout(STEP_TIMEOUT);
      page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') diagnostics.push(`[${label} console.${m.type()}] ${m.text()}`); });
      page.on('pageerror', (e) => diagnostics.push(`[${label} pageerror] ${e.message}`));
      const u = new URL(pageUrl);
      u.searchParams.set('gw', gw);
      u.searchParams.set('room', room);
      u.searchParams.set('name', name);
      u.searchParams.set('autojoin', '1');
      await page.goto(u.toString(), { waitUntil: 'load' });
      return page;
    };
    pageA = await open('A', wsUrls[0], 'Alice');
    pageB = await open('B', wsUrls[1], 'Bob');

    // Both pages: welcomed (client id shown) and joined the room.
    for (const [label, page] of [['A', pageA], ['B', pageB]]) {
      try {
        await page.waitForFunction(() => document.getElementById('client-id').textContent.trim() !== '');
        await page.waitForFunction(
          (r) => document.getElementById('current-room').dataset.room === r, room);
      } catch (e) {
        const status = await page.locator('#status').textContent().catch(() => '?');
        throw new Error(`page ${label} did not connect and join ${room} (status: ${status}): ${e.message}`);
      }
    }
    const idA = (await pageA.locator('#client-id').textContent()).trim();
    const idB = (await pageB.locator('#client-id').textContent()).trim();
    if (idA === idB) throw new Error(`both pages got the same client_id ${idA}`);

    // A types and clicks Send.
    await pageA.locator('#message').fill(body);
    await pageA.locator('#send').click();

    // B shows it (and so does A, the sender is a room member too).
    await pageB.locator('#log .said', { hasText: body }).first()
      .waitFor({ state: 'visible', timeout: STEP_TIMEOUT })
      .catch((e) => { throw new Error(`page B (gateway ${wsUrls[1]}) did not show A's message within 10 s: ${e.message}`); });
    await pageA.locator('#log .said', { hasText: body }).first()
      .waitFor({ state: 'visible', timeout: STEP_TIMEOUT })
      .catch((e) => { throw new Error(`page A did not show its own message within 10 s: ${e.message}`); });

    // The text must be shown literally (escaped), not parsed as HTML.
    const injected = await pageB.locator('#log .said b').count();
    if (injected !== 0) throw new Error('message body was rendered as HTML');

    // Let B's count reply arrive so the screenshot shows the room size.
    await pageB.waitForFunction(() => /2 people/.test(document.getElementById('count').textContent))
      .catch(() => diagnostics.push('[B] room count did not show 2 people (not fatal)'));

    await pageB.screenshot({ path: shotB });
    await pageA.screenshot({ path: shotA });
    console.log(`ok: message from A (${idA} via ${wsUrls[0]}) shown on B (${idB} via ${wsUrls[1]}) in room ${room}`);
    console.log(`screenshots: ${shotB}, ${shotA}`);
  } catch (e) {
    for (const [p, path] of [[pageB, shotB], [pageA, shotA]]) {
      if (p) await p.screenshot({ path }).catch(() => {});
    }
    if (diagnostics.length) e.message += '\n' + diagnostics.join('\n');
    throw e;
  } finally {
    await browser.close().catch(() => {});
  }
  for (const d of diagnostics) console.log(d);
}

const overall = setTimeout(() => fail(new Error(`browser test timed out after ${OVERALL_TIMEOUT / 1000} s`)), OVERALL_TIMEOUT);
main().then(() => {
  clearTimeout(overall);
  finish('1 passed, 0 failed', 0);
}, fail);
