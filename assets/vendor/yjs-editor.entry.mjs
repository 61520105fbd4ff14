// The entry of the co-editing bundle, yjs-editor-*/yjs-editor.mjs: update.sh builds it with
// esbuild from the npm packages pinned at its top. It re-exports, unchanged, what the demo's
// co-editor is made of; the bundle is one file so that every module shares one copy of Yjs
// and of @codemirror/state (two copies break both).

// Yjs itself: the demo makes a Y.Doc per open document.
export * as Y from 'yjs';
// The y-websocket client, which speaks y-protocols' sync and awareness to /yjs/{documentId}.
export { WebsocketProvider } from 'y-websocket';
// The binding of a Y.Text to a CodeMirror view: the text, remote cursors and Yjs's undo.
export { yCollab, yUndoManagerKeymap } from 'y-codemirror.next';
// CodeMirror 6, only what a plain-text editor needs (no language, no editor history: undo is
// Yjs's, which undoes one's own edits and never someone else's).
export { EditorState } from '@codemirror/state';
export { EditorView, drawSelection, highlightSpecialChars, keymap, placeholder } from '@codemirror/view';
export { defaultKeymap } from '@codemirror/commands';
