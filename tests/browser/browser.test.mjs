// Browser tests of GraphiQL (`/`) and the demo (`/demo`) in Debian's Chromium, driven by
// playwright-core. `cargo test` runs them through tests/api/clients.rs, which builds the
// server and passes its binary; run alone with
//   SYNCGRAPH_BIN=target/debug/syncgraph node --test tests/browser/
// A failed test leaves a screenshot of each of its pages in SCREENSHOT_DIR (every test does
// with SCREENSHOT_ALL=1).
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

const BIN = process.env.SYNCGRAPH_BIN;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SCREENSHOT_DIR = process.env.SCREENSHOT_DIR ?? join(process.cwd(), 'screenshots');
/** Every wait has a deadline, so a missing event fails the test instead of hanging it. */
const DEADLINE = 15_000;

if (!BIN) throw new Error('set SYNCGRAPH_BIN to the syncgraph binary');

// ---- the server -------------------------------------------------------------------------

const dir = mkdtempSync(join(tmpdir(), 'syncgraph-browser-'));
const databaseUrl = process.env.SYNCGRAPH_DATABASE_URL ?? `sqlite://${join(dir, 'browser.db')}`;
const serverArgs = ['--database-url', databaseUrl, '--ws-keep-alive-secs', '2'];

/** Everything the servers logged, printed when a test fails. */
const serverLog = [];

/** Starts the real binary and resolves with its base URL once it serves. */
function startServer(listen = '127.0.0.1:0') {
  const child = spawn(BIN, ['serve', '--listen', listen, ...serverArgs], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, RUST_LOG: 'warn,syncgraph=info', NO_COLOR: '1' },
  });
  return new Promise((resolve, reject) => {
    let log = '';
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), DEADLINE);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      log += chunk;
      serverLog.push(...chunk.split('\n').filter(Boolean));
      const match = log.match(/serving GraphQL on (http:\/\/[0-9.:]+)\/graphql/);
      if (match) {
        clearTimeout(timer);
        resolve({ child, url: match[1] });
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before serving:\n${log}`));
    });
  });
}

function stopServer(child) {
  return new Promise((resolve, reject) => {
    if (child.exitCode !== null) return resolve();
    const timer = setTimeout(() => reject(new Error('server did not stop on SIGTERM')), DEADLINE);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

let server;
/** A second process on the same database, while a test runs one; pages may load from it too. */
let otherServer = null;
let browser;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
});

after(async () => {
  await browser?.close();
  if (server) await stopServer(server.child);
  rmSync(dir, { recursive: true, force: true });
});

// ---- helpers ----------------------------------------------------------------------------

let unique = 0;
const runId = Date.now().toString(36);
const email = (name) => `${name}-${runId}-${++unique}@example.com`;

async function screenshots(name, pages) {
  mkdirSync(SCREENSHOT_DIR, { recursive: true });
  for (const [i, page] of pages.entries()) {
    const path = join(SCREENSHOT_DIR, `${name}-${i}.png`);
    await page.screenshot({ path, fullPage: true }).catch(() => {});
    console.error(`screenshot: ${path}`);
  }
}

/** Runs `body` with fresh browser contexts; on failure saves a screenshot of every page. */
async function withPages(name, count, body) {
  const contexts = await Promise.all(Array.from({ length: count }, () => browser.newContext()));
  const pages = await Promise.all(contexts.map((context) => context.newPage()));
  const problems = [];
  const elsewhere = [];
  // What each page did, printed when the test fails: console, WebSocket traffic.
  const trace = [];
  const logged = serverLog.length;
  pages.forEach((page, i) => {
    page.setDefaultTimeout(DEADLINE);
    page.on('pageerror', (error) => problems.push(`page ${i}: ${error.message}`));
    page.on('console', (m) => trace.push(`page ${i} console.${m.type()}: ${m.text()}`));
    page.on('websocket', (ws) => {
      const at = () => new Date().toISOString().slice(11, 23);
      trace.push(`page ${i} ${at()} ws open ${ws.url()}`);
      ws.on('framesent', (f) => trace.push(`page ${i} ${at()} ws sent: ${String(f.payload).slice(0, 160)}`));
      ws.on('framereceived', (f) => trace.push(`page ${i} ${at()} ws received: ${String(f.payload).slice(0, 160)}`));
      ws.on('socketerror', (e) => trace.push(`page ${i} ${at()} ws error: ${e}`));
      ws.on('close', () => trace.push(`page ${i} ${at()} ws closed`));
    });
    // Everything a page loads comes from syncgraph itself: it must work with no internet.
    page.on('request', (request) => {
      const url = request.url();
      const local = [server, otherServer].filter(Boolean).flatMap((s) => [s.url, s.url.replace('http', 'ws')]);
      if (!local.some((base) => url.startsWith(base)) && !url.startsWith('data:')) elsewhere.push(url);
    });
  });
  try {
    await body(...pages);
    assert.deepEqual(problems, [], 'uncaught errors in the page');
    assert.deepEqual(elsewhere, [], 'requests that left the server');
    if (process.env.SCREENSHOT_ALL) await screenshots(name, pages);
  } catch (error) {
    await screenshots(name, pages);
    console.error(`${name}: what the pages did\n  ${trace.slice(-80).join('\n  ')}`);
    console.error(`${name}: what the server logged\n  ${serverLog.slice(logged).slice(-40).join('\n  ')}`);
    throw error;
  } finally {
    await Promise.all(contexts.map((context) => context.close()));
  }
}

async function graphql(token, query, variables = {}) {
  const response = await fetch(`${server.url}/graphql`, {
    signal: AbortSignal.timeout(DEADLINE),
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  assert.equal(body.errors, undefined, JSON.stringify(body.errors));
  return body.data;
}

/** Signs up through the demo's form (served by `base`) and returns the new user's id. */
async function signUp(page, name, base = server.url) {
  await page.goto(`${base}/demo`);
  await page.locator('#auth [name=name]').fill(name);
  await page.locator('#auth [name=email]').fill(email(name.toLowerCase()));
  await page.locator('#auth [name=password]').fill('correct horse battery');
  await page.getByRole('button', { name: 'Sign up' }).click();
  const whoami = await page.locator('#whoami').textContent({ timeout: DEADLINE });
  await page.locator('#whoami').waitFor({ state: 'visible' });
  const id = (await page.locator('#whoami').textContent()).match(/your user id: (\d+)/)?.[1];
  assert.ok(id, `no user id in ${whoami}`);
  return id;
}

/**
 * A signs up and creates a channel, B signs up, A adds B, and both open the channel. B's page
 * comes from `baseB`, another server process, if given.
 */
async function twoUsersInAChannel(a, b, channel, { baseB } = {}) {
  await signUp(a, 'Ada');
  const bob = await signUp(b, 'Bob', baseB);
  // Signed in, the channel list is a live query: the badge says so.
  for (const page of [a, b]) await page.locator('#status.live', { hasText: 'live' }).waitFor();
  await a.getByLabel('New channel name').fill(channel);
  await a.getByRole('button', { name: 'Create', exact: true }).first().click();
  await a.locator('#channel-name').filter({ hasText: channel }).waitFor();
  await a.getByLabel('User id to add').fill(bob);
  await a.getByRole('button', { name: 'Add member' }).click();
  await a.locator('#members').filter({ hasText: `Bob (${bob})` }).waitFor();
  // Bob's channel list is live: the channel appears without his doing anything.
  await b.locator('#channels button', { hasText: channel }).waitFor();
  await b.locator('#channels button', { hasText: channel }).click();
  await b.locator('#channel-name').filter({ hasText: channel }).waitFor();
  for (const page of [a, b]) await page.locator('#status.live').waitFor();
}

const message = (page, body) => page.locator('#messages li .body', { hasText: body });

async function post(page, body) {
  await page.getByLabel('Message', { exact: true }).fill(body);
  await page.getByRole('button', { name: 'Send' }).click();
}

// ---- the demo ---------------------------------------------------------------------------

test('two users on /demo: what one posts, the other sees within a second', async () => {
  await withPages('demo-live', 2, async (a, b) => {
    await twoUsersInAChannel(a, b, 'live');
    const started = Date.now();
    await post(a, 'hello from Ada');
    await message(b, 'hello from Ada').waitFor({ timeout: 1_000 });
    console.log(`delivered to the other browser in ${Date.now() - started} ms`);

    await post(b, 'hi Ada, Bob here');
    await message(a, 'hi Ada, Bob here').waitFor();

    // An edit reaches the other user too, as the same message.
    await a.locator('#messages li', { hasText: 'hello from Ada' }).getByRole('button', { name: 'edit' }).click();
    await a.getByLabel('Edit message').fill('hello from Ada, edited');
    await a.getByRole('button', { name: 'Save' }).first().click();
    await message(b, 'hello from Ada, edited').waitFor();
    assert.equal(await b.locator('#messages li').count(), 2);
  });
});

test("the demo's lists are live: a channel, a member and a document appear without a click", async () => {
  await withPages('demo-live-lists', 2, async (a, b) => {
    await signUp(a, 'Ada');
    const bob = await signUp(b, 'Bob');
    await a.getByLabel('New channel name').fill('lists');
    await a.getByRole('button', { name: 'Create', exact: true }).first().click();
    await a.locator('#channel-name').filter({ hasText: 'lists' }).waitFor();
    assert.equal(await b.locator('#channels button', { hasText: 'lists' }).count(), 0);
    // Ada adds Bob through the API, not the page: Bob's list and Ada's member list change
    // by themselves.
    const token = await a.evaluate(() => sessionStorage.getItem('syncgraph.demo.token'));
    const channelId = new URL(a.url()).hash.match(/channel=(\d+)/)[1];
    await graphql(token, 'mutation($input: AddChannelMemberInput!) { addChannelMember(input: $input) { id } }', {
      input: { channelId, userId: bob },
    });
    await b.locator('#channels button', { hasText: 'lists' }).waitFor();
    await a.locator('#members').filter({ hasText: `Bob (${bob})` }).waitFor();
    // Bob opens it; a document Ada creates appears in his list.
    await b.locator('#channels button', { hasText: 'lists' }).click();
    await b.locator('#channel-name').filter({ hasText: 'lists' }).waitFor();
    await graphql(token, 'mutation($input: CreateDocumentInput!) { createDocument(input: $input) { id } }', {
      input: { channelId, title: 'Agenda', body: '' },
    });
    await b.locator('#document-list option', { hasText: 'Agenda' }).waitFor({ state: 'attached' });
  });
});

// ---- shared documents --------------------------------------------------------------------

/** The text in a page's co-editor, from CodeMirror's state (its DOM also holds others' names). */
async function editorText(page) {
  return page.evaluate(async () => {
    // The same module the page loaded, so its EditorView knows the page's editor.
    const bundle = performance
      .getEntriesByType('resource')
      .map((entry) => entry.name)
      .find((url) => url.endsWith('/yjs-editor.mjs'));
    const { EditorView } = await import(bundle);
    const dom = document.querySelector('#editor .cm-editor');
    return dom ? EditorView.findFromDOM(dom).state.doc.toString() : null;
  });
}

/** Polls `check` until it returns something truthy; fails with `what` and `state()` at the deadline. */
async function waitUntil(what, check, state = async () => '') {
  const end = Date.now() + DEADLINE;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}: ${await state()}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const titleField = (page) => page.locator('#document-title [name=title]');

/** A creates a document in the open channel; B reopens the channel to open it too. */
async function openNewDocument(a, b, channel, title) {
  await a.getByLabel('New document title').fill(title);
  await a.getByRole('button', { name: 'Create' }).last().click();
  await a.locator('#document-state', { hasText: 'Synced' }).waitFor();
  await b.locator('#document-list option', { hasText: title }).waitFor({ state: 'attached' });
  await b.locator('#channels button', { hasText: channel }).click();
  await b.locator('#document-state', { hasText: 'Synced' }).waitFor();
  assert.equal(await titleField(b).inputValue(), title);
}

test('a title renamed by someone else first shows the conflict message; typing in the text is none', async () => {
  await withPages('demo-conflict', 2, async (a, b) => {
    await twoUsersInAChannel(a, b, 'docs');
    await openNewDocument(a, b, 'docs', 'Plan');

    // Bob starts renaming; meanwhile Ada types in the text, which raises the version with
    // every keystroke but leaves the title alone: Bob's title saves without a conflict.
    await titleField(b).fill('Plan B');
    await a.locator('#editor .cm-content').click();
    await a.keyboard.type('first steps');
    await waitUntil("Ada's text at Bob's", async () => (await editorText(b)) === 'first steps');
    await b.getByRole('button', { name: 'Save title' }).click();
    await b.locator('#document-state', { hasText: 'Title saved' }).waitFor();
    await waitUntil('the new title at Ada', async () => (await titleField(a).inputValue()) === 'Plan B');
    assert.equal(await b.locator('#conflict').isHidden(), true);

    // Both rename; Ada saves first. Bob's save is refused with a visible conflict, and his
    // title is kept.
    await titleField(b).fill("Bob's plan");
    await titleField(a).fill("Ada's plan");
    await a.getByRole('button', { name: 'Save title' }).click();
    await a.locator('#document-state', { hasText: 'Title saved' }).waitFor();
    await b.getByRole('button', { name: 'Save title' }).click();
    await b.locator('#conflict-message', { hasText: "someone else renamed this document “Ada's plan”" }).waitFor();
    if (process.env.SCREENSHOT_ALL) await screenshots('demo-conflict-shown', [b]);
    assert.equal(await titleField(b).inputValue(), "Bob's plan");
    // Keeping his title saves it, and it reaches Ada live; the text was never at stake.
    await b.getByRole('button', { name: 'Keep mine and save' }).click();
    await b.locator('#document-state', { hasText: 'Title saved' }).waitFor();
    await waitUntil("Bob's title at Ada", async () => (await titleField(a).inputValue()) === "Bob's plan");
    await a.locator('#document-list option', { hasText: "Bob's plan" }).waitFor({ state: 'attached' });
    assert.equal(await editorText(a), 'first steps');
    assert.equal(await editorText(b), 'first steps');
  });
});

test('two pages co-edit one document: concurrent typing at the same place converges, survives a reload, and a Node WebsocketProvider joining later sees it', async () => {
  // On PostgreSQL, Bob's page is served by a second process of the same database, so every
  // keystroke and cursor has to cross from one process to the other.
  if (/^postgres(ql)?:/.test(databaseUrl)) otherServer = await startServer();
  try {
    await withPages('demo-co-edit', 2, async (a, b) => {
      await twoUsersInAChannel(a, b, 'co-edit', { baseB: otherServer?.url });
      if (otherServer) assert.ok(b.url().startsWith(otherServer.url), `Bob's page is on the second process: ${b.url()}`);
      await openNewDocument(a, b, 'co-edit', 'Notes');
      const documentId = await a.locator('#document-list').inputValue();
      const token = await a.evaluate(() => sessionStorage.getItem('syncgraph.demo.token'));

      // Each page types characters of its own, so the result can be taken apart again.
      const charsA = 'abcdefghijklmnopqrstuvwxyz';
      const charsB = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ';
      const only = (text, chars) => [...text].filter((c) => chars.includes(c)).join('');
      const rest = (text) => [...text].filter((c) => !charsA.includes(c) && !charsB.includes(c)).join('');
      await a.locator('#editor .cm-content').click();
      await a.keyboard.type('[]');
      await waitUntil("Ada's first text at Bob's", async () => (await editorText(b)) === '[]');

      // Both at the start, typing at the same moment, then both at the end. Neither has seen
      // the other's first keystroke when typing its own.
      const typed = { a: [], b: [] };
      for (const [key, place] of [['Control+Home', 'start'], ['Control+End', 'end']]) {
        for (const page of [a, b]) {
          await page.locator('#editor .cm-content').click();
          await page.keyboard.press(key);
        }
        const textA = place === 'start' ? 'adatypesfirst' : 'thenattheend';
        const textB = place === 'start' ? '0123456789' : 'BOBENDS42';
        await Promise.all([a.keyboard.type(textA, { delay: 12 }), b.keyboard.type(textB, { delay: 17 })]);
        typed.a.push(textA);
        typed.b.push(textB);
      }
      const expectedA = typed.a.join('');
      const expectedB = typed.b.join('');
      const length = 2 + expectedA.length + expectedB.length;
      const final = await waitUntil(
        'both editors to hold every keystroke of both',
        async () => {
          const [textA, textB] = [await editorText(a), await editorText(b)];
          return textA === textB && textA.length === length ? textA : null;
        },
        async () => `Ada's ${JSON.stringify(await editorText(a))}, Bob's ${JSON.stringify(await editorText(b))}`,
      );
      console.log(`converged on ${JSON.stringify(final)}`);
      // Yjs never reorders what exists: each one's keystrokes are there in the order typed,
      // the start's before the brackets and the end's after them.
      assert.equal(only(final, charsA), expectedA, "Ada's keystrokes, in order");
      assert.equal(only(final, charsB), expectedB, "Bob's keystrokes, in order");
      assert.equal(rest(final), '[]', 'the text typed before');
      assert.ok(final.indexOf('[') >= typed.a[0].length + typed.b[0].length, 'what was typed at the start is before it');

      // Bob's cursor shows in Ada's editor, under his name (y-codemirror's remote cursor).
      await a.locator('#editor .cm-ySelectionInfo', { hasText: 'Bob' }).waitFor({ state: 'attached' });
      await b.locator('#editor .cm-ySelectionInfo', { hasText: 'Ada' }).waitFor({ state: 'attached' });

      // Reloaded, Bob's page shows the same text, from the server (stored in SQL).
      await b.reload();
      await b.locator('#document-state', { hasText: 'Synced' }).waitFor();
      await waitUntil('the same text after the reload', async () => (await editorText(b)) === final,
        async () => JSON.stringify(await editorText(b)));
      let stored;
      await waitUntil(
        'the stored body to equal the text',
        async () => {
          stored = (await graphql(token, 'query($id: ID!) { document(id: $id) { body } }', { id: documentId })).document;
          return stored?.body === final;
        },
        async () => JSON.stringify(stored),
      );

      // A late joiner, the unmodified y-websocket client in Node, gets it all from the server.
      const sockets = [];
      const doc = new Y.Doc();
      const provider = new WebsocketProvider(`${server.url.replace('http', 'ws')}/yjs`, documentId, doc, {
        params: { access_token: token },
        WebSocketPolyfill: class extends WebSocket {
          constructor(...args) {
            super(...args);
            sockets.push(this);
          }
        },
        // Node has a BroadcastChannel too; only the server must be the source.
        disableBc: true,
      });
      try {
        await waitUntil('the Node provider to sync', () => provider.synced);
        assert.equal(doc.getText('body').toString(), final);
      } finally {
        provider.destroy();
        doc.destroy();
        // The ws client would otherwise keep the test process alive while a close lingers.
        await waitUntil('the Node provider to close its socket', () => sockets.every((s) => s.readyState === WebSocket.CLOSED))
          .catch((error) => {
            for (const socket of sockets) socket.terminate();
            throw error;
          });
      }
    });
  } finally {
    if (otherServer) await stopServer(otherServer.child);
    otherServer = null;
  }
});

/** Records a page's messageEvents traffic: each `subscribe` sent, each event received. */
function recordFeed(page) {
  const feed = { subscribes: [], events: [] };
  page.on('websocket', (ws) => {
    ws.on('framesent', ({ payload }) => {
      const frame = JSON.parse(String(payload));
      if (frame.type === 'subscribe' && frame.payload.query.includes('messageEvents')) {
        feed.subscribes.push(frame.payload.variables);
      }
    });
    ws.on('framereceived', ({ payload }) => {
      const event = JSON.parse(String(payload)).payload?.data?.messageEvents;
      if (event) feed.events.push(event);
    });
  });
  return feed;
}

test("Chromium's WebSocket closes cleanly: the server answers a page's close with its code", async () => {
  await withPages('ws-close', 1, async (page) => {
    await page.goto(`${server.url}/demo`);
    const wsUrl = `${server.url.replace('http', 'ws')}/graphql`;
    const closed = await page.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const socket = new WebSocket(url, 'graphql-transport-ws');
          const timer = setTimeout(() => reject(new Error('no close in time')), 10_000);
          socket.onopen = () => socket.close(4321, 'bye');
          socket.onclose = (event) => {
            clearTimeout(timer);
            resolve({ code: event.code, reason: event.reason, wasClean: event.wasClean });
          };
        }),
      wsUrl,
    );
    assert.deepEqual(closed, { code: 4321, reason: 'bye', wasClean: true });
  });
});

test('after a server restart the demo resumes from its cursor and loses nothing', async () => {
  await withPages('demo-restart', 2, async (a, b) => {
    const feed = recordFeed(b);
    await twoUsersInAChannel(a, b, 'restart');
    await post(a, 'before the restart');
    await message(b, 'before the restart').waitFor();
    const token = await a.evaluate(() => sessionStorage.getItem('syncgraph.demo.token'));
    const channelId = new URL(a.url()).hash.match(/channel=(\d+)/)[1];
    const lastCursor = feed.events.at(-1).cursor;
    const subscribed = feed.subscribes.length;

    const listen = new URL(server.url).host;
    await stopServer(server.child);
    await b.locator('#status', { hasText: /offline|reconnecting/ }).waitFor();
    server = await startServer(listen);
    await graphql(token, 'mutation($input: PostMessageInput!) { postMessage(input: $input) { id } }', {
      input: { channelId, body: 'while the page was away' },
    });
    await message(b, 'while the page was away').waitFor();
    await b.locator('#status.live').waitFor();
    await post(a, 'after the restart');
    await message(b, 'after the restart').waitFor();

    // The page subscribed again from the last cursor it had seen (the token still works:
    // the server keeps its generated secret in the database), and no event came twice.
    const resumed = feed.subscribes.slice(subscribed);
    assert.ok(resumed.length >= 1, 'the page subscribed again');
    assert.equal(resumed[0].after, lastCursor, 'resumed after the last cursor');
    const seen = feed.events.map((event) => `${event.message.id}@${event.message.version}`);
    assert.equal(new Set(seen).size, seen.length, `no event twice: ${seen.join(', ')}`);
    const bodies = feed.events.map((event) => event.message.body);
    for (const body of ['before the restart', 'while the page was away', 'after the restart']) {
      assert.ok(bodies.includes(body), `"${body}" arrived as an event`);
    }
  });
});

// ---- EventSource -------------------------------------------------------------------------

test("a browser's EventSource resumes across a server restart with nothing lost and nothing twice", async () => {
  const signedUp = await graphql(null, 'mutation($input: SignUpInput!) { signUp(input: $input) { token } }', {
    input: { name: 'Eve', email: email('eve'), password: 'correct horse battery' },
  });
  const token = signedUp.signUp.token;
  const created = await graphql(token, 'mutation { createChannel(input: { name: "sse" }) { id } }');
  const channelId = created.createChannel.id;
  const postMessage = (base, body) =>
    fetch(`${base}/graphql`, {
      signal: AbortSignal.timeout(DEADLINE),
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: JSON.stringify({
        query: 'mutation($input: PostMessageInput!) { postMessage(input: $input) { id } }',
        variables: { input: { channelId, body } },
      }),
    }).then(async (response) => assert.equal((await response.json()).errors, undefined));

  await withPages('event-source', 1, async (page) => {
    // EventSource sets no headers: the token rides in the URL, and the stream's requests
    // are recorded to see the reconnect's Last-Event-ID.
    const requests = [];
    page.on('request', (request) => {
      // allHeaders: the headers sent on the wire (Last-Event-ID is added by the network stack).
      if (request.url().includes('/graphql/stream')) requests.push(request.allHeaders());
    });
    await page.goto(`${server.url}/healthz`);
    const query = 'subscription($c: ID!) { messageEvents(channelId: $c) { cursor message { id version body } } }';
    const source = new URL('/graphql/stream', server.url);
    source.searchParams.set('query', query);
    source.searchParams.set('variables', JSON.stringify({ c: channelId }));
    source.searchParams.set('access_token', token);
    await page.evaluate((url) => {
      window.received = [];
      window.opened = 0;
      const events = new EventSource(url);
      events.onopen = () => (window.opened += 1);
      events.addEventListener('next', (event) => {
        window.received.push({ id: event.lastEventId, payload: JSON.parse(event.data) });
      });
      events.addEventListener('complete', () => events.close());
    }, source.toString());
    const bodies = () =>
      page.evaluate(() => window.received.map((event) => event.payload.data.messageEvents.message.body));
    const until = async (what, predicate) => {
      const started = Date.now();
      while (!predicate(await bodies())) {
        if (Date.now() - started > DEADLINE) assert.fail(`never received ${what}: ${JSON.stringify(await bodies())}`);
        await page.waitForTimeout(50);
      }
    };
    await page.waitForFunction(() => window.opened === 1);
    await postMessage(server.url, 'before the restart');
    await until('the first message', (got) => got.includes('before the restart'));
    const lastId = await page.evaluate(() => window.received.at(-1).id);

    // The page's server stops; another process on the same database takes a write; the
    // page's server comes back on its address, and the EventSource reconnects by itself.
    const listen = new URL(server.url).host;
    await stopServer(server.child);
    const other = await startServer();
    await postMessage(other.url, 'while the server was down');
    await stopServer(other.child);
    server = await startServer(listen);
    await until('the message written while it was away', (got) => got.includes('while the server was down'));
    await postMessage(server.url, 'after the restart');
    await until('the message after the restart', (got) => got.includes('after the restart'));

    assert.deepEqual(await bodies(), ['before the restart', 'while the server was down', 'after the restart']);
    const received = await page.evaluate(() => window.received);
    for (const event of received) {
      assert.equal(event.id, event.payload.data.messageEvents.cursor, 'each event id is its cursor');
    }
    const resumedWith = (await Promise.all(requests)).slice(1).map((headers) => headers['last-event-id']);
    assert.ok(resumedWith.includes(lastId), `a reconnect sent Last-Event-ID ${lastId}: ${JSON.stringify(resumedWith)}`);
  });
});

// ---- GraphiQL ---------------------------------------------------------------------------

/** Sets a GraphiQL editor's text through its CodeMirror instance, as typing would. */
async function setEditor(page, selector, text) {
  await page.locator(selector).first().waitFor({ state: 'attached' });
  await page.evaluate(
    ([selector, text]) => {
      const editor = [...document.querySelectorAll(selector)].find((e) => e.offsetParent !== null);
      editor.CodeMirror.setValue(text);
    },
    [selector, text],
  );
}

/**
 * Clicks GraphiQL's run button until the operation is sent (over HTTP, or as a WebSocket
 * `subscribe`). Right after an editor's text was set programmatically GraphiQL may ignore a
 * click while it settles its state (a person typing never sees this), so a click that
 * sent nothing is repeated; one that sent the operation is never repeated, as a second
 * click on a running subscription would stop it.
 */
async function run(page, marker) {
  for (let attempt = 0; attempt < 30; attempt++) {
    let onRequest;
    let onSocket;
    const sent = new Promise((resolve) => {
      onRequest = (request) => request.postData()?.includes(marker) && resolve(true);
      onSocket = (ws) => ws.on('framesent', (frame) => String(frame.payload).includes(marker) && resolve(true));
      page.on('request', onRequest);
      page.on('websocket', onSocket);
      setTimeout(() => resolve(false), 500);
    });
    await page.locator('.graphiql-execute-button').click();
    const started = await sent;
    page.off('request', onRequest);
    page.off('websocket', onSocket);
    if (started) return;
  }
  assert.fail(`GraphiQL never sent the operation containing ${marker}`);
}

async function responseText(page) {
  return page.evaluate(() => document.querySelector('.graphiql-response .CodeMirror')?.CodeMirror.getValue() ?? '');
}

async function waitForResponse(page, what, predicate) {
  const started = Date.now();
  for (;;) {
    const text = await responseText(page);
    if (predicate(text)) return text;
    if (Date.now() - started > DEADLINE) assert.fail(`GraphiQL never showed ${what}; it shows:\n${text}`);
    await page.waitForTimeout(100);
  }
}

test('GraphiQL renders offline and runs a query and a subscription with the headers editor token', async () => {
  const { signUp: auth } = await graphql(
    null,
    'mutation($input: SignUpInput!) { signUp(input: $input) { token user { id } } }',
    { input: { name: 'Grace', email: email('grace'), password: 'correct horse battery' } },
  );
  const { createChannel } = await graphql(auth.token, 'mutation { createChannel(input: { name: "graphiql" }) { id } }');
  await withPages('graphiql', 1, async (page) => {
    // GraphiQL runs nothing until its schema introspection has answered.
    const introspected = page.waitForResponse(
      (response) => response.url().endsWith('/graphql') && response.request().postData()?.includes('IntrospectionQuery'),
    );
    await page.goto(`${server.url}/`);
    await page.locator('.graphiql-container').waitFor();
    const introspection = await introspected;
    assert.equal(introspection.status(), 200);
    const schema = await introspection.json();
    assert.equal(schema.errors, undefined, `GraphiQL's introspection failed: ${JSON.stringify(schema.errors)}`);
    assert.ok(schema.data.__schema.types.length > 10);
    // The headers editor is open by default. The key is written as the README says; the
    // page and the server match it in any letter case.
    await setEditor(page, '.graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror', JSON.stringify({ Authorization: `Bearer ${auth.token}` }));

    await setEditor(page, '.graphiql-query-editor .CodeMirror', '{ me { name } }');
    await run(page, '{ me { name } }');
    await waitForResponse(page, 'the signed-in user', (text) => text.includes('"name": "Grace"'));

    await setEditor(
      page,
      '.graphiql-query-editor .CodeMirror',
      `subscription { messageEvents(channelId: "${createChannel.id}") { kind message { body } } }`,
    );
    await run(page, 'messageEvents');
    // The subscription is live once the server counts it; then post and watch it arrive.
    const posted = [];
    for (let i = 0; i < 50; i++) {
      const body = `live in GraphiQL ${i}`;
      await graphql(auth.token, 'mutation($input: PostMessageInput!) { postMessage(input: $input) { id } }', {
        input: { channelId: createChannel.id, body },
      });
      posted.push(body);
      const text = await responseText(page);
      if (posted.some((b) => text.includes(b))) break;
      await page.waitForTimeout(200);
    }
    await waitForResponse(page, 'a live message', (text) => text.includes('"kind": "CREATED"') && posted.some((b) => text.includes(b)));
  });
});
