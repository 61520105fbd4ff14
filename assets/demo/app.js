// The demo: sign in, pick a channel, chat live, and edit a shared document with
// optimistic concurrency. The channel list, a channel's members and its documents are live
// queries (`@live`): they change on screen when anyone's change alters them. Everything shown comes from one snapshot query plus the live feed
// that starts at that snapshot's `feedCursor`, so nothing committed after the snapshot is
// missed; events are applied by `version`, so one seen twice changes nothing.
import { ApiError, connect, follow, live, request } from '/assets/demo/api.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'syncgraph.demo.token';
const MESSAGE = 'id body version createdAt author { id name }';
const DOCUMENT = 'id title body version updatedAt';

const state = {
  token: null,
  user: null,
  client: null,
  channelId: null,
  channelFeed: null,
  /** The live channel list, and the open channel's live members and documents. */
  channelList: null,
  channelParts: null,
  /** id -> message, and the li showing it. */
  messages: new Map(),
  items: new Map(),
  /** Ids of deleted messages: a late replay of an older version must not bring one back. */
  removed: new Set(),
  documents: new Map(),
  documentId: null,
  documentFeed: null,
  /** The document version the editor's text is based on, and whether it was changed. */
  base: null,
  dirty: false,
  /** The version that beat our save, while the conflict box is open. */
  conflictVersion: null,
  /** Counts channel and document openings: a reply to an older one is dropped. */
  openings: 0,
  /** Whether the snapshot holds the channel's oldest message (else older ones are not shown). */
  complete: true,
  oldestShown: null,
};

// ---- status and errors ----------------------------------------------------------------

/**
 * Shows the feeds' state. Signed in, the live channel list keeps the WebSocket open; the
 * client is lazy, so before that starts a closed socket is not "offline": the page is
 * "ready".
 */
function setStatus(status) {
  const idle =
    status === 'offline' && state.token && !state.channelList && !state.channelFeed && !state.documentFeed;
  const shown = idle ? 'ready' : status;
  const labels = { live: 'live', ready: 'ready', offline: 'offline', reconnecting: 'reconnecting…' };
  $('status').textContent = labels[shown] ?? shown;
  $('status').className = `status ${shown}`;
}

function describe(error) {
  if (!(error instanceof ApiError)) return String(error?.message ?? error);
  switch (error.code) {
    case 'UNAUTHENTICATED':
      return state.token ? 'Your session has ended; sign in again.' : 'Wrong email or password.';
    case 'FORBIDDEN':
      return 'You are not a member of this channel (any more).';
    default:
      return error.message;
  }
}

function showError(id, error) {
  $(id).textContent = error ? describe(error) : '';
}

// ---- session ----------------------------------------------------------------------------

async function authenticate(event) {
  event.preventDefault();
  const form = new FormData($('auth'));
  const action = event.submitter?.value === 'signUp' ? 'signUp' : 'signIn';
  const input = { email: form.get('email'), password: form.get('password') };
  if (action === 'signUp') input.name = form.get('name') || String(input.email).split('@')[0];
  const type = action === 'signUp' ? 'SignUpInput' : 'SignInInput';
  showError('auth-error', null);
  try {
    const data = await request(
      null,
      `mutation Auth($input: ${type}!) { ${action}(input: $input) { token user { id name } } }`,
      { input },
    );
    const { token, user } = data[action];
    sessionStorage.setItem(TOKEN_KEY, token);
    startSession(token, user);
  } catch (error) {
    showError('auth-error', error);
  }
}

function startSession(token, user) {
  state.token = token;
  state.user = user;
  state.client = connect(token, setStatus);
  setStatus('offline');
  $('whoami').textContent = `${user.name} · your user id: ${user.id}`;
  $('whoami').hidden = false;
  $('sign-out').hidden = false;
  $('signed-out').hidden = true;
  $('signed-in').hidden = false;
  loadChannels().then(() => {
    const wanted = new URLSearchParams(window.location.hash.slice(1)).get('channel');
    if (wanted) openChannel(wanted);
  });
}

function signOut(message) {
  closeChannel();
  state.channelList?.stop();
  state.channelList = null;
  state.client?.dispose();
  Object.assign(state, { token: null, user: null, client: null });
  sessionStorage.removeItem(TOKEN_KEY);
  $('whoami').hidden = true;
  $('sign-out').hidden = true;
  $('signed-in').hidden = true;
  $('signed-out').hidden = false;
  $('auth-error').textContent = message ?? '';
  setStatus('offline');
}

async function resumeSession() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return;
  try {
    const { me } = await request(token, '{ me { id name } }');
    if (me) startSession(token, me);
    else signOut('Your session has ended; sign in again.');
  } catch (error) {
    showError('auth-error', error);
  }
}

// ---- channels ---------------------------------------------------------------------------

/** Shows the viewer's channels, kept current by a live query (a channel the viewer is
 *  added to appears, one they leave goes). Resolves once the list is first shown. */
function loadChannels() {
  state.channelList?.stop();
  return new Promise((resolve) => {
    state.channelList = live({
      client: state.client,
      query: 'query Channels @live { channels(first: 100) { edges { node { id name } } } }',
      onResult: (data) => {
        showChannels(data.channels.edges.map(({ node }) => node));
        resolve();
      },
      onError: (error) => {
        showError('channel-error', error);
        resolve();
      },
      onRetry: () => setStatus('reconnecting'),
    });
  });
}

function showChannels(channels) {
  $('channels').replaceChildren(
    ...channels.map((node) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = `# ${node.name}`;
      button.dataset.channel = node.id;
      button.className = node.id === state.channelId ? 'selected' : '';
      button.addEventListener('click', () => openChannel(node.id));
      const item = document.createElement('li');
      item.append(button);
      return item;
    }),
  );
}

function closeChannel() {
  state.openings += 1; // a reply to an opening still in flight is dropped
  state.channelFeed?.stop();
  state.channelParts?.stop();
  state.documentFeed?.stop();
  Object.assign(state, {
    channelId: null,
    channelFeed: null,
    channelParts: null,
    documentFeed: null,
    documentId: null,
  });
  state.messages.clear();
  state.items.clear();
  state.removed.clear();
  $('messages').replaceChildren();
  $('channel').hidden = true;
  $('docs').hidden = true;
  $('welcome').hidden = false;
}

async function openChannel(id) {
  closeChannel();
  const opening = ++state.openings;
  state.channelId = id;
  window.location.hash = `channel=${id}`;
  for (const button of $('channels').querySelectorAll('button')) {
    button.className = button.dataset.channel === id ? 'selected' : '';
  }
  showError('channel-error', null);
  let data;
  try {
    data = await request(
      state.token,
      `query Open($id: ID!) {
        feedCursor
        channel(id: $id) {
          id name
          members { id name }
          messages(last: 50) { pageInfo { hasPreviousPage } edges { node { ${MESSAGE} } } }
          documents { ${DOCUMENT} }
        }
      }`,
      { id },
    );
  } catch (error) {
    showError('channel-error', error);
    return;
  }
  if (opening !== state.openings) return; // another channel (or this one again) opened since
  if (!data.channel) {
    showError('channel-error', new ApiError([{ message: 'No such channel, or you are not a member.' }]));
    return;
  }
  $('welcome').hidden = true;
  $('channel').hidden = false;
  $('docs').hidden = false;
  $('channel-name').textContent = `# ${data.channel.name}`;
  showMembers(data.channel.members);
  const { edges, pageInfo } = data.channel.messages;
  state.complete = !pageInfo.hasPreviousPage;
  state.oldestShown = edges.length ? Number(edges[0].node.id) : null;
  for (const { node } of edges) applyMessage(node);
  scrollToEnd();
  state.documents = new Map(data.channel.documents.map((d) => [d.id, d]));
  showDocumentList();
  if (data.channel.documents.length) openDocument(data.channel.documents[0].id);
  else $('document').hidden = true;

  state.channelFeed?.stop();
  state.channelFeed = follow({
    client: state.client,
    query: `subscription Messages($channelId: ID!, $after: String) {
      messageEvents(channelId: $channelId, after: $after) { cursor kind message { ${MESSAGE} } }
    }`,
    variables: { channelId: id },
    field: 'messageEvents',
    after: data.feedCursor,
    onEvent: ({ kind, message }) => {
      const atEnd = nearEnd();
      if (kind === 'DELETED') removeMessage(message.id);
      else applyMessage(message);
      if (atEnd) scrollToEnd();
    },
    onError: feedError,
    onRetry: () => setStatus('reconnecting'),
  });
  // Members and documents, live: someone added, a document created by another member.
  state.channelParts = live({
    client: state.client,
    query: 'query Parts($id: ID!) @live { channel(id: $id) { members { id name } documents { id title } } }',
    variables: { id },
    onResult: (parts) => {
      if (state.channelId !== id) return; // another channel opened since
      if (!parts.channel) return; // no longer a member: the message feed says FORBIDDEN
      showMembers(parts.channel.members);
      const documents = new Map(
        parts.channel.documents.map((d) => [d.id, { ...state.documents.get(d.id), ...d }]),
      );
      state.documents = documents;
      showDocumentList();
    },
    onError: feedError,
    onRetry: () => setStatus('reconnecting'),
  });
}

function feedError(error) {
  const closeCode = error.extensions?.closeCode;
  if (error.code === 'CURSOR_EXPIRED' && state.channelId) {
    openChannel(state.channelId); // too far behind to replay: start from a new snapshot
  } else if (closeCode === 4401 || closeCode === 4403) {
    signOut('Your session has ended; sign in again.');
  } else {
    showError('channel-error', error);
  }
}

function showMembers(members) {
  $('members').textContent = members.map((m) => `${m.name} (${m.id})`).join(', ');
}

async function createChannel(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const data = await request(
      state.token,
      'mutation Create($input: CreateChannelInput!) { createChannel(input: $input) { id } }',
      { input: { name: form.elements.name.value } },
    );
    form.reset();
    // The live channel list shows it as soon as its membership is committed.
    openChannel(data.createChannel.id);
  } catch (error) {
    showError('channel-error', error);
  }
}

async function addMember(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const data = await request(
      state.token,
      'mutation Add($input: AddChannelMemberInput!) { addChannelMember(input: $input) { members { id name } } }',
      { input: { channelId: state.channelId, userId: form.elements.userId.value.trim() } },
    );
    form.reset();
    showMembers(data.addChannelMember.members);
    showError('channel-error', null);
  } catch (error) {
    showError('channel-error', error);
  }
}

// ---- messages ---------------------------------------------------------------------------

function applyMessage(message) {
  const known = state.messages.get(message.id);
  if (state.removed.has(message.id) || (known && known.version >= message.version)) return;
  // An edit of a message older than the snapshot's first one: it is not on screen.
  if (!known && !state.complete && state.oldestShown !== null && Number(message.id) < state.oldestShown) return;
  state.messages.set(message.id, message);
  let item = state.items.get(message.id);
  if (!item) {
    item = document.createElement('li');
    item.dataset.id = message.id;
    state.items.set(message.id, item);
    const after = [...$('messages').children].find((li) => Number(li.dataset.id) > Number(message.id));
    $('messages').insertBefore(item, after ?? null);
  }
  item.dataset.version = message.version;
  // An open editor keeps its draft; its save names the version it started from.
  if (!item.classList.contains('editing')) renderMessage(item, message);
}

function removeMessage(id) {
  state.removed.add(id);
  state.messages.delete(id);
  state.items.get(id)?.remove();
  state.items.delete(id);
}

function renderMessage(item, message) {
  const author = document.createElement('strong');
  author.textContent = message.author.name;
  const body = document.createElement('span');
  body.className = 'body';
  body.textContent = message.body;
  const parts = [author, body];
  if (message.version > 1) {
    const edited = document.createElement('small');
    edited.textContent = 'edited';
    parts.push(edited);
  }
  if (message.author.id === state.user.id) {
    const edit = document.createElement('button');
    edit.type = 'button';
    edit.className = 'link';
    edit.textContent = 'edit';
    edit.addEventListener('click', () => editMessage(item, message));
    parts.push(edit);
  }
  item.replaceChildren(...parts);
}

function editMessage(item, message) {
  item.classList.add('editing');
  const form = document.createElement('form');
  form.className = 'row';
  const input = document.createElement('input');
  input.value = message.body;
  input.required = true;
  input.maxLength = 4000;
  input.setAttribute('aria-label', 'Edit message');
  const save = document.createElement('button');
  save.textContent = 'Save';
  const cancel = document.createElement('button');
  cancel.type = 'button';
  cancel.className = 'secondary';
  cancel.textContent = 'Cancel';
  const close = () => {
    item.classList.remove('editing');
    const latest = state.messages.get(message.id);
    if (latest) renderMessage(item, latest);
  };
  cancel.addEventListener('click', close);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const data = await request(
        state.token,
        `mutation Edit($input: EditMessageInput!) { editMessage(input: $input) { ${MESSAGE} } }`,
        { input: { id: message.id, body: input.value, expectedVersion: message.version } },
      );
      close();
      applyMessage(data.editMessage);
      showError('channel-error', null);
    } catch (error) {
      if (error.code === 'CONFLICT') {
        // Keep the draft: saving again applies it on top of the version that won.
        message = { ...message, version: error.extensions.currentVersion ?? message.version };
        showError('channel-error', new ApiError([{ message: 'That message changed while you were editing it; save again to replace it with your text.' }]));
      } else {
        close();
        showError('channel-error', error);
      }
    }
  });
  form.append(input, save, cancel);
  item.replaceChildren(form);
  input.focus();
}

async function postMessage(event) {
  event.preventDefault();
  const form = event.target;
  const body = form.elements.body.value;
  try {
    const data = await request(
      state.token,
      `mutation Post($input: PostMessageInput!) { postMessage(input: $input) { ${MESSAGE} } }`,
      { input: { channelId: state.channelId, body } },
    );
    form.reset();
    applyMessage(data.postMessage);
    scrollToEnd();
    showError('channel-error', null);
  } catch (error) {
    showError('channel-error', error);
  }
}

function nearEnd() {
  const list = $('messages');
  return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
}

function scrollToEnd() {
  $('messages').scrollTop = $('messages').scrollHeight;
}

// ---- shared documents -------------------------------------------------------------------

function showDocumentList() {
  const select = $('document-list');
  const options = [...state.documents.values()].map((d) => {
    const option = document.createElement('option');
    option.value = d.id;
    option.textContent = d.title;
    return option;
  });
  select.replaceChildren(...options);
  select.hidden = options.length === 0;
  if (state.documentId) select.value = state.documentId;
}

async function openDocument(id) {
  state.documentFeed?.stop();
  state.documentFeed = null;
  const opening = ++state.openings;
  state.documentId = id;
  $('document-list').value = id;
  let data;
  try {
    data = await request(
      state.token,
      `query Doc($id: ID!) { feedCursor document(id: $id) { ${DOCUMENT} } }`,
      { id },
    );
  } catch (error) {
    showError('channel-error', error);
    return;
  }
  if (opening !== state.openings || !data.document) return;
  setEditor(data.document, 'Up to date');
  $('document').hidden = false;
  state.documentFeed?.stop();
  state.documentFeed = follow({
    client: state.client,
    query: `subscription Doc($documentId: ID!, $after: String) {
      documentEvents(documentId: $documentId, after: $after) { cursor kind document { ${DOCUMENT} } }
    }`,
    variables: { documentId: id },
    field: 'documentEvents',
    after: data.feedCursor,
    onEvent: ({ kind, document: latest }) => {
      if (kind === 'DELETED') {
        // The server ends the stream after a deletion: stop here rather than resubscribe.
        state.documentFeed?.stop();
        state.documentFeed = null;
        state.documents.delete(latest.id);
        state.documentId = null;
        showDocumentList();
        $('document').hidden = true;
        showError('channel-error', new ApiError([{ message: `“${latest.title}” was deleted.` }]));
        return;
      }
      state.documents.set(latest.id, latest);
      showDocumentList();
      if (latest.version <= state.base.version) return;
      if (state.dirty) {
        $('document-state').textContent = `Someone saved version ${latest.version}; your unsaved text is kept.`;
      } else {
        setEditor(latest, `Updated live to version ${latest.version}`);
      }
    },
    onError: feedError,
    onRetry: () => setStatus('reconnecting'),
  });
}

function setEditor(doc, note) {
  const form = $('document');
  form.elements.title.value = doc.title;
  form.elements.body.value = doc.body;
  state.base = doc;
  state.dirty = false;
  $('conflict').hidden = true;
  $('document-state').textContent = `${note} · version ${doc.version}`;
}

async function saveDocument(expectedVersion) {
  const form = $('document');
  try {
    const data = await request(
      state.token,
      `mutation Save($input: UpdateDocumentInput!) { updateDocument(input: $input) { ${DOCUMENT} } }`,
      {
        input: {
          id: state.documentId,
          title: form.elements.title.value,
          body: form.elements.body.value,
          expectedVersion,
        },
      },
    );
    state.documents.set(data.updateDocument.id, data.updateDocument);
    showDocumentList();
    setEditor(data.updateDocument, 'Saved');
  } catch (error) {
    if (error.code === 'CONFLICT') {
      state.conflictVersion = error.extensions.currentVersion;
      $('conflict-message').textContent =
        `Conflict: someone else saved version ${state.conflictVersion} before you. ` +
        'Your text is still here and was not saved.';
      $('conflict').hidden = false;
    } else {
      $('document-state').textContent = describe(error);
    }
  }
}

async function loadTheirs() {
  try {
    const { document: latest } = await request(
      state.token,
      `query Doc($id: ID!) { document(id: $id) { ${DOCUMENT} } }`,
      { id: state.documentId },
    );
    if (latest) setEditor(latest, 'Loaded their version');
  } catch (error) {
    $('document-state').textContent = describe(error);
  }
}

async function createDocument(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const data = await request(
      state.token,
      `mutation NewDoc($input: CreateDocumentInput!) { createDocument(input: $input) { ${DOCUMENT} } }`,
      { input: { channelId: state.channelId, title: form.elements.title.value, body: '' } },
    );
    form.reset();
    state.documents.set(data.createDocument.id, data.createDocument);
    state.documentId = data.createDocument.id;
    showDocumentList();
    openDocument(data.createDocument.id);
  } catch (error) {
    showError('channel-error', error);
  }
}

// ---- wiring -----------------------------------------------------------------------------

$('auth').addEventListener('submit', authenticate);
$('sign-out').addEventListener('click', () => signOut());
$('new-channel').addEventListener('submit', createChannel);
$('add-member').addEventListener('submit', addMember);
$('post').addEventListener('submit', postMessage);
$('new-document').addEventListener('submit', createDocument);
$('document-list').addEventListener('change', (event) => openDocument(event.target.value));
$('document').addEventListener('input', () => {
  state.dirty = true;
  $('document-state').textContent = `Unsaved changes · based on version ${state.base.version}`;
});
$('document').addEventListener('submit', (event) => {
  event.preventDefault();
  saveDocument(state.base.version);
});
$('load-theirs').addEventListener('click', loadTheirs);
$('overwrite').addEventListener('click', () => saveDocument(state.conflictVersion));
resumeSession();
