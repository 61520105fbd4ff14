// A live feed over graphql-ws that never loses an event: after any disconnect it subscribes
// again with `after` set to the last cursor it saw, and the server replays what it missed.
import { createClient, type Client } from 'graphql-ws';
import { print } from 'graphql';
import WebSocket from 'ws';

import type {
  MessageEventsSubscription,
  MessageEventsSubscriptionVariables,
} from './gql/graphql.js';
import { MessageEvents } from './operations.js';

export type MessageEvent = MessageEventsSubscription['messageEvents'];

/**
 * A WebSocket client for one user. It does not retry by itself (`retryAttempts: 0`):
 * `followMessages` reconnects, so that it resumes from its own last cursor instead of
 * re-sending the variables it first started with.
 */
export function connect(httpUrl: string, token: string): Client {
  return createClient({
    url: httpUrl.replace(/^http/, 'ws'),
    // In a browser leave this out: the global WebSocket is used. Node 20 has none.
    webSocketImpl: WebSocket,
    connectionParams: { authorization: `Bearer ${token}` },
    lazy: true,
    retryAttempts: 0,
  });
}

export interface Feed {
  /** The cursor of the last event delivered (where a resume starts). */
  readonly cursor: string | null;
  stop(): void;
}

export interface FollowOptions {
  channelId: string;
  /** Start after this cursor: a snapshot's `feedCursor`, or the last one seen before. */
  after: string | null;
  onEvent(event: MessageEvent): void;
  /** A GraphQL error (FORBIDDEN, CURSOR_EXPIRED, ...) or a refused connection: the end. */
  onError(error: unknown): void;
  /** Called before each reconnect attempt, with the delay before it. */
  onReconnect?(delayMs: number): void;
}

/** Closes that reconnecting cannot fix: the token was refused (sign in again). */
const FATAL_CLOSE_CODES = new Set([4401, 4403]);

/** Follows a channel's messageEvents until stopped, resuming after every disconnect. */
export function followMessages(client: Client, options: FollowOptions): Feed {
  let cursor = options.after;
  let stopped = false;
  let current: AsyncIterableIterator<unknown> | null = null;
  const query = print(MessageEvents);

  void (async () => {
    let delay = 250;
    while (!stopped) {
      try {
        // `satisfies` checks the variables against the operation's generated type, which
        // graphql-ws (typed by result only) would not.
        const variables = {
          channelId: options.channelId,
          after: cursor,
        } satisfies MessageEventsSubscriptionVariables;
        const results = client.iterate<MessageEventsSubscription>({ query, variables });
        current = results;
        for await (const result of results) {
          if (result.errors?.length || !result.data) {
            stopped = true;
            options.onError(result.errors);
            return;
          }
          delay = 250;
          try {
            options.onEvent(result.data.messageEvents);
          } catch (error) {
            // A bug in the handler, not a lost connection: report it and go on.
            console.error('onEvent failed', error);
          }
          cursor = result.data.messageEvents.cursor;
        }
        // The stream completed: the server is shutting down. Resume below.
      } catch (error) {
        if (stopped) return;
        const code = (error as { code?: unknown } | null)?.code;
        if (Array.isArray(error) || (typeof code === 'number' && FATAL_CLOSE_CODES.has(code))) {
          stopped = true;
          options.onError(error);
          return;
        }
        // Anything else is a lost connection: resume below.
      }
      if (stopped) return;
      options.onReconnect?.(delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 4000);
    }
  })();

  return {
    get cursor() {
      return cursor;
    },
    stop() {
      stopped = true;
      void current?.return?.();
    },
  };
}
