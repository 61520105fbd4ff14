// A walk through the typed client against a running syncgraph (SYNCGRAPH_URL, default
// http://127.0.0.1:8000): sign up, take a snapshot and follow it live with graphql-ws and
// with Apollo Client, post, edit with CONFLICT handling, resume after a dropped
// connection without losing or repeating an event, close cleanly, follow the same feed over
// HTTP (Apollo's multipart, graphql-sse in both modes), use persisted queries, and keep a
// `@live` query's result current from its patches. Exits non-zero on
// anything unexpected, so it doubles as a check of the example (syncgraph's tests run it).
import { apolloClient, editMessage, persistedQueryClient } from './apollo.js';
import { followOverSse, multipartClient, sseClient } from './http-streams.js';
import { isDeepStrictEqual } from 'node:util';

import type { LiveInboxQuery } from './gql/graphql.js';
import { connect, followMessages, type MessageEvent } from './live.js';
import { freshResult, liveQuery } from './live-query.js';
import {
  AddChannelMember,
  ChannelSnapshot,
  CreateChannel,
  LiveInbox,
  MessageEvents,
  PostMessage,
  SignUp,
} from './operations.js';

const url = (process.env['SYNCGRAPH_URL'] ?? 'http://127.0.0.1:8000').replace(/\/$/, '');
/** Every wait has a deadline, so a missing event fails instead of hanging. */
const TIMEOUT_MS = 15_000;

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** Events as they arrive, and a way to wait (with a deadline) for the ones expected. */
class Inbox<T> {
  readonly items: T[] = [];
  private failure: unknown = null;
  private wake: (() => void) | null = null;

  push(item: T): void {
    this.items.push(item);
    this.wake?.();
  }

  fail(error: unknown): void {
    this.failure = error ?? new Error('the feed ended');
    this.wake?.();
  }

  async until(done: (items: readonly T[]) => boolean, what: string): Promise<void> {
    const deadline = Date.now() + TIMEOUT_MS;
    while (!done(this.items)) {
      if (this.failure) {
        const reason = this.failure instanceof Error ? this.failure.message : JSON.stringify(this.failure);
        throw new Error(`${what}: ${reason}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
  }
}

async function main(): Promise<void> {
  const anonymous = apolloClient(url, null);
  const signedUp = await anonymous.mutate({
    mutation: SignUp,
    variables: {
      input: { name: 'Ada', email: `ada-${Date.now()}@example.com`, password: 'correct horse battery' },
    },
  });
  check(signedUp.data, 'signUp answers');
  const { token, user } = signedUp.data.signUp;
  const apollo = apolloClient(url, token);

  const created = await apollo.mutate({ mutation: CreateChannel, variables: { name: 'typed' } });
  check(created.data, 'createChannel answers');
  const channelId = created.data.createChannel.id;
  await apollo.mutate({ mutation: PostMessage, variables: { input: { channelId, body: 'before the snapshot' } } });

  // 1. A snapshot, and the live feed from its feedCursor: nothing is missed in between.
  const snapshot = await apollo.query({
    query: ChannelSnapshot,
    variables: { id: channelId },
    fetchPolicy: 'network-only',
  });
  check(snapshot.data?.channel, 'the channel is visible to its creator');
  const shown = snapshot.data.channel.messages.edges.map(({ node }) => node.body);
  check(shown.includes('before the snapshot'), 'the snapshot holds the first message');

  const socket = connect(`${url}/graphql`, token);
  const events = new Inbox<MessageEvent>();
  let reconnects = 0;
  const feed = followMessages(socket, {
    channelId,
    after: snapshot.data.feedCursor,
    onEvent: (event) => events.push(event),
    onError: (error) => events.fail(error),
    onReconnect: () => (reconnects += 1),
  });

  // 2. Apollo Client's own subscription to the same feed.
  const apolloEvents = new Inbox<MessageEvent>();
  const apolloSubscription = apollo
    .subscribe({ query: MessageEvents, variables: { channelId, after: snapshot.data.feedCursor } })
    .subscribe({
      next: (result) => {
        if (result.data) apolloEvents.push(result.data.messageEvents);
        else apolloEvents.fail(result.error);
      },
      error: (error: unknown) => apolloEvents.fail(error),
    });

  const posted = await apollo.mutate({
    mutation: PostMessage,
    variables: { input: { channelId, body: 'hello, typed world' } },
  });
  check(posted.data, 'postMessage answers');
  const message = posted.data.postMessage;
  check(message.author.id === user.id && message.version === 1, 'a new message is ours, at version 1');
  const hasMessage = (id: string, version: number) => (items: readonly MessageEvent[]) =>
    items.some((event) => event.message.id === id && event.message.version === version);
  await events.until(hasMessage(message.id, 1), 'the new message on graphql-ws');
  await apolloEvents.until(hasMessage(message.id, 1), 'the new message on Apollo Client');

  // 3. Optimistic concurrency: an edit based on a stale version is a CONFLICT that names
  //    the version that won; retrying on top of it succeeds.
  const edited = await editMessage(apollo, message.id, 'hello, edited', message.version);
  check(edited.kind === 'saved' && edited.message.version === 2, 'the first edit saves version 2');
  const stale = await editMessage(apollo, message.id, 'a stale edit', message.version);
  check(stale.kind === 'conflict' && stale.currentVersion === 2, 'a stale edit is a CONFLICT at version 2');
  const retried = await editMessage(apollo, message.id, 'edited on top of version 2', stale.currentVersion);
  check(retried.kind === 'saved' && retried.message.version === 3, 'the retry saves version 3');
  await events.until(hasMessage(message.id, 3), 'the edits on graphql-ws');

  // 4. Drop the connection and write while it is down: the feed resumes from its last
  //    cursor, so the message arrives, once.
  socket.terminate();
  const away = await apollo.mutate({
    mutation: PostMessage,
    variables: { input: { channelId, body: 'while the socket was down' } },
  });
  check(away.data, 'postMessage answers');
  await events.until(hasMessage(away.data.postMessage.id, 1), 'the message written while disconnected');
  check(reconnects >= 1, 'the feed reconnected');

  const keys = events.items.map((event) => `${event.message.id}@v${event.message.version}`);
  check(new Set(keys).size === keys.length, `no event twice: ${keys.join(', ')}`);
  check(!events.items.some((event) => event.message.body === 'a stale edit'), 'a refused edit is never an event');

  // 5. Closing: `dispose()` closes the socket (1000). The server answers the close
  //    (RFC 6455), so it ends cleanly, not with 1006.
  const closes = new Inbox<{ code: number; wasClean: boolean }>();
  socket.on('closed', (event) => {
    const { code, wasClean } = event as { code: number; wasClean: boolean };
    closes.push({ code, wasClean });
  });
  feed.stop();
  await socket.dispose();
  await closes.until((items) => items.length > 0, 'the socket to close');
  const [closed] = closes.items;
  check(closed?.code === 1000 && closed.wasClean, `a client's close is answered: ${JSON.stringify(closed)}`);
  apolloSubscription.unsubscribe();

  // 6. The same feed over HTTP, from the same snapshot cursor: Apollo Client's HttpLink
  //    (multipart), and graphql-sse with a request per subscription and with one stream.
  const over = {
    multipart: new Inbox<MessageEvent>(),
    'graphql-sse distinct': new Inbox<MessageEvent>(),
    'graphql-sse single': new Inbox<MessageEvent>(),
  };
  const variables = { channelId, after: snapshot.data.feedCursor };
  const multipart = multipartClient(url, token);
  const multipartSubscription = multipart
    .subscribe({ query: MessageEvents, variables })
    .subscribe({
      next: (result) => {
        if (result.data) over.multipart.push(result.data.messageEvents);
        else over.multipart.fail(result.error);
      },
      error: (error: unknown) => over.multipart.fail(error),
    });
  const distinct = sseClient(url, token, false);
  const single = sseClient(url, token, true);
  const stopDistinct = followOverSse(
    distinct,
    variables,
    (event) => over['graphql-sse distinct'].push(event),
    (error) => over['graphql-sse distinct'].fail(error),
  );
  const stopSingle = followOverSse(
    single,
    variables,
    (event) => over['graphql-sse single'].push(event),
    (error) => over['graphql-sse single'].fail(error),
  );
  const overHttp = await apollo.mutate({
    mutation: PostMessage,
    variables: { input: { channelId, body: 'over HTTP' } },
  });
  check(overHttp.data, 'postMessage answers');
  const expectedOverHttp = [...keys, `${overHttp.data.postMessage.id}@v1`];
  for (const [name, inbox] of Object.entries(over)) {
    await inbox.until((items) => items.length >= expectedOverHttp.length, `the feed over ${name}`);
    const got = inbox.items.map((event) => `${event.message.id}@v${event.message.version}`);
    check(
      JSON.stringify(got) === JSON.stringify(expectedOverHttp),
      `${name} replays and follows the feed in order, once: ${got.join(', ')}`,
    );
  }
  multipartSubscription.unsubscribe();
  multipart.stop();
  stopDistinct();
  stopSingle();
  distinct.dispose();
  single.dispose();

  // 7. Persisted queries: the first time, the hash alone is refused and the link sends the
  //    text; after that the hash alone works, over GET.
  const requests: string[] = [];
  const persisted = persistedQueryClient(url, token, requests);
  for (let i = 0; i < 2; i++) {
    const result = await persisted.query({
      query: ChannelSnapshot,
      variables: { id: channelId },
      fetchPolicy: 'network-only',
    });
    check(result.data?.channel?.id === channelId, 'a persisted query answers');
  }
  const expected = ['GET hash only', 'POST with text', 'GET hash only'];
  check(
    JSON.stringify(requests) === JSON.stringify(expected),
    `persisted queries go by hash: ${requests.join(', ')}`,
  );
  persisted.stop();

  // 8. A live query: the channel list as `{data, revision: 1}` then patches, rebuilt by
  //    applyLiveQueryJSONPatch. After each write (a new channel, a new member) the rebuilt
  //    result equals a fresh execution of the same query.
  const liveClient = connect(`${url}/graphql`, token);
  const results = new Inbox<LiveInboxQuery>();
  const cursors: string[] = [];
  void (async () => {
    for await (const result of liveQuery(liveClient, LiveInbox, {})) {
      if (result.cursor) cursors.push(result.cursor);
      results.push(result.data);
    }
  })().catch((error: unknown) => results.fail(error));
  const converges = async (what: string): Promise<void> => {
    const fresh = await freshResult(url, token, LiveInbox);
    await results.until((items) => isDeepStrictEqual(items.at(-1), fresh), what);
  };
  await converges('the first live result');
  await apollo.mutate({ mutation: CreateChannel, variables: { name: 'live' } });
  await converges('a new channel in the live list');
  const bob = await anonymous.mutate({
    mutation: SignUp,
    variables: {
      input: { name: 'Bob', email: `bob-${Date.now()}@example.com`, password: 'correct horse battery' },
    },
  });
  check(bob.data, 'signUp answers');
  await apollo.mutate({
    mutation: AddChannelMember,
    variables: { input: { channelId, userId: bob.data.signUp.user.id } },
  });
  await converges('a new member in the live list');
  check(cursors.length === results.items.length, 'every live payload carries its cursor');
  await liveClient.dispose();

  apollo.stop();
  anonymous.stop();
  console.log(`ok: ${events.items.length} events over graphql-ws (${keys.join(', ')}), ` +
    `${apolloEvents.items.length} over Apollo Client, ${reconnects} resume(s), a CONFLICT handled, ` +
    `the same feed over ${Object.keys(over).join(', ')}, ` +
    `persisted queries by hash (${requests.join(', ')}), ` +
    `a live query rebuilt from ${results.items.length} payloads`);
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
