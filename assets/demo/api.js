// The demo's whole client side of the API: GraphQL over HTTP, live feeds over the
// graphql-transport-ws protocol that resume from their last cursor after any disconnect, and
// live queries (`@live`) kept current from the server's patches.
import { applyPatch } from '/assets/vendor/fast-json-patch-3.1.2/core.mjs';
import { createClient } from '/assets/vendor/graphql-ws-6.4.2/client.js';

const httpUrl = new URL('/graphql', window.location.href).href;
const wsUrl = httpUrl.replace(/^http/, 'ws');

/** A GraphQL error answer: `code` is the first error's `extensions.code`. */
export class ApiError extends Error {
  constructor(errors) {
    super(errors.map((error) => error.message).join('; '));
    this.errors = errors;
    this.extensions = errors[0]?.extensions ?? {};
    this.code = this.extensions.code;
  }
}

/** Runs a query or mutation over HTTP and returns its data, or throws an ApiError. */
export async function request(token, query, variables = {}) {
  let response;
  try {
    response = await fetch(httpUrl, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: 'application/graphql-response+json, application/json',
        ...(token ? { authorization: `Bearer ${token}` } : {}),
      },
      body: JSON.stringify({ query, variables }),
    });
  } catch {
    throw new ApiError([{ message: 'The server cannot be reached; try again in a moment.' }]);
  }
  const body = await response.json().catch(() => ({
    errors: [{ message: `The server answered ${response.status}.` }],
  }));
  if (body.errors?.length) throw new ApiError(body.errors);
  return body.data;
}

/**
 * The WebSocket client for a signed-in user. It does not retry by itself
 * (`retryAttempts: 0`): every feed reconnects in `follow`, so that it resumes from its own
 * last cursor rather than from where it first started.
 */
export function connect(token, onStatus) {
  return createClient({
    url: wsUrl,
    connectionParams: { authorization: `Bearer ${token}` },
    lazy: true,
    retryAttempts: 0,
    keepAlive: 10_000,
    // A handshake that never completes counts as a lost connection (and is retried).
    connectionAckWaitTimeout: 10_000,
    on: {
      connected: () => onStatus('live'),
      closed: () => onStatus('offline'),
    },
  });
}

/**
 * Closes that reconnecting cannot fix: the token was refused. Any other close (a restart,
 * a timeout, even a protocol error of one connection) is retried on a new connection.
 */
const FATAL_CLOSE_CODES = new Set([4401, 4403]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * What ends a feed or a live query for good, as an ApiError: GraphQL errors (FORBIDDEN,
 * CURSOR_EXPIRED, ...) and a refused connection. `null` for anything else (a lost connection),
 * which is retried.
 */
function fatalError(error) {
  if (error instanceof ApiError) return error;
  if (Array.isArray(error)) return new ApiError(error);
  if (FATAL_CLOSE_CODES.has(error?.code)) {
    return new ApiError([
      {
        message: error.reason || 'The connection was refused.',
        extensions: { code: `CLOSE_${error.code}`, closeCode: error.code },
      },
    ]);
  }
  return null;
}

/**
 * Runs one stream until stopped, starting it again after any lost connection (250 ms, then
 * twice as long each time, at most 4 s). `request()` gives each attempt's query and
 * variables; `reader()` gives each attempt a fresh function that takes its results in order
 * (and may throw to start over). GraphQL errors and refused connections end it through
 * `onError`.
 */
function resumed({ client, request, reader, onError, onRetry }) {
  let stopped = false;
  let iterator = null;
  (async () => {
    let delay = 250;
    while (!stopped) {
      try {
        const take = reader();
        iterator = client.iterate(request());
        for await (const result of iterator) {
          if (result.errors?.length) throw new ApiError(result.errors);
          take(result);
          delay = 250;
        }
      } catch (error) {
        if (stopped) return;
        if (error?.code) console.warn(`feed connection closed: ${error.code} ${error.reason ?? ''}`);
        const fatal = fatalError(error);
        if (fatal) {
          stopped = true;
          onError(fatal);
          return;
        }
      }
      if (stopped) return;
      onRetry?.(delay);
      await sleep(delay);
      delay = Math.min(delay * 2, 4000);
    }
  })();
  return {
    stop() {
      stopped = true;
      iterator?.return?.();
    },
  };
}

/**
 * Follows one subscription until stopped: `onEvent` gets each event of `field` in order,
 * exactly once. When the connection drops (a server restart, a network change) or the server ends
 * the stream as it shuts down, it subscribes again with `after` set to the last event's
 * cursor, so every change in between is replayed and none is lost. GraphQL errors
 * (FORBIDDEN, CURSOR_EXPIRED, ...) and refused connections end it through `onError`.
 */
export function follow({ client, query, variables, field, after, onEvent, onError, onRetry }) {
  let cursor = after;
  return resumed({
    client,
    request: () => ({ query, variables: { ...variables, after: cursor } }),
    reader: () => (result) => {
      const event = result.data[field];
      try {
        onEvent(event);
      } catch (error) {
        // A bug in the page, not a lost connection: report it and go on.
        console.error('applying an event failed', error);
      }
      cursor = event.cursor;
    },
    onError,
    onRetry,
  });
}

/**
 * Runs a `@live` query until stopped: `onResult` gets the whole result first and again after
 * every committed change that alters it. The server sends `{data, revision: 1}`, then
 * `{patch, revision}` (RFC 6902), applied here in order; a skipped revision cannot happen on
 * one stream, and is treated like a lost connection. After a disconnect the query simply
 * starts again (its first payload is the whole current result). GraphQL errors end it
 * through `onError`.
 */
export function live({ client, query, variables = {}, onResult, onError, onRetry }) {
  return resumed({
    client,
    request: () => ({ query, variables }),
    reader: () => {
      let data = null;
      let revision = 0;
      return (result) => {
        if (result.revision === 1) data = result.data;
        else if (result.revision === revision + 1 && data) {
          data = applyPatch(data, result.patch, true, false).newDocument;
        } else throw new Error(`live query: revision ${result.revision} after ${revision}`);
        revision = result.revision;
        try {
          onResult(data);
        } catch (error) {
          console.error('showing a live result failed', error);
        }
      };
    },
    onError,
    onRetry,
  });
}
