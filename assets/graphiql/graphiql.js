// GraphiQL wired to syncgraph: queries and mutations over HTTP, subscriptions over the
// graphql-transport-ws protocol. The headers editor's Authorization value is sent as the
// `Authorization` header on HTTP and as `{"authorization": ...}` in the WebSocket's
// connection_init payload, so a signed-in subscription works from the same headers.
import { createClient } from '/assets/vendor/graphql-ws-6.4.2/client.js';

const httpUrl = new URL('/graphql', window.location.href).href;
const wsUrl = httpUrl.replace(/^http/, 'ws');

const DEFAULT_QUERY = `# Welcome to syncgraph.
#
# 1. Sign up (or signIn) and copy the token from the result:
mutation SignUp {
  signUp(input: { name: "Ada", email: "ada@example.com", password: "correct horse" }) {
    token
    user { id name }
  }
}

# 2. Open "Headers" below and paste: { "Authorization": "Bearer <token>" }
# 3. Create a channel, then follow it live and post to it (from another tab, too):
mutation CreateChannel {
  createChannel(input: { name: "general" }) { id name }
}

subscription Follow {
  messageEvents(channelId: "1") {
    cursor
    kind
    message { id body version author { name } }
  }
}

mutation Post {
  postMessage(input: { channelId: "1", body: "hello" }) { id version }
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

/** Whether the operation GraphiQL is about to run is a subscription. */
function isSubscription(params, opts) {
  const operations = (opts?.documentAST?.definitions ?? []).filter(
    (definition) => definition.kind === 'OperationDefinition',
  );
  const selected = params.operationName
    ? operations.find((operation) => operation.name?.value === params.operationName)
    : operations[0];
  return selected?.operation === 'subscription';
}

const httpFetcher = window.GraphiQL.createFetcher({ url: httpUrl });

function fetcher(params, opts) {
  if (isSubscription(params, opts)) {
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
