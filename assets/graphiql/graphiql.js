// GraphiQL wired to syncgraph: queries and mutations over HTTP, subscriptions over the
// graphql-transport-ws protocol. The headers editor's Authorization value is sent as the
// `Authorization` header on HTTP and as `{"authorization": ...}` in the WebSocket's
// connection_init payload, so a signed-in subscription works from the same headers.
import { createClient } from '/assets/vendor/graphql-ws-6.4.2/client.js';

const httpUrl = new URL('/graphql', window.location.href).href;
const wsUrl = httpUrl.replace(/^http/, 'ws');

const DEFAULT_QUERY = `# Welcome to syncgraph.
#
# 1. Sign up (or signIn) and copy the token
#    from the result:
mutation SignUp {
  signUp(input: {
    name: "Grace"
    email: "grace@example.com"
    password: "correct horse"
  }) {
    token
    user { id name }
  }
}

# 2. Open "Headers" below and paste:
#    { "Authorization": "Bearer <token>" }
# 3. Create a channel, then follow it live and
#    post to it (from another tab, too). Use the
#    id CreateChannel returns where "1" stands.
mutation CreateChannel {
  createChannel(input: { name: "general" }) {
    id
    name
  }
}

subscription Follow {
  messageEvents(channelId: "1") {
    cursor
    kind
    message { id body version author { name } }
  }
}

mutation Post {
  postMessage(input: {
    channelId: "1"
    body: "hello"
  }) {
    id
    version
  }
}
`;

/** The Authorization value of the headers editor (the key in any letter case). */
function authorizationOf(headers) {
  for (const [key, value] of Object.entries(headers ?? {})) {
    if (key.toLowerCase() === 'authorization' && typeof value === 'string') return value;
  }
  return undefined;
}

/** One WebSocket client per Authorization value: a new token opens a new connection. */
let socket = null;
function wsClient(authorization) {
  if (socket && socket.authorization === authorization) return socket.client;
  socket?.client.dispose();
  const client = createClient({
    url: wsUrl,
    connectionParams: authorization ? { authorization } : {},
    lazy: true,
    retryAttempts: 3,
  });
  socket = { authorization, client };
  return client;
}

/**
 * The kind of the operation GraphiQL is about to run: `query`, `mutation` or `subscription`.
 * Read from the text rather than from GraphiQL's parsed document, which lags behind the
 * editor by a debounce. Comments and strings are blanked, then the top level is walked:
 * each definition is `{ ... }` (an anonymous query) or `keyword Name? ... { ... }`.
 */
function operationKind(query, operationName) {
  const source = query.replace(/"""[\s\S]*?"""|"(?:[^"\\\n]|\\.)*"|#.*$/gm, '""');
  const definitions = [];
  let depth = 0;
  let head = null;
  // A keyword, not a `$variable` or part of a longer name.
  const tokens = /([{}])|(?<![$\w])(query|mutation|subscription|fragment)\b(?:\s+([_A-Za-z]\w*))?/g;
  for (const [, brace, keyword, name] of source.matchAll(tokens)) {
    if (brace === '{') {
      if (depth === 0) definitions.push(head ?? { kind: 'query' });
      head = null;
      depth += 1;
    } else if (brace === '}') {
      depth = Math.max(0, depth - 1);
    } else if (depth === 0) {
      head = { kind: keyword, name };
    }
  }
  const operations = definitions.filter((definition) => definition.kind !== 'fragment');
  const selected = operationName
    ? operations.find((operation) => operation.name === operationName)
    : operations[0];
  return selected?.kind ?? 'query';
}

const httpFetcher = window.GraphiQL.createFetcher({ url: httpUrl });

function fetcher(params, opts) {
  if (operationKind(params.query, params.operationName) === 'subscription') {
    return wsClient(authorizationOf(opts?.headers)).iterate(params);
  }
  return httpFetcher(params, opts);
}

const root = window.ReactDOM.createRoot(document.getElementById('graphiql'));
root.render(
  window.React.createElement(window.GraphiQL, {
    fetcher,
    defaultQuery: DEFAULT_QUERY,
    defaultEditorToolsVisibility: 'headers',
  }),
);
