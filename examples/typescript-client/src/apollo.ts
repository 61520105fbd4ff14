// Apollo Client against syncgraph: queries and mutations over HTTP, subscriptions over
// graphql-ws (the graphql-transport-ws protocol), with the same token on both.
import { ApolloClient, ApolloLink, HttpLink, InMemoryCache } from '@apollo/client';
import { CombinedGraphQLErrors } from '@apollo/client/errors';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';
import { GraphQLWsLink } from '@apollo/client/link/subscriptions';
import { getMainDefinition } from '@apollo/client/utilities';
import { OperationTypeNode } from 'graphql';
import { createHash } from 'node:crypto';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

import { EditMessage } from './operations.js';
import type { MessageFieldsFragment } from './gql/graphql.js';

export function apolloClient(httpUrl: string, token: string | null): ApolloClient {
  const headers: Record<string, string> = token ? { authorization: `Bearer ${token}` } : {};
  const http = new HttpLink({ uri: `${httpUrl}/graphql`, headers });
  const ws = new GraphQLWsLink(
    createClient({
      url: `${httpUrl.replace(/^http/, 'ws')}/graphql`,
      webSocketImpl: WebSocket, // leave out in a browser
      connectionParams: headers,
      lazy: true,
    }),
  );
  const link = ApolloLink.split(
    ({ query }) => {
      const definition = getMainDefinition(query);
      return (
        definition.kind === 'OperationDefinition' &&
        definition.operation === OperationTypeNode.SUBSCRIPTION
      );
    },
    ws,
    http,
  );
  return new ApolloClient({ link, cache: new InMemoryCache() });
}

/**
 * Apollo Client with automatic persisted queries: a query goes as its SHA-256 alone (over
 * GET, so responses can be cached), and with its text only when the server does not know
 * the hash yet (it answers PERSISTED_QUERY_NOT_FOUND, and the link retries). `requests`
 * records each HTTP request this client makes: its method, and whether it carried the text.
 */
export function persistedQueryClient(
  httpUrl: string,
  token: string,
  requests: string[],
): ApolloClient {
  const recordingFetch: typeof fetch = async (input, init) => {
    const method = init?.method ?? 'GET';
    const withText =
      method === 'GET'
        ? new URL(String(input)).searchParams.has('query')
        : /"query"\s*:/.test(String(init?.body ?? ''));
    requests.push(`${method} ${withText ? 'with text' : 'hash only'}`);
    return fetch(input, init);
  };
  const persisted = new PersistedQueryLink({
    // In a browser, hash with `crypto.subtle.digest('SHA-256', ...)` instead.
    sha256: (text: string) => createHash('sha256').update(text).digest('hex'),
    useGETForHashedQueries: true,
  });
  const http = new HttpLink({
    uri: `${httpUrl}/graphql`,
    headers: { authorization: `Bearer ${token}` },
    fetch: recordingFetch,
  });
  return new ApolloClient({ link: persisted.concat(http), cache: new InMemoryCache() });
}

/** The error code of a GraphQL error answer (`extensions.code`), if that is what `error` is. */
export function errorCode(error: unknown): string | undefined {
  if (!CombinedGraphQLErrors.is(error)) return undefined;
  const code = error.errors[0]?.extensions?.['code'];
  return typeof code === 'string' ? code : undefined;
}

export type EditOutcome =
  | { kind: 'saved'; message: MessageFieldsFragment }
  | { kind: 'conflict'; currentVersion: number };

/**
 * Edits a message if it is still at `expectedVersion`. A CONFLICT is an outcome, not an
 * exception: someone changed it first, and `currentVersion` says which version won, so the
 * caller can show both texts or retry on top of it.
 */
export async function editMessage(
  client: ApolloClient,
  id: string,
  body: string,
  expectedVersion: number,
): Promise<EditOutcome> {
  try {
    const { data } = await client.mutate({
      mutation: EditMessage,
      variables: { input: { id, body, expectedVersion } },
    });
    if (!data) throw new Error('editMessage returned no data');
    return { kind: 'saved', message: data.editMessage };
  } catch (error) {
    if (errorCode(error) === 'CONFLICT' && CombinedGraphQLErrors.is(error)) {
      const current = error.errors[0]?.extensions?.['currentVersion'];
      if (typeof current === 'number') return { kind: 'conflict', currentVersion: current };
    }
    throw error;
  }
}
