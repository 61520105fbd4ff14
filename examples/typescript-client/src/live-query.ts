// A live query over graphql-ws: a `@live` query streams `{data, revision: 1}`, then a
// `{patch, revision}` (RFC 6902) per committed change that alters the result. The unmodified
// `applyLiveQueryJSONPatch` (@n1ru4l/graphql-live-query-patch-json-patch) turns the stream
// back into whole results, checking that no revision is skipped.
import { applyLiveQueryJSONPatch } from '@n1ru4l/graphql-live-query-patch-json-patch';
import type { TypedDocumentNode } from '@graphql-typed-document-node/core';
import { print } from 'graphql';
import type { Client } from 'graphql-ws';

export interface LiveResult<T> {
  data: T;
  /** The feed cursor the result reflects (usable as `after` of an event subscription). */
  cursor: string | undefined;
}

/** The live query's results, each a whole result rebuilt from the patches. */
export async function* liveQuery<T, V extends Record<string, unknown>>(
  client: Client,
  document: TypedDocumentNode<T, V>,
  variables: V,
): AsyncGenerator<LiveResult<T>> {
  const source = client.iterate<T>({ query: print(document), variables });
  for await (const result of applyLiveQueryJSONPatch(source)) {
    if (result.errors?.length) throw new Error(`live query: ${JSON.stringify(result.errors)}`);
    const extensions = result.extensions as Record<string, unknown> | undefined;
    const cursor = extensions?.['cursor'];
    yield { data: result.data as T, cursor: typeof cursor === 'string' ? cursor : undefined };
  }
}

/** The same query run once over plain HTTP (without `@live`): what the result must equal. */
export async function freshResult<T>(
  url: string,
  token: string,
  document: TypedDocumentNode<T, Record<string, never>>,
): Promise<T> {
  const response = await fetch(`${url}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ query: print(document).replace(' @live', '') }),
  });
  const body = (await response.json()) as { data?: T; errors?: unknown };
  if (!body.data || body.errors) throw new Error(`fresh query: ${JSON.stringify(body)}`);
  return body.data;
}
