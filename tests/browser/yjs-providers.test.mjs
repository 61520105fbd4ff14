// The y-websocket endpoint (`/yjs/<document id>`) driven by the real, unmodified npm clients:
// yjs, y-websocket's WebsocketProvider, y-protocols' awareness, and ws as the WebSocket of
// Node. A Rust test starts the servers, creates the document and passes everything through
// the environment; run alone (from tests/browser) with
//   YJS_SERVERS=ws://127.0.0.1:40001/yjs,ws://127.0.0.1:40002/yjs YJS_DOCUMENT=7 \
//   YJS_TOKEN=... YJS_OUTSIDER_TOKEN=... YJS_GRAPHQL=http://127.0.0.1:40001/graphql \
//   YJS_INITIAL='shared notes' node --test --test-concurrency=1 yjs-providers.test.mjs
//
// YJS_SERVERS holds one or two base URLs. With two, the peers are spread over both servers
// (A on the first, B on the second, the late joiner C on the first again), so whatever one
// peer does must cross from one server to the other.
//
// YJS_REFERENCE=1 is only for checking this script against y-websocket's reference Node server
// (@y/websocket-server), which has no authentication, no SQL and starts every room empty. It
// skips exactly what such a server cannot do: the GraphQL check of the stored body and the
// test of tokens; and it lets peer A type the initial text into the empty room. The run from
// `cargo test` never sets it, so there nothing is skipped.
//
// YJS_TRACE=1 prints every frame of every test (a failed test always prints its last frames).
// YJS_SEED repeats the characters and random choices of a failed run (each run prints its
// seed); where they land still depends on when the other peer's keystrokes arrive.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
import * as syncProtocol from 'y-protocols/sync';
// lib0 is what yjs and y-protocols encode with; pinned in package.json at the version they use.
import * as encoding from 'lib0/encoding';
import * as decoding from 'lib0/decoding';

const env = (name) => {
  const value = process.env[name];
  if (value === undefined || value === '') throw new Error(`set ${name}`);
  return value;
};

const REFERENCE = process.env.YJS_REFERENCE === '1';
const SERVERS = env('YJS_SERVERS').split(',').map((s) => s.trim()).filter(Boolean);
const DOCUMENT = env('YJS_DOCUMENT');
const TOKEN = REFERENCE ? process.env.YJS_TOKEN ?? 'none' : env('YJS_TOKEN');
const INITIAL = env('YJS_INITIAL');
const OUTSIDER_TOKEN = REFERENCE ? null : env('YJS_OUTSIDER_TOKEN');
const GRAPHQL = REFERENCE ? null : env('YJS_GRAPHQL');
if (SERVERS.length < 1 || SERVERS.length > 2) throw new Error('YJS_SERVERS holds one or two URLs');
/** A on the first server, B on the last (the same one when there is only one), C on the first. */
const SERVER_A = SERVERS[0];
const SERVER_B = SERVERS[SERVERS.length - 1];
const SERVER_C = SERVERS[0];

/** Every wait has a deadline, so a missing message fails the test instead of hanging it. */
const SYNC_DEADLINE = 5_000;
const CONVERGE_DEADLINE = 20_000;
const SQL_DEADLINE = 10_000;
const AWARENESS_DEADLINE = 5_000;
/** Well below y-protocols' 30 s `outdatedTimeout`: only the server can make a peer go this fast. */
const GONE_DEADLINE = 3_000;
const CLOSE_DEADLINE = 5_000;
const KEYSTROKES = 150;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns something truthy; fails with `what` (and `state()`) at the deadline. */
async function waitFor(what, deadline, check, state = () => '') {
  const end = Date.now() + deadline;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${deadline} ms waiting for ${what}${state() ? `: ${state()}` : ''}`);
    await sleep(20);
  }
}

// ---- tracing ----------------------------------------------------------------------------

/** Names a y-websocket frame: `sync/step1`, `sync/step2`, `sync/update`, `awareness`, ... */
function describe(data) {
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer ?? data, data.byteOffset ?? 0, data.byteLength ?? data.length);
  try {
    const decoder = decoding.createDecoder(bytes);
    const type = decoding.readVarUint(decoder);
    if (type === 0) {
      const sub = decoding.readVarUint(decoder);
      return `sync/${['step1', 'step2', 'update'][sub] ?? sub} (${bytes.length} B)`;
    }
    if (type === 1) {
      const update = decoding.createDecoder(decoding.readVarUint8Array(decoder));
      const clients = [];
      for (let n = decoding.readVarUint(update); n > 0; n--) {
        const client = decoding.readVarUint(update);
        const clock = decoding.readVarUint(update);
        const state = decoding.readVarString(update);
        clients.push(`${client}@${clock}${state === 'null' ? ' null' : ''}`);
      }
      return `awareness [${clients.join(', ')}]`;
    }
    return `${['sync', 'awareness', 'auth', 'query-awareness'][type] ?? `type ${type}`} (${bytes.length} B)`;
  } catch {
    return `undecodable (${bytes.length} B)`;
  }
}

/**
 * A `ws` WebSocket that writes every frame it sends or receives into `trace` (printed when a
 * test fails) and remembers itself in `sockets`, so teardown can check that each one closed.
 * y-websocket only calls `new`, `send`, `close` and the `on*` properties, all left as they are.
 */
function tracedWebSocket(label, trace, sockets) {
  return class TracedWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
      const at = () => new Date().toISOString().slice(11, 23);
      trace.push(`${at()} ${label} connects to ${url.replace(/access_token=[^&]*/, 'access_token=…')}`);
      this.on('open', () => trace.push(`${at()} ${label} open`));
      this.on('message', (data, binary) => trace.push(`${at()} ${label} <- ${binary ? describe(data) : `text ${String(data).slice(0, 80)}`}`));
      this.on('close', (code, reason) => trace.push(`${at()} ${label} closed ${code} ${reason}`));
      this.on('error', (error) => trace.push(`${at()} ${label} error ${error.message}`));
      this._trace = (line) => trace.push(`${at()} ${label} ${line}`);
    }

    send(data, ...rest) {
      this._trace(`-> ${describe(data)}`);
      return super.send(data, ...rest);
    }
  };
}

// ---- peers ------------------------------------------------------------------------------

/**
 * Runs `body` with a function that opens peers (a Y.Doc and its WebsocketProvider each). Every
 * peer is destroyed afterwards, and every socket must then close within CLOSE_DEADLINE: the ws
 * client waits up to 30 s for the server's answer to its close frame, which would keep the
 * process alive long after the tests.
 */
async function withPeers(name, body) {
  const trace = [];
  const sockets = [];
  const peers = [];
  const open = (label, server, { token = TOKEN, connect = true, document = DOCUMENT } = {}) => {
    const doc = new Y.Doc();
    const provider = new WebsocketProvider(server, document, doc, {
      params: { access_token: token },
      WebSocketPolyfill: tracedWebSocket(label, trace, sockets),
      // Node 20 has a global BroadcastChannel, through which y-websocket would sync the peers of
      // this process directly, bypassing the server under test.
      disableBc: true,
      connect,
    });
    const peer = { label, doc, provider, text: doc.getText('body') };
    peers.push(peer);
    return peer;
  };
  let failed = false;
  try {
    await body(open, trace);
    if (process.env.YJS_TRACE === '1') console.log(`${name}: frames\n  ${trace.join('\n  ')}`);
  } catch (error) {
    failed = true;
    console.error(`${name}: the last frames\n  ${trace.slice(-120).join('\n  ')}`);
    throw error;
  } finally {
    for (const { provider, doc } of peers) {
      provider.destroy();
      doc.destroy();
    }
    const closed = () => sockets.every((socket) => socket.readyState === WebSocket.CLOSED);
    const end = Date.now() + CLOSE_DEADLINE;
    while (!closed() && Date.now() < end) await sleep(20);
    if (!closed()) {
      for (const socket of sockets) socket.terminate();
      // eslint-disable-next-line no-unsafe-finally
      if (!failed) throw new Error(`${name}: a socket was still open ${CLOSE_DEADLINE} ms after the client closed it`);
    }
  }
}

/** Resolves once the provider has received the server's sync step 2. */
function synced(peer, deadline = SYNC_DEADLINE) {
  if (peer.provider.synced) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      peer.provider.off('sync', onSync);
      reject(new Error(`${peer.label} did not sync within ${deadline} ms`));
    }, deadline);
    const onSync = (state) => {
      if (!state) return;
      clearTimeout(timer);
      peer.provider.off('sync', onSync);
      resolve();
    };
    peer.provider.on('sync', onSync);
  });
}

/** A small seeded PRNG (mulberry32), so a run's keystrokes can be repeated with YJS_SEED. */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Up to ten characters of `pool` that occur neither in the initial text nor in `taken`. */
function alphabet(pool, taken = '') {
  const chars = [...pool].filter((c) => !INITIAL.includes(c) && !taken.includes(c)).slice(0, 10).join('');
  assert.ok(chars.length >= 3, `YJS_INITIAL uses too many of ${pool}`);
  return chars;
}

const only = (text, chars) => [...text].filter((c) => chars.includes(c)).join('');
const without = (text, chars) => [...text].filter((c) => !chars.includes(c)).join('');
const tally = (text) => [...text].reduce((counts, c) => counts.set(c, (counts.get(c) ?? 0) + 1), new Map());
const sorted = (map) => [...map].sort(([a], [b]) => (a < b ? -1 : 1));

async function graphql(query, variables) {
  const response = await fetch(GRAPHQL, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${TOKEN}` },
    body: JSON.stringify({ query, variables }),
    signal: AbortSignal.timeout(5_000),
  });
  const json = await response.json();
  if (json.errors) throw new Error(`GraphQL errors: ${JSON.stringify(json.errors)}`);
  return json.data;
}

// ---- the tests --------------------------------------------------------------------------

const seed = Number(process.env.YJS_SEED ?? Math.floor(Math.random() * 2 ** 32));
console.log(`YJS_SEED=${seed} YJS_SERVERS=${SERVERS.join(',')}${REFERENCE ? ' (reference server)' : ''}`);

test('providers on the same document converge on every keystroke, including at the same position', async () => {
  await withPeers('converge', async (open) => {
    const a = open('A', SERVER_A);
    const b = open('B', SERVER_B);
    await Promise.all([synced(a), synced(b)]);
    if (REFERENCE && a.text.length === 0) {
      // The reference server starts the room empty; syncgraph serves the document's body.
      a.text.insert(0, INITIAL);
      await waitFor('B to receive the initial text', SYNC_DEADLINE, () => b.text.toString() === INITIAL);
    }
    assert.equal(a.text.toString(), INITIAL, 'A starts from the stored body');
    assert.equal(b.text.toString(), INITIAL, 'B starts from the stored body');

    // Distinct characters per peer, none of them in the initial text, so the final text can
    // be taken apart again: A's characters, B's characters and the initial text.
    const charsA = alphabet('ABCDEFGHIJKLMNOPQRSTUVWXYZ');
    const charsB = alphabet('0123456789!#$%&*+=?@', charsA);
    const rngA = random(seed);
    const rngB = random(seed ^ 0x9e3779b9);

    // Counts the updates each peer receives from the server while it is still typing: the
    // server must pass keystrokes on as they come, not after the burst.
    const remoteWhileTyping = new Map([[a, 0], [b, 0]]);
    const typing = new Set([a, b]);
    for (const peer of [a, b]) {
      peer.doc.on('update', (_update, origin) => {
        if (origin === peer.provider && typing.has(peer)) remoteWhileTyping.set(peer, remoteWhileTyping.get(peer) + 1);
      });
    }

    /**
     * One keystroke after another with 0-5 ms between them, during which the other peer's
     * keystrokes arrive. Every third goes to position 0, where the other peer types too (the
     * very first keystrokes of both are at 0 and neither has seen the other's); the rest go to
     * the end or to a random position.
     */
    const type = async (peer, chars, rng) => {
      const typed = [];
      for (let k = 0; k < KEYSTROKES; k++) {
        const c = chars[Math.floor(rng() * chars.length)];
        const at = k % 3 === 0 ? 0 : k % 3 === 1 ? peer.text.length : Math.floor(rng() * (peer.text.length + 1));
        peer.text.insert(at, c);
        typed.push(c);
        await sleep(Math.floor(rng() * 6));
      }
      typing.delete(peer);
      // Yjs never reorders what exists, so the order of this peer's own characters in its own
      // text now is their order in the final text, whatever the other peer inserts between.
      return { typed: typed.join(''), order: only(peer.text.toString(), chars) };
    };
    const [typedA, typedB] = await Promise.all([type(a, charsA, rngA), type(b, charsB, rngB)]);

    const expectedLength = INITIAL.length + 2 * KEYSTROKES;
    await waitFor(`A and B to hold the same ${expectedLength} characters`, CONVERGE_DEADLINE,
      () => a.text.toString() === b.text.toString() && a.text.length === expectedLength,
      () => `A has ${a.text.length}, B has ${b.text.length}`);
    const final = a.text.toString();

    assert.equal(without(final, charsA + charsB), INITIAL, 'the initial text is intact, in order');
    assert.deepEqual(sorted(tally(only(final, charsA))), sorted(tally(typedA.typed)), "every one of A's keystrokes is there");
    assert.deepEqual(sorted(tally(only(final, charsB))), sorted(tally(typedB.typed)), "every one of B's keystrokes is there");
    assert.equal(only(final, charsA), typedA.order, "A's keystrokes are in A's order");
    assert.equal(only(final, charsB), typedB.order, "B's keystrokes are in B's order");
    assert.ok(remoteWhileTyping.get(a) > 0, "A received some of B's keystrokes while still typing");
    assert.ok(remoteWhileTyping.get(b) > 0, "B received some of A's keystrokes while still typing");

    // A late joiner gets everything from the server alone (A and B are idle now).
    const c = open('C', SERVER_C);
    await synced(c);
    assert.equal(c.text.toString(), final, 'the late joiner C sees the same text after its sync');

    if (REFERENCE) return; // the reference server has no SQL
    let stored;
    await waitFor('the body stored in SQL to equal the text', SQL_DEADLINE, async () => {
      stored = (await graphql('query($id: ID!) { document(id: $id) { body version } }', { id: DOCUMENT })).document;
      return stored?.body === final;
    }, () => `stored ${JSON.stringify(stored)}, text ${JSON.stringify(final)}`);
  });
});

test('awareness reaches the other peers and a closed peer is gone at once', async () => {
  await withPeers('awareness', async (open) => {
    // A's state is set before it connects, so it travels in the awareness message that
    // y-websocket sends right after its sync step 1; B connects only after A has synced, so
    // the server must hand existing states to a newcomer (across servers when there are two).
    const a = open('A', SERVER_A, { connect: false });
    a.provider.awareness.setLocalStateField('user', { name: 'A', color: '#d33' });
    a.provider.connect();
    await synced(a);
    const b = open('B', SERVER_B);
    await synced(b);
    const stateOf = (observer, peer) => observer.provider.awareness.getStates().get(peer.doc.clientID);
    await waitFor("B to see A's user", AWARENESS_DEADLINE, () => stateOf(b, a)?.user?.name === 'A',
      () => JSON.stringify([...b.provider.awareness.getStates()]));

    // A live change: A's cursor, as y-prosemirror/y-codemirror send it (relative positions).
    const index = Math.min(5, a.text.length);
    const position = Y.relativePositionToJSON(Y.createRelativePositionFromTypeIndex(a.text, index));
    a.provider.awareness.setLocalStateField('cursor', { anchor: position, head: position });
    const cursor = await waitFor("B to see A's cursor", AWARENESS_DEADLINE, () => stateOf(b, a)?.cursor);
    const there = Y.createAbsolutePositionFromRelativePosition(Y.createRelativePositionFromJSON(cursor.anchor), b.doc);
    assert.equal(there?.index, index, "A's cursor points at the same place in B's text");

    // And the other way round.
    b.provider.awareness.setLocalStateField('user', { name: 'B', color: '#33d' });
    await waitFor("A to see B's user", AWARENESS_DEADLINE, () => stateOf(a, b)?.user?.name === 'B');

    // A closes. y-websocket itself sends A's state as null before its close frame, so this
    // part mostly checks that the server passes that message on.
    const gone = a.doc.clientID;
    a.provider.destroy();
    await waitFor("A's state to leave B", GONE_DEADLINE, () => !b.provider.awareness.getStates().has(gone),
      () => JSON.stringify(stateOf(b, a)));

    // D's connection drops without a word (no null state, no close frame: a killed tab or a
    // lost network). Only the server knows, and it must tell B at once instead of leaving it
    // to y-protocols' 30 s timeout.
    const d = open('D', SERVER_A, { connect: false });
    d.provider.awareness.setLocalStateField('user', { name: 'D' });
    d.provider.connect();
    await synced(d);
    await waitFor("B to see D's user", AWARENESS_DEADLINE, () => stateOf(b, d)?.user?.name === 'D');
    const socket = d.provider.ws;
    d.provider.shouldConnect = false; // the provider would otherwise reconnect at once
    socket.terminate();
    await waitFor("D's state to leave B after D's connection dropped", GONE_DEADLINE,
      () => !b.provider.awareness.getStates().has(d.doc.clientID), () => JSON.stringify(stateOf(b, d)));
    assert.equal(stateOf(b, b)?.user?.name, 'B', 'B keeps its own state');
  });
});

test('no token gets 4401, a non-member gets 4403, and neither receives any content', { skip: REFERENCE && 'the reference server has no authentication' }, async () => {
  /**
   * Opens a raw socket, sends what a client sends first (sync step 1, awareness query) so a
   * server that answered before checking would give itself away, and resolves with the close
   * code and the number of binary messages received.
   */
  const attempt = (url) => new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    socket.binaryType = 'arraybuffer';
    let binary = 0;
    const seen = [];
    const timer = setTimeout(() => {
      socket.terminate();
      reject(new Error(`${url}: no close within ${CLOSE_DEADLINE} ms (received ${seen.join(', ') || 'nothing'})`));
    }, CLOSE_DEADLINE);
    socket.on('open', () => {
      const step1 = encoding.createEncoder();
      encoding.writeVarUint(step1, 0);
      syncProtocol.writeSyncStep1(step1, new Y.Doc());
      const query = encoding.createEncoder();
      encoding.writeVarUint(query, 3);
      // The server may close at any moment; a send after its close frame is not an error here.
      socket.send(encoding.toUint8Array(step1), () => {});
      socket.send(encoding.toUint8Array(query), () => {});
    });
    socket.on('message', (data, isBinary) => {
      seen.push(isBinary ? describe(data) : `text ${String(data)}`);
      if (isBinary) binary++;
    });
    socket.on('unexpected-response', (_request, response) => {
      clearTimeout(timer);
      socket.terminate();
      reject(new Error(`${url}: the upgrade was answered with HTTP ${response.statusCode} instead of a close frame`));
    });
    socket.on('error', () => {}); // reported through 'close' (1006) or the rejection above
    socket.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, binary, seen });
    });
  });
  const base = `${SERVER_A}/${DOCUMENT}`;
  for (const [what, url, expected] of [
    ['no token', base, 4401],
    ['an invalid token', `${base}?access_token=not-a-token`, 4401],
    ['a non-member', `${base}?access_token=${encodeURIComponent(OUTSIDER_TOKEN)}`, 4403],
    ['a document that does not exist', `${SERVER_A}/999999?access_token=${encodeURIComponent(TOKEN)}`, 4403],
  ]) {
    const { code, binary, seen } = await attempt(url);
    assert.equal(code, expected, `${what}: close code (received ${seen.join(', ') || 'nothing'})`);
    assert.equal(binary, 0, `${what}: binary messages before the close (${seen.join(', ')})`);
  }

  // The real client: y-websocket (3.x) takes 4400-4499 as final, emits `closed` and does not
  // reconnect; its document stays empty.
  await withPeers('refused provider', async (open) => {
    const outsider = open('outsider', SERVER_B, { token: OUTSIDER_TOKEN });
    const closed = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no 'closed' event within ${CLOSE_DEADLINE} ms`)), CLOSE_DEADLINE);
      outsider.provider.on('closed', (event) => {
        clearTimeout(timer);
        resolve(event);
      });
    });
    assert.equal(closed.code, 4403);
    // Longer than the provider's first reconnect delays (200, 400 ms).
    await sleep(1_000);
    assert.equal(outsider.provider.ws, null, 'the provider did not reconnect');
    assert.equal(outsider.provider.synced, false);
    assert.equal(outsider.text.toString(), '', 'the outsider received no content');
  });
});
