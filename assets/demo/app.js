// The demo: sign in, pick a channel, chat live, and edit a shared document together: its
// text is a Yjs document that everyone types into at once (over /yjs), its title is saved
// with optimistic concurrency. The channel list, a channel's members and its documents are
// live queries (`@live`): they change on screen when anyone's change alters them. Everything
// else shown comes from one snapshot query plus the live feed that starts at that snapshot's
// `feedCursor`, so nothing committed after the snapshot is missed; events are applied by
// `version`, so one seen twice changes nothing.
import { ApiError, connect, follow, live, request } from '/assets/demo/api.js';
import {
  EditorState,
  EditorView,
  WebsocketProvider,
  Y,
  defaultKeymap,
  drawSelection,
  highlightSpecialChars,
  keymap,
  placeholder,
  yCollab,
  yUndoManagerKeymap,
} from '/assets/vendor/yjs-editor-13.6.33-2b2ebeef/yjs-editor.mjs';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'syncgraph.demo.token';
const MESSAGE = 'id body version createdAt author { id name }';
// No body: the text comes from the document's Yjs state, and the feed sends an event for
// every keystroke of anyone, which need not carry the whole text each time.
const DOCUMENT = 'id title version updatedAt';
/** y-websocket's server URL; it appends `/{documentId}`. */
const YJS_URL = new URL('/yjs', window.location.href).href.replace(/^http/, 'ws');

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
  /** The open document's co-editor: its Y.Doc, WebsocketProvider and CodeMirror view. */
  editor: null,
  /** The document (id, title, version) the title field is based on, and whether it was changed. */
  base: null,
  dirty: false,
  /** The latest version seen, and what the page last said about the title. */
  version: null,
  titleNote: '',
  /** The document that beat our title's save, while the conflict box is open. */
  conflict: null,
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
  closeDocument();
  Object.assign(state, {
    channelId: null,
    channelFeed: null,
    channelParts: null,
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
  closeDocument();
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
  setTitle(data.document, '');
  $('document').hidden = false;
  openEditor(id);
  // The feed brings the title and version of every change, and the deletion. The text's
  // changes come through Yjs instead.
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
        state.documents.delete(latest.id);
        documentGone(`“${latest.title}” was deleted.`);
        return;
      }
      const known = state.documents.get(latest.id);
      state.documents.set(latest.id, { ...known, ...latest });
      // Most events are someone's keystroke; only a new title changes the list.
      if (known?.title !== latest.title) showDocumentList();
      documentChanged(latest);
    },
    onError: feedError,
    onRetry: () => setStatus('reconnecting'),
  });
}

/** Stops everything of the open document: its feed, its editor and its Yjs connection. */
function closeDocument() {
  state.documentFeed?.stop();
  const editor = state.editor;
  if (editor) {
    editor.view?.destroy();
    // The provider tells the others that this cursor is gone; the doc takes its awareness along.
    editor.provider.destroy();
    editor.doc.destroy();
  }
  Object.assign(state, {
    documentFeed: null,
    documentId: null,
    editor: null,
    base: null,
    dirty: false,
    version: null,
    titleNote: '',
    conflict: null,
  });
  $('editor').replaceChildren();
  $('conflict').hidden = true;
  $('document-state').textContent = '';
}

/** The open document was deleted, or is no longer open to this user: say so and stop. */
function documentGone(message) {
  closeDocument();
  showDocumentList();
  $('document').hidden = true;
  showError('channel-error', new ApiError([{ message }]));
}

// ---- the co-editor ----------------------------------------------------------------------

/**
 * Colours for other people's cursors, one per user, the same on every page. Six-digit hex:
 * y-codemirror makes the selection's shade by appending an alpha to it.
 */
const COLORS = ['#c0392b', '#2e86c1', '#239b56', '#b9770e', '#7d3c98', '#148f77', '#cb4335', '#2c3e9e'];

function colorOf(userId) {
  let hash = 0;
  for (const c of String(userId)) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return COLORS[hash % COLORS.length];
}

/**
 * Joins the document's Yjs room: a Y.Doc whose root Y.Text `body` is the text, kept in step
 * with the server (and through it with everyone else) by y-websocket's provider, which
 * reconnects by itself and sends what was typed meanwhile. The editor appears once the
 * server's text has arrived, so that nothing typed lands in an empty document before it.
 */
function openEditor(id) {
  const doc = new Y.Doc();
  const provider = new WebsocketProvider(YJS_URL, id, doc, {
    params: { access_token: state.token },
    // Two tabs of one browser would otherwise also sync directly over a BroadcastChannel;
    // every edit goes through the server instead, as it does between two computers.
    disableBc: true,
  });
  // Who this is, for the others' editors: their view of this cursor carries the name.
  provider.awareness.setLocalStateField('user', { name: state.user.name, color: colorOf(state.user.id) });
  const editor = { doc, provider, view: null };
  state.editor = editor;
  const current = () => state.editor === editor;
  provider.on('status', () => current() && showDocumentState());
  provider.on('sync', (synced) => {
    if (!current()) return;
    if (synced && !editor.view) editor.view = createView(doc.getText('body'), provider.awareness);
    showDocumentState();
  });
  // y-websocket gives up on a 44xx close by itself (it would be refused again); the page
  // stops too, and says why.
  provider.on('closed', ({ code }) => {
    if (!current()) return;
    if (code === 4401) signOut('Your session has ended; sign in again.');
    else if (code === 4403) documentGone('This document is no longer open to you: it was deleted, or you were removed from its channel.');
    else documentGone(`The document's connection was refused (${code}).`);
  });
  showDocumentState();
}

function createView(ytext, awareness) {
  return new EditorView({
    parent: $('editor'),
    state: EditorState.create({
      doc: ytext.toString(),
      extensions: [
        // Undo is Yjs's: it takes back one's own typing, never someone else's.
        keymap.of([...yUndoManagerKeymap, ...defaultKeymap]),
        drawSelection(),
        highlightSpecialChars(),
        EditorView.lineWrapping,
        EditorView.contentAttributes.of({ 'aria-label': 'Content' }),
        placeholder('Write here: everyone in the channel sees it as you type.'),
        // The text both ways, others' cursors and selections with their names, and undo.
        yCollab(ytext, awareness),
      ],
    }),
  });
}

/** The connection, the latest version and the title's state, under the editor. */
function showDocumentState() {
  const provider = state.editor?.provider;
  let connection = '';
  if (provider?.synced) connection = 'Synced';
  else if (provider?.wsconnected) connection = 'Connected, syncing…';
  else if (provider?.wsconnecting) connection = 'Connecting…';
  else if (provider) connection = 'Offline: what you type is kept and sent when the connection is back';
  const version = state.version === null ? '' : `version ${state.version}`;
  $('document-state').textContent = [connection, version, state.titleNote].filter(Boolean).join(' · ');
}

// ---- the title --------------------------------------------------------------------------

function setTitle(doc, note) {
  $('document-title').elements.title.value = doc.title;
  state.base = { id: doc.id, title: doc.title, version: doc.version };
  state.version = Math.max(state.version ?? 0, doc.version);
  state.dirty = false;
  state.conflict = null;
  state.titleNote = note;
  $('conflict').hidden = true;
  showDocumentState();
}

/** A change of the open document from the feed: mostly someone's typing, now and then a title. */
function documentChanged(latest) {
  if (!state.base || latest.id !== state.base.id) return;
  state.version = Math.max(state.version ?? 0, latest.version);
  if (latest.version > state.base.version) {
    if (latest.title === state.base.title) {
      // The version counts every change, each keystroke in the text included. This one left
      // the title alone, so a title being edited is still based on the current one: its
      // save names this version.
      state.base = { ...state.base, version: latest.version };
    } else if (state.dirty) {
      state.titleNote = `Someone renamed it “${latest.title}”; your unsaved title is kept.`;
    } else {
      setTitle(latest, 'Renamed live');
      return;
    }
  }
  showDocumentState();
}

/**
 * Saves the title if the document is still at `expectedVersion`. A CONFLICT is a conflict of
 * titles only when the title is no longer `basedOn`: anyone's typing raises the version too,
 * and then the save is simply tried again on the new version (a few times, as long as the
 * title stays the same).
 */
async function saveTitle(expectedVersion, basedOn, attempts = 3) {
  const title = $('document-title').elements.title.value;
  const id = state.documentId;
  try {
    const data = await request(
      state.token,
      `mutation Rename($input: UpdateDocumentInput!) { updateDocument(input: $input) { ${DOCUMENT} } }`,
      { input: { id, title, expectedVersion } },
    );
    if (state.documentId !== id) return;
    state.documents.set(data.updateDocument.id, data.updateDocument);
    showDocumentList();
    setTitle(data.updateDocument, 'Title saved');
  } catch (error) {
    if (state.documentId !== id) return;
    if (error.code !== 'CONFLICT') {
      state.titleNote = describe(error);
      showDocumentState();
      return;
    }
    let latest;
    try {
      ({ document: latest } = await request(
        state.token,
        `query Doc($id: ID!) { document(id: $id) { ${DOCUMENT} } }`,
        { id },
      ));
    } catch (fetchError) {
      state.titleNote = describe(fetchError);
      showDocumentState();
      return;
    }
    if (state.documentId !== id || !latest) return;
    if (latest.title === basedOn && attempts > 1) {
      await saveTitle(latest.version, basedOn, attempts - 1);
      return;
    }
    state.conflict = latest;
    $('conflict-message').textContent =
      `Conflict: someone else renamed this document “${latest.title}” before you saved. ` +
      'Your title is still here and was not saved.';
    $('conflict').hidden = false;
  }
}

async function loadTheirs() {
  try {
    const { document: latest } = await request(
      state.token,
      `query Doc($id: ID!) { document(id: $id) { ${DOCUMENT} } }`,
      { id: state.documentId },
    );
    if (latest) setTitle(latest, 'Loaded their title');
  } catch (error) {
    state.titleNote = describe(error);
    showDocumentState();
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
$('document-title').elements.title.addEventListener('input', () => {
  state.dirty = true;
  state.titleNote = 'Unsaved title';
  showDocumentState();
});
$('document-title').addEventListener('submit', (event) => {
  event.preventDefault();
  saveTitle(state.base.version, state.base.title);
});
$('load-theirs').addEventListener('click', loadTheirs);
// Replaces the title that won, and only that one: a later rename is a conflict again.
$('overwrite').addEventListener('click', () => saveTitle(state.conflict.version, state.conflict.title));
resumeSession();
