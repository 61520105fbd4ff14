// Subscriptions without a WebSocket, for networks that do not pass one:
// - Apollo Client's plain HttpLink, which runs subscriptions over multipart HTTP on
//   `/graphql` with no option at all (Apollo Kotlin and iOS do the same);
// - the `graphql-sse` client on `/graphql/stream`, in its distinct connections mode (a
//   request per subscription) and its single connection mode (one stream for all).
// Both resume from a cursor with `after`, as graphql-ws does (the graphql-sse client's own
// retries re-send the original request; a browser's EventSource resumes by Last-Event-ID).
import { ApolloClient, HttpLink, InMemoryCache } from '@apollo/client';
import { print } from 'graphql';
import { createClient, type Client } from 'graphql-sse';

import type { MessageEventsSubscription, MessageEventsSubscriptionVariables } from './gql/graphql.js';
import { MessageEvents } from './operations.js';
import type { MessageEvent } from './live.js';

/** Apollo Client over HTTP only: subscriptions arrive as multipart parts. */
export function multipartClient(httpUrl: string, token: string): ApolloClient {
  return new ApolloClient({
    link: new HttpLink({ uri: `${httpUrl}/graphql`, headers: { authorization: `Bearer ${token}` } }),
    cache: new InMemoryCache(),
  });
}

/** A graphql-sse client; `singleConnection` shares one event stream among subscriptions. */
export function sseClient(httpUrl: string, token: string, singleConnection: boolean): Client {
  return createClient({
    url: `${httpUrl}/graphql/stream`,
    headers: { authorization: `Bearer ${token}` },
    singleConnection,
  });
}

/** Follows a channel's message events over graphql-sse; returns the function that stops. */
export function followOverSse(
  client: Client,
  variables: MessageEventsSubscriptionVariables,
  onEvent: (event: MessageEvent) => void,
  onError: (error: unknown) => void,
): () => void {
  return client.subscribe<MessageEventsSubscription>(
    { query: print(MessageEvents), variables },
    {
      next: (result) => {
        if (result.data) onEvent(result.data.messageEvents);
        else onError(result.errors);
      },
      error: onError,
      complete: () => onError(new Error('the feed completed')),
    },
  );
}
