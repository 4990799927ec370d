/**
 * Chorus viewer page: asks a question, streams the one shared answer over Server-Sent Events,
 * and follows a conversation opened from a share link (`/?c=ID`).
 *
 * Owns the page's conversation state (turns and their choices, the user's prompts) and renders
 * it. Model text only ever reaches the DOM through text nodes, never as HTML.
 */

import { storeApiKey, storedApiKey } from "/web/api-key.js";

// "N watching" is polled (GET /v1/conversations/ID): cheap, and late by at most this much.
const WATCHING_REFRESH_MS = 2000;
const STREAM_RETRY_FIRST_MS = 2000;
const STREAM_RETRY_MAX_MS = 30000;
const FENCE = "```";

// ---------------------------------------------------------------------------------------------
// Pure helpers: no DOM, no network.

/**
 * Splits answer text into prose and fenced code blocks. Lossless: concatenating the pieces of
 * every block, in order, gives back `text` exactly, so the rendered answer's textContent stays
 * byte-identical to the streamed text, fence lines included.
 *
 * A fence is ``` at the start of a line, possibly indented (models indent fences inside lists).
 * A fence that is not closed yet runs to the end of the text: that is what a code block looks
 * like while it is still streaming.
 *
 * @param {string} text
 * @returns {Array<{kind: "prose", text: string} |
 *                 {kind: "code", open: string, body: string, close: string}>}
 */
function splitCodeFences(text) {
  const blocks = [];
  let position = 0;
  while (position < text.length) {
    const openStart = findFenceLine(text, position);
    if (openStart === -1) {
      blocks.push({ kind: "prose", text: text.slice(position) });
      break;
    }
    if (openStart > position) {
      blocks.push({ kind: "prose", text: text.slice(position, openStart) });
    }
    const openEnd = endOfLine(text, openStart);
    const closeStart = findFenceLine(text, openEnd);
    if (closeStart === -1) {
      blocks.push({ kind: "code", open: text.slice(openStart, openEnd), body: text.slice(openEnd), close: "" });
      break;
    }
    const closeEnd = endOfLine(text, closeStart);
    blocks.push({
      kind: "code",
      open: text.slice(openStart, openEnd),
      body: text.slice(openEnd, closeStart),
      close: text.slice(closeStart, closeEnd),
    });
    position = closeEnd;
  }
  return blocks;
}

/** Index where the first fence line at or after `from` starts, or -1. */
function findFenceLine(text, from) {
  let searchFrom = from;
  for (;;) {
    const fenceIndex = text.indexOf(FENCE, searchFrom);
    if (fenceIndex === -1) return -1;
    const lineStart = text.lastIndexOf("\n", fenceIndex - 1) + 1;
    // A fence whose line began before `from` sits mid-line in text already consumed.
    if (lineStart >= from && /^[ \t]*$/.test(text.slice(lineStart, fenceIndex))) return lineStart;
    searchFrom = fenceIndex + FENCE.length;
  }
}

/** Index just past the line break ending the line at `from`, or the text's length. */
function endOfLine(text, from) {
  const newline = text.indexOf("\n", from);
  return newline === -1 ? text.length : newline + 1;
}

/**
 * Folds streamed tool-call pieces into `calls` (OpenAI delta shape: pieces with the same
 * `index` belong to one call and their strings concatenate). Whole tool calls, as a snapshot
 * sends them, fold in the same way.
 */
function mergeToolCalls(calls, pieces) {
  for (const piece of pieces) {
    if (piece === null || typeof piece !== "object") continue;
    const index = Number.isInteger(piece.index) ? piece.index : calls.length;
    calls[index] ??= { id: "", type: "", name: "", arguments: "" };
    const call = calls[index];
    if (typeof piece.id === "string") call.id = piece.id;
    if (typeof piece.type === "string") call.type = piece.type;
    if (typeof piece.function?.name === "string") call.name += piece.function.name;
    if (typeof piece.function?.arguments === "string") call.arguments += piece.function.arguments;
  }
}

/** The text of a chat message whose content is a string or a list of text parts. */
function messageText(message) {
  const content = message?.content;
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part?.text === "string" ? part.text : "")).join("");
  }
  return "";
}

/** The user prompts in turn order: the n-th user message asked turn n. */
function userPrompts(messages) {
  if (!Array.isArray(messages)) return [];
  return messages.filter((message) => message?.role === "user").map(messageText);
}

/**
 * The page URL for a conversation. When the server requires a watch token it goes in the
 * fragment, which browsers never send to a server (nor in a Referer).
 */
function shareUrl(conversationId, watchToken = null) {
  const fragment = watchToken ? `#token=${encodeURIComponent(watchToken)}` : "";
  return new URL(`/?c=${encodeURIComponent(conversationId)}${fragment}`, window.location.href).href;
}

/** A URL for watching a conversation: with `?token=` when a watch token is needed. */
function watchUrl(conversationId, suffix, watchToken) {
  const url = conversationUrl(conversationId, suffix);
  return watchToken ? `${url}?token=${encodeURIComponent(watchToken)}` : url;
}


function conversationUrl(conversationId, suffix = "") {
  return `/v1/conversations/${encodeURIComponent(conversationId)}${suffix}`;
}

// ---------------------------------------------------------------------------------------------
// Talking to the API.

class ApiError extends Error {
  /** @param {number} status HTTP status, 0 when the server could not be reached. */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Sends a JSON request; resolves to the parsed body (null when empty), or throws ApiError. */
async function requestJson(method, url, body) {
  const init = { method, headers: { Accept: "application/json" } };
  const apiKey = storedApiKey();
  if (apiKey) init.headers.Authorization = `Bearer ${apiKey}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ApiError(0, "network_error", "Could not reach the server.");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // An empty body (202) or a proxy's HTML error page: the status alone has to do.
  }
  if (!response.ok) {
    const error = payload?.error;
    throw new ApiError(
      response.status,
      typeof error?.code === "string" ? error.code : `http_${response.status}`,
      typeof error?.message === "string" ? error.message : `Request failed (HTTP ${response.status}).`,
    );
  }
  return payload;
}

// ---------------------------------------------------------------------------------------------
// Conversation state, as the events describe it.

class ChoiceState {
  content = "";
  refusal = "";
  /** @type {Array<{id: string, type: string, name: string, arguments: string}>} */
  toolCalls = [];
  /** @type {string | null} */
  finishReason = null;
}

class TurnState {
  /** @type {string | null} */
  model = null;
  /** "streaming", "done" or "error". */
  status = "streaming";
  /** @type {string | null} */
  finishReason = null;
  usage = null;
  /** @type {{code: string, message: string} | null} */
  error = null;
  /** @type {Map<number, ChoiceState>} */
  choices = new Map();

  constructor(turn) {
    this.turn = turn;
    // Choice 0 always exists so every turn has its primary answer element, even when empty.
    this.choice(0);
  }

  choice(index) {
    let choice = this.choices.get(index);
    if (choice === undefined) {
      choice = new ChoiceState();
      this.choices.set(index, choice);
    }
    return choice;
  }

  /** A turn as a `snapshot` event (or GET /v1/conversations/ID) describes it. */
  static fromSnapshot(data) {
    const turn = new TurnState(data.turn);
    if (typeof data.model === "string") turn.model = data.model;
    turn.usage = data.usage ?? null;
    if (data.error && typeof data.error === "object") {
      turn.status = "error";
      turn.error = { code: String(data.error.code ?? "error"), message: String(data.error.message ?? "") };
    } else {
      turn.status = data.status === "streaming" ? "streaming" : data.status === "error" ? "error" : "done";
    }
    for (const choiceData of Array.isArray(data.choices) ? data.choices : []) {
      const choice = turn.choice(Number.isInteger(choiceData.choice) ? choiceData.choice : 0);
      choice.content = typeof choiceData.content === "string" ? choiceData.content : "";
      choice.refusal = typeof choiceData.refusal === "string" ? choiceData.refusal : "";
      if (Array.isArray(choiceData.tool_calls)) mergeToolCalls(choice.toolCalls, choiceData.tool_calls);
      choice.finishReason = choiceData.finish_reason ?? null;
    }
    turn.finishReason = turn.choices.get(0).finishReason;
    return turn;
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering. Every render is idempotent: it updates the existing elements to match the state.

function createElement(tagName, className, text) {
  const element = document.createElement(tagName);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

/**
 * Sets an element's text, reusing its text node when it has exactly one, so that a growing
 * answer does not lose the reader's text selection on every chunk.
 */
function setText(element, text) {
  const node = element.firstChild;
  if (node !== null && node.nodeType === Node.TEXT_NODE && node.nextSibling === null) {
    if (node.data !== text) node.data = text;
  } else if (element.textContent !== text || element.childElementCount > 0) {
    element.textContent = text;
  }
}

/** Inserts `child` among `parent`'s children ordered by the numeric `data-<key>` attribute. */
function insertOrdered(parent, child, key) {
  const order = Number(child.dataset[key]);
  const next = [...parent.children].find((sibling) => Number(sibling.dataset[key]) > order);
  parent.insertBefore(child, next ?? null);
}

function buildBlockElement(block) {
  if (block.kind === "prose") {
    const prose = createElement("span", "prose");
    prose.dataset.kind = "prose";
    return prose;
  }
  // Fence lines stay in the element (dimmed) so textContent matches the raw answer.
  const pre = createElement("pre", "code-block");
  pre.dataset.kind = "code";
  pre.append(createElement("span", "fence"), createElement("code"), createElement("span", "fence"));
  return pre;
}

/**
 * Renders answer text into `container` as prose spans and <pre><code> blocks, touching only the
 * blocks that changed. The container must hold nothing else: its textContent is the answer.
 */
function renderAnswerText(container, text) {
  const blocks = splitCodeFences(text);
  blocks.forEach((block, index) => {
    let element = container.children[index];
    if (element === undefined || element.dataset.kind !== block.kind) {
      // The block list only changes shape at its end while text streams in.
      while (container.children.length > index) container.lastElementChild.remove();
      element = buildBlockElement(block);
      container.append(element);
    }
    if (block.kind === "prose") {
      setText(element, block.text);
    } else {
      const [open, body, close] = element.children;
      setText(open, block.open);
      setText(body, block.body);
      setText(close, block.close);
    }
  });
  while (container.children.length > blocks.length) container.lastElementChild.remove();
}

class ChoiceView {
  constructor(index) {
    this.root = createElement("section", "choice");
    this.root.dataset.index = String(index);
    if (index > 0) {
      this.label = createElement("h3", "choice-label", `Choice ${index}`);
      this.root.append(this.label);
    }
    this.answer = createElement("div", "answer");
    this.answer.dataset.choice = String(index);
    this.refusal = createElement("p", "refusal");
    this.refusal.hidden = true;
    this.toolCalls = createElement("div", "tool-calls");
    this.toolCalls.hidden = true;
    this.root.append(this.answer, this.refusal, this.toolCalls);
  }

  /** @param {ChoiceState} choice */
  render(choice, index) {
    renderAnswerText(this.answer, choice.content);
    this.refusal.hidden = choice.refusal === "";
    setText(this.refusal, choice.refusal === "" ? "" : `Refused: ${choice.refusal}`);
    const calls = choice.toolCalls.filter(Boolean);
    this.toolCalls.hidden = calls.length === 0;
    renderToolCalls(this.toolCalls, calls);
    if (this.label !== undefined) {
      const reason = choice.finishReason && choice.finishReason !== "stop" ? ` · ${choice.finishReason}` : "";
      setText(this.label, `Choice ${index}${reason}`);
    }
  }
}

function renderToolCalls(container, calls) {
  while (container.children.length > calls.length) container.lastElementChild.remove();
  calls.forEach((call, index) => {
    const element = container.children[index] ?? container.appendChild(createElement("pre", "tool-call"));
    setText(element, `Tool call: ${call.name || "(unnamed)"}(${call.arguments})`);
  });
}

class TurnView {
  /** @type {Map<number, ChoiceView>} */
  choiceViews = new Map();

  constructor(turn) {
    this.root = createElement("article", "turn");
    this.root.dataset.turn = String(turn);

    this.prompt = createElement("div", "prompt");
    this.prompt.append(createElement("span", "role", "You"));
    this.promptText = createElement("p", "prompt-text");
    this.prompt.append(this.promptText);

    this.primaryChoice = createElement("div", "reply");
    this.otherChoices = createElement("div", "other-choices");
    this.meta = createElement("p", "turn-meta");
    this.error = createElement("p", "turn-error");
    this.error.hidden = true;
    this.root.append(this.prompt, this.primaryChoice, this.otherChoices, this.meta, this.error);
  }

  choiceView(index) {
    let view = this.choiceViews.get(index);
    if (view === undefined) {
      view = new ChoiceView(index);
      this.choiceViews.set(index, view);
      if (index === 0) this.primaryChoice.append(view.root);
      else insertOrdered(this.otherChoices, view.root, "index");
    }
    return view;
  }

  /** @param {TurnState} turn @param {string | undefined} promptText */
  render(turn, promptText) {
    this.root.dataset.status = turn.status;
    this.prompt.hidden = promptText === undefined;
    setText(this.promptText, promptText ?? "");
    for (const [index, choice] of turn.choices) this.choiceView(index).render(choice, index);
    this.otherChoices.hidden = turn.choices.size < 2;
    setText(this.meta, describeTurn(turn));
    this.error.hidden = turn.error === null;
    this.error.classList.toggle("cancelled", turn.error?.code === "cancelled");
    setText(this.error, turn.error === null ? "" : describeError(turn.error));
  }
}

function describeTurn(turn) {
  const parts = [];
  if (turn.model) parts.push(turn.model);
  if (turn.status === "streaming") {
    parts.push("answering…");
  } else if (turn.status === "error") {
    parts.push(turn.error?.code === "cancelled" ? "stopped" : "failed");
  } else {
    parts.push(turn.finishReason && turn.finishReason !== "stop" ? `done (${turn.finishReason})` : "done");
  }
  if (Number.isFinite(turn.usage?.total_tokens)) parts.push(`${turn.usage.total_tokens} tokens`);
  return parts.join(" · ");
}

function describeError(error) {
  if (error.code === "cancelled") return `Stopped: ${error.message || "the answer was cancelled."}`;
  return `Error (${error.code}): ${error.message}`;
}

// ---------------------------------------------------------------------------------------------
// The page: one conversation at a time, one EventSource for it.

class ChorusPage {
  /** @type {string | null} */
  conversationId = null;
  /** The conversation's watch token when the server requires one, else null. */
  watchToken = null;
  /** @type {EventSource | null} */
  eventSource = null;
  /** Where the current stream comes from, to reopen it after the browser gave up. */
  streamUrl = "";
  /** The stream ended for good (`end` event, or the conversation is gone): Ask starts anew. */
  ended = false;
  /** A POST is in flight; blocks a second submit. */
  requestPending = false;
  refreshPending = false;
  /** @type {Map<number, TurnState>} */
  turns = new Map();
  /** @type {Map<number, TurnView>} */
  turnViews = new Map();
  /** User prompts by turn number. @type {string[]} */
  prompts = [];
  /** @type {number | null} */
  streamRetryTimer = null;
  streamRetryDelay = STREAM_RETRY_FIRST_MS;
  /** The id of the last event applied from the current stream ("" before the first). */
  lastEventId = "";
  /** The EventSource is reconnecting by itself; it resumes after `resumeAfter`. */
  reconnecting = false;
  resumeAfter = "";
  /** Resumed, and the first event of the resumed stream has not arrived yet. */
  awaitingResumedEvent = false;
  /** The stream was reopened from the start after the browser gave up on it. */
  reopened = false;
  /** How many times the stream dropped and was resumed (shown for tests as data-reconnects). */
  reconnects = 0;

  constructor() {
    const byId = (id) => document.getElementById(id);
    this.form = byId("ask-form");
    this.promptInput = byId("prompt");
    this.askButton = byId("ask");
    this.stopButton = byId("stop");
    this.formError = byId("form-error");
    this.status = byId("status");
    this.connectionNote = byId("connection-note");
    this.watching = byId("watching");
    this.mockNotice = byId("mock-notice");
    this.serverInfo = byId("server-info");
    this.share = byId("share");
    this.shareLink = byId("share-link");
    this.copyButton = byId("copy-link");
    this.copyResult = byId("copy-result");
    this.conversation = byId("conversation");
    this.streamEnded = byId("stream-ended");
    this.apiKeyRow = byId("api-key-row");
    this.apiKeyInput = byId("api-key");
  }

  start() {
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submitPrompt();
    });
    this.promptInput.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.stopButton.addEventListener("click", () => this.cancelTurn());
    this.copyButton.addEventListener("click", () => this.copyShareLink());
    // Polled until the server pushes the count itself.
    window.setInterval(() => this.refreshConversation(), WATCHING_REFRESH_MS);
    document.addEventListener("visibilitychange", () => this.refreshConversation());

    this.loadServerInfo();
    const sharedId = new URLSearchParams(window.location.search).get("c");
    const sharedToken = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (sharedId) this.openSharedConversation(sharedId, sharedToken);
    this.updateControls();
  }

  async loadServerInfo() {
    try {
      const info = await requestJson("GET", "/v1/info");
      this.mockNotice.hidden = info?.upstream?.mock !== true;
      const model = typeof info?.upstream?.model === "string" ? info.upstream.model : "";
      const version = typeof info?.version === "string" ? `Chorus ${info.version}` : "Chorus";
      this.serverInfo.textContent = model ? `${version} · ${model}` : version;
    } catch (error) {
      console.warn("GET /v1/info failed:", error.message);
    }
  }

  // --- user actions ---

  async submitPrompt() {
    const text = this.promptInput.value.trim();
    if (text === "" || this.requestPending) return;
    if (this.isTurnStreaming()) {
      this.showFormError("Wait for the answer to finish, or press Stop.");
      return;
    }
    this.showFormError("");
    if (!this.apiKeyRow.hidden) storeApiKey(this.apiKeyInput.value.trim());
    this.requestPending = true;
    this.updateControls();
    try {
      if (this.conversationId === null || this.ended) await this.startConversation(text);
      else await this.sendFollowUp(text);
      this.promptInput.value = "";
    } catch (error) {
      if (error.status === 404 && this.conversationId !== null) {
        this.endStream("not found");
        this.showFormError("This conversation no longer exists. Ask again to start a new one.");
      } else if (error.status === 401) {
        this.askForApiKey();
      } else {
        this.showFormError(error.message);
      }
    } finally {
      this.requestPending = false;
      this.updateControls();
    }
  }

  async startConversation(text) {
    const created = await requestJson("POST", "/v1/conversations", {
      messages: [{ role: "user", content: text }],
    });
    // The events URL carries ?token= exactly when the server requires watch tokens.
    const eventsUrl = new URL(created.events_url, window.location.href);
    const watchToken = eventsUrl.searchParams.get("token");
    this.resetConversation(created.id, watchToken);
    window.history.replaceState(null, "", shareUrl(created.id, watchToken));
    this.prompts = [text];
    this.openStream(created.events_url ?? conversationUrl(created.id, "/events"));
    // Shows the prompt at once, before the stream's first event.
    this.ensureTurn(0);
    this.renderTurn(0);
  }

  async sendFollowUp(text) {
    const accepted = await requestJson("POST", conversationUrl(this.conversationId, "/messages"), {
      content: text,
    });
    const turn = Number.isInteger(accepted?.turn) ? accepted.turn : this.prompts.length;
    this.prompts[turn] = text;
    this.ensureTurn(turn);
    this.renderTurn(turn);
    this.updateControls();
  }

  async cancelTurn() {
    if (this.conversationId === null) return;
    this.stopButton.disabled = true;
    try {
      await requestJson("POST", conversationUrl(this.conversationId, "/cancel"));
      // The turn ends through its `error` event (code "cancelled"), like for every viewer.
    } catch (error) {
      if (error.status === 401) this.askForApiKey();
      else this.showFormError(error.message);
    } finally {
      this.stopButton.disabled = false;
    }
  }

  /** The server wants an API key: show the field; the key is kept for this tab only. */
  askForApiKey() {
    const refused = storedApiKey() !== "";
    this.apiKeyRow.hidden = false;
    this.apiKeyInput.focus();
    this.showFormError(refused ? "The API key was refused." : "This server needs an API key: enter it and try again.");
  }

  async copyShareLink() {
    try {
      await navigator.clipboard.writeText(this.shareLink.href);
      this.copyResult.textContent = "Copied";
    } catch {
      // The clipboard API needs a secure context (https or localhost): let the reader copy.
      const range = document.createRange();
      range.selectNodeContents(this.shareLink);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      this.copyResult.textContent = "Selected: press Ctrl+C to copy";
    }
  }

  // --- opening a conversation ---

  async openSharedConversation(conversationId, watchToken) {
    this.resetConversation(conversationId, watchToken);
    this.setStatus("connecting", "connecting…");
    let state;
    try {
      state = await requestJson("GET", watchUrl(conversationId, "", this.watchToken));
    } catch (error) {
      if (error.status === 404) {
        this.endStream("not found");
        this.showFormError("This conversation does not exist (or has expired). Ask to start a new one.");
      } else {
        this.showFormError(`Could not load the conversation: ${error.message}`);
        this.setStatus("disconnected", "disconnected");
      }
      return;
    }
    if (conversationId !== this.conversationId) return;  // the reader started another meanwhile
    this.applyConversationState(state);
    // From the start: the server replays every event, so the page builds the same state.
    // Without a token in the link, the cookie set for this browser at creation (if any) does.
    this.openStream(watchUrl(conversationId, "/events", this.watchToken));
  }

  resetConversation(conversationId, watchToken = null) {
    this.closeStream();
    this.conversationId = conversationId;
    this.watchToken = watchToken;
    this.ended = false;
    this.prompts = [];
    this.clearTurns();
    this.streamEnded.hidden = true;
    this.setConnectionNote("");
    this.reconnects = 0;
    delete this.status.dataset.reconnects;
    this.watching.textContent = "0";
    this.shareLink.href = shareUrl(conversationId, watchToken);
    this.shareLink.textContent = shareUrl(conversationId, watchToken);
    this.copyResult.textContent = "";
    this.share.hidden = false;
  }

  openStream(url) {
    this.closeStream();
    // A new EventSource replays from the start, so the state it rebuilds starts empty.
    this.clearTurns();
    this.lastEventId = "";
    this.reconnecting = false;
    this.awaitingResumedEvent = false;
    this.reopened = false;
    this.setStatus("connecting", "connecting…");
    const source = new EventSource(url);
    this.eventSource = source;
    this.streamUrl = url;

    source.addEventListener("open", () => {
      if (source !== this.eventSource) return;
      this.streamRetryDelay = STREAM_RETRY_FIRST_MS;
      this.setStatus("live", "live");
      // Count this tab now rather than at the next poll (it was not counted while away).
      this.refreshConversation();
      if (this.reconnecting) this.onResumed();
      else if (this.reopened) this.setConnectionNote("reconnected: replayed from the start");
      this.reopened = false;
    });
    // The server's named `error` events and the EventSource's own connection errors arrive
    // as the same event type; only the server's carry a `data` string.
    source.addEventListener("error", (event) => {
      if (typeof event.data === "string") this.handleEvent(event, (data) => this.applyError(data));
      else this.onConnectionError(source);
    });
    const handlers = {
      turn: (data) => this.applyTurnStart(data),
      answer: (data) => this.applyAnswer(data),
      done: (data) => this.applyDone(data),
      snapshot: (data) => this.applySnapshot(data),
      end: (data) => this.endStream(typeof data.reason === "string" ? data.reason : "unknown"),
    };
    for (const [name, apply] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => this.handleEvent(event, apply));
    }
  }

  closeStream() {
    if (this.streamRetryTimer !== null) {
      window.clearTimeout(this.streamRetryTimer);
      this.streamRetryTimer = null;
    }
    if (this.eventSource !== null) {
      this.eventSource.close();
      this.eventSource = null;
    }
  }

  onConnectionError(source) {
    if (source !== this.eventSource) return;
    if (source.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself with Last-Event-ID; the server replays what we missed.
      if (!this.reconnecting) {
        this.reconnecting = true;
        this.resumeAfter = this.lastEventId;
      }
      this.setStatus("reconnecting", "reconnecting…");
      this.setConnectionNote(
        this.resumeAfter ? `connection lost after event ${this.resumeAfter}` : "connection lost",
      );
      return;
    }
    this.reconnecting = false;
    // CLOSED without an `end` event: the browser gave up (an HTTP error or a non-SSE answer,
    // e.g. from a proxy while the server restarts). Retry ourselves, with backoff.
    this.setStatus("disconnected", "disconnected");
    this.streamRetryTimer = window.setTimeout(() => this.retryStream(), this.streamRetryDelay);
    this.streamRetryDelay = Math.min(this.streamRetryDelay * 2, STREAM_RETRY_MAX_MS);
  }

  async retryStream() {
    this.streamRetryTimer = null;
    const conversationId = this.conversationId;
    try {
      await requestJson("GET", watchUrl(conversationId, "", this.watchToken));
    } catch (error) {
      if (conversationId !== this.conversationId || this.ended) return;
      if (error.status === 404) {
        this.endStream("not found");
      } else {
        this.streamRetryTimer = window.setTimeout(() => this.retryStream(), this.streamRetryDelay);
        this.streamRetryDelay = Math.min(this.streamRetryDelay * 2, STREAM_RETRY_MAX_MS);
      }
      return;
    }
    if (conversationId !== this.conversationId || this.ended) return;
    this.openStream(this.streamUrl);
    this.reopened = true;
  }

  /**
   * The EventSource is back after a drop. It sent Last-Event-ID, so the server replays exactly
   * the events after it (or a snapshot, which `applySnapshot` notes): nothing is lost and
   * nothing is applied twice.
   */
  onResumed() {
    this.reconnecting = false;
    this.awaitingResumedEvent = true;
    this.reconnects += 1;
    this.status.dataset.reconnects = String(this.reconnects);
    this.setConnectionNote(
      this.resumeAfter ? `resumed after event ${this.resumeAfter}, nothing lost` : "reconnected",
    );
  }

  setConnectionNote(text) {
    this.connectionNote.textContent = text;
    this.connectionNote.hidden = text === "";
  }

  /** The server closed the stream for good (or the conversation is gone). */
  endStream(reason) {
    this.closeStream();
    this.ended = true;
    this.setStatus("ended", `ended: ${reason}`);
    this.streamEnded.textContent = `Stream ended: ${reason}`;
    this.streamEnded.hidden = false;
    this.updateControls();
  }

  // --- applying events ---

  handleEvent(event, apply) {
    if (event.target !== this.eventSource) return;
    // Events with an id are conversation events; `end` has none and keeps the last one.
    if (event.lastEventId) this.lastEventId = event.lastEventId;
    if (this.awaitingResumedEvent) {
      this.awaitingResumedEvent = false;
      // The buffer had moved past our position: the server sent the whole state instead.
      if (event.type === "snapshot") {
        this.setConnectionNote(`resumed from a snapshot at event ${event.lastEventId}, nothing lost`);
      }
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      console.warn(`Ignored a "${event.type}" event whose data is not JSON.`);
      return;
    }
    if (data === null || typeof data !== "object") return;
    apply(data);
  }

  applyTurnStart(data) {
    if (!Number.isInteger(data.turn)) return;
    const turn = this.ensureTurn(data.turn);
    if (typeof data.model === "string") turn.model = data.model;
    turn.status = "streaming";
    this.renderTurn(data.turn);
    // A prompt posted from another tab is not an event: fetch it now rather than at the next poll.
    if (this.prompts[data.turn] === undefined) this.refreshConversation();
  }

  applyAnswer(data) {
    if (!Number.isInteger(data.turn)) return;
    const choice = this.ensureTurn(data.turn).choice(Number.isInteger(data.choice) ? data.choice : 0);
    if (typeof data.content === "string") choice.content += data.content;
    if (typeof data.refusal === "string") choice.refusal += data.refusal;
    if (Array.isArray(data.tool_calls)) mergeToolCalls(choice.toolCalls, data.tool_calls);
    this.renderTurn(data.turn);
  }

  applyDone(data) {
    if (!Number.isInteger(data.turn)) return;
    const turn = this.ensureTurn(data.turn);
    turn.status = "done";
    turn.finishReason = data.finish_reason ?? null;
    turn.usage = data.usage ?? null;
    for (const choiceData of Array.isArray(data.choices) ? data.choices : []) {
      if (Number.isInteger(choiceData?.choice)) {
        turn.choice(choiceData.choice).finishReason = choiceData.finish_reason ?? null;
      }
    }
    this.renderTurn(data.turn);
  }

  applyError(data) {
    const error = { code: String(data.code ?? "error"), message: String(data.message ?? "") };
    if (!Number.isInteger(data.turn)) {
      this.showFormError(describeError(error));
      return;
    }
    const turn = this.ensureTurn(data.turn);
    turn.status = "error";
    turn.error = error;
    this.renderTurn(data.turn);
  }

  applySnapshot(data) {
    // The server could not replay what we missed: its snapshot replaces everything we have.
    this.clearTurns();
    for (const turnData of Array.isArray(data.turns) ? data.turns : []) {
      if (Number.isInteger(turnData?.turn)) this.turns.set(turnData.turn, TurnState.fromSnapshot(turnData));
    }
    for (const turnNumber of this.turns.keys()) this.renderTurn(turnNumber);
    this.updateControls();
  }

  // --- state and rendering ---

  ensureTurn(turnNumber) {
    let turn = this.turns.get(turnNumber);
    if (turn === undefined) {
      turn = new TurnState(turnNumber);
      this.turns.set(turnNumber, turn);
    }
    return turn;
  }

  clearTurns() {
    this.turns.clear();
    this.turnViews.clear();
    this.conversation.replaceChildren();
  }

  renderTurn(turnNumber) {
    const turn = this.turns.get(turnNumber);
    if (turn === undefined) return;
    let view = this.turnViews.get(turnNumber);
    if (view === undefined) {
      view = new TurnView(turnNumber);
      this.turnViews.set(turnNumber, view);
      insertOrdered(this.conversation, view.root, "turn");
    }
    const followingBottom = isScrolledToBottom();
    view.render(turn, this.prompts[turnNumber]);
    if (followingBottom) window.scrollTo(0, document.documentElement.scrollHeight);
    this.updateControls();
  }

  isTurnStreaming() {
    for (const turn of this.turns.values()) if (turn.status === "streaming") return true;
    return false;
  }

  updateControls() {
    const streaming = this.isTurnStreaming() && !this.ended;
    this.askButton.disabled = streaming || this.requestPending;
    this.stopButton.hidden = !streaming;
    this.conversation.setAttribute("aria-busy", String(streaming));
  }

  setStatus(state, text) {
    this.status.dataset.state = state;
    this.status.textContent = text;
  }

  showFormError(message) {
    this.formError.textContent = message;
    this.formError.hidden = message === "";
  }

  /** Refreshes the watcher count, and the prompts (other viewers may have asked follow-ups). */
  async refreshConversation() {
    const conversationId = this.conversationId;
    if (conversationId === null || this.ended || this.refreshPending || document.hidden) return;
    this.refreshPending = true;
    let state;
    try {
      state = await requestJson("GET", watchUrl(conversationId, "", this.watchToken));
    } catch {
      // The stream reports a gone conversation; a missed count is not worth a message.
      return;
    } finally {
      this.refreshPending = false;
    }
    if (conversationId === this.conversationId) this.applyConversationState(state);
  }

  applyConversationState(state) {
    if (Number.isInteger(state?.subscribers)) this.watching.textContent = String(state.subscribers);
    const serverPrompts = userPrompts(state?.messages);
    // Keep prompts posted here that the server's answer does not list yet.
    const prompts = serverPrompts.concat(this.prompts.slice(serverPrompts.length));
    const changed = prompts.some((prompt, turn) => this.prompts[turn] !== prompt);
    this.prompts = prompts;
    if (changed) for (const turnNumber of this.turns.keys()) this.renderTurn(turnNumber);
  }
}

function isScrolledToBottom() {
  const slackPixels = 80;
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - slackPixels;
}

new ChorusPage().start();
