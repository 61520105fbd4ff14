// Soak: holds many subscriptions on a running syncgraph under a steady write load, checks
// that every subscription receives every change of its channel once and in order, and
// records the server's resident memory over time. See BENCHMARKS.md for how it is run.
//
//   node soak.mjs --url http://127.0.0.1:8000 --pid <server pid> \
//     [--connections 100] [--per-connection 100] [--rate 20] [--minutes 10] [--out soak.csv]
//
// Each connection is one user with one channel; its subscriptions all follow that channel,
// so `connections x per-connection` subscriptions and every post is delivered
// `per-connection` times. Posts carry a per-channel sequence number; a subscription that
// sees a number skipped, repeated or out of order counts it. Exits 1 on any loss.
import { readFileSync, writeFileSync } from 'node:fs';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const url = (args.url ?? 'http://127.0.0.1:8000').replace(/\/$/, '');
const pid = args.pid;
const connections = Number(args.connections ?? 100);
const perConnection = Number(args['per-connection'] ?? 100);
const rate = Number(args.rate ?? 20);
const minutes = Number(args.minutes ?? 10);
const out = args.out ?? 'soak.csv';
const sampleEvery = 10_000;

function rssKib() {
  if (!pid) return null;
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(status.match(/VmRSS:\s+(\d+)/)[1]);
}

async function graphql(token, query, variables = {}) {
  const response = await fetch(`${url}/graphql`, {
    method: 'POST',
    signal: AbortSignal.timeout(30_000),
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors) throw new Error(JSON.stringify(body.errors));
  return body.data;
}

const SUBSCRIPTION = 'subscription($c: ID!) { messageEvents(channelId: $c) { message { body } } }';
const run = Date.now().toString(36);
const samples = [];
const sample = (phase, extra = {}) => {
  const row = { t: Math.round((Date.now() - started) / 1000), phase, rss_kib: rssKib(), ...extra };
  samples.push(row);
  console.log(JSON.stringify(row));
};
const started = Date.now();
sample('start');

// Users, channels, connections.
const users = [];
for (let i = 0; i < connections; i++) {
  const { signUp } = await graphql(null, 'mutation($i: SignUpInput!) { signUp(input: $i) { token } }', {
    i: { name: `soak${i}`, email: `soak-${run}-${i}@example.com`, password: 'correct horse battery' },
  });
  const { createChannel } = await graphql(signUp.token, 'mutation($n: String!) { createChannel(input: { name: $n }) { id } }', { n: `soak ${i}` });
  users.push({ token: signUp.token, channel: createChannel.id, next: 0 });
}
const clients = users.map((user) =>
  createClient({
    url: `${url.replace(/^http/, 'ws')}/graphql`,
    webSocketImpl: WebSocket,
    connectionParams: { authorization: `Bearer ${user.token}` },
    lazy: false,
    retryAttempts: 0,
    keepAlive: 10_000,
  }),
);
sample('connected');

// Subscriptions: each checks its channel's sequence.
const stats = { delivered: 0, gaps: 0, duplicates: 0, errors: 0, subscribed: 0 };
let warmed = 0;
for (const [i, client] of clients.entries()) {
  for (let s = 0; s < perConnection; s++) {
    let expected = 0;
    let live = false;
    client.subscribe(
      { query: SUBSCRIPTION, variables: { c: users[i].channel } },
      {
        next: (result) => {
          if (result.errors) {
            stats.errors += 1;
            return;
          }
          const body = result.data.messageEvents.message.body;
          if (body === 'warm-up') {
            if (!live) warmed += 1;
            live = true;
            return;
          }
          const n = Number(body);
          stats.delivered += 1;
          if (n < expected) stats.duplicates += 1;
          else if (n > expected) stats.gaps += n - expected;
          expected = Math.max(expected, n + 1);
        },
        error: () => (stats.errors += 1),
        complete: () => {},
      },
    );
    stats.subscribed += 1;
  }
}
// Subscriptions start asynchronously: post a warm-up message per channel until every
// subscription saw one, so the measured run starts with all of them live.
while (warmed < connections * perConnection) {
  await Promise.all(users.map(async (user) => {
    await graphql(user.token, 'mutation($i: PostMessageInput!) { postMessage(input: $i) { id } }', { i: { channelId: user.channel, body: 'warm-up' } });
  }));
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  if (Date.now() - started > 300_000) throw new Error(`only ${warmed} subscriptions live after 5 minutes`);
}
sample('subscribed', { subscriptions: stats.subscribed });

// Steady writes: `rate` posts per second spread over the channels, each body the channel's
// next sequence number.
let posted = 0;
let failedPosts = 0;
const end = Date.now() + minutes * 60_000;
let lastSample = Date.now();
const interval = 1000 / rate;
let tick = Date.now();
while (Date.now() < end) {
  const user = users[posted % users.length];
  const body = String(user.next);
  user.next += 1;
  graphql(user.token, 'mutation($i: PostMessageInput!) { postMessage(input: $i) { id } }', { i: { channelId: user.channel, body } })
    .catch(() => (failedPosts += 1));
  posted += 1;
  tick += interval;
  const wait = tick - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  if (Date.now() - lastSample >= sampleEvery) {
    lastSample = Date.now();
    sample('running', { posted, delivered: stats.delivered, gaps: stats.gaps, duplicates: stats.duplicates });
  }
}
// Drain: every post is delivered perConnection times.
const expectedDeliveries = (posted - failedPosts) * perConnection;
const drainUntil = Date.now() + 60_000;
while (stats.delivered < expectedDeliveries && Date.now() < drainUntil) {
  await new Promise((resolve) => setTimeout(resolve, 250));
}
sample('end', { posted, failedPosts, delivered: stats.delivered, expected: expectedDeliveries, ...stats });
await Promise.all(clients.map((client) => client.dispose()));

const header = 'elapsed_s,phase,rss_kib,posted,delivered';
writeFileSync(out, [header, ...samples.map((r) => [r.t, r.phase, r.rss_kib ?? '', r.posted ?? '', r.delivered ?? ''].join(','))].join('\n') + '\n');
const running = samples.filter((r) => r.phase === 'running' && r.rss_kib);
const summary = {
  subscriptions: stats.subscribed,
  minutes,
  rate,
  posted,
  failedPosts,
  delivered: stats.delivered,
  expected: expectedDeliveries,
  gaps: stats.gaps,
  duplicates: stats.duplicates,
  errors: stats.errors,
  rss_kib_start: samples[0].rss_kib,
  rss_kib_subscribed: samples.find((r) => r.phase === 'subscribed')?.rss_kib,
  rss_kib_first_running: running[0]?.rss_kib,
  rss_kib_last_running: running.at(-1)?.rss_kib,
  rss_kib_max_running: Math.max(...running.map((r) => r.rss_kib)),
};
console.log(`summary ${JSON.stringify(summary)}`);
const lost = stats.delivered !== expectedDeliveries || stats.gaps || stats.duplicates || stats.errors || failedPosts;
process.exit(lost ? 1 : 0);
