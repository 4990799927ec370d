/**
 * Chorus dashboard: a live table of the server's conversations, fed by ONE firehose stream
 * (`GET /v1/events?all=1`, see README "Multiplexed and firehose streams"): a `snapshot`
 * replaces the table, `created` adds a row, `conversation_ended` removes it, `turn_started`,
 * `first_token`, `turn_done` and `turn_error` set the fields they name, and a `stats` event
 * about every second updates the rows that changed and the totals.
 *
 * The stream is read with fetch() rather than EventSource, because with API keys configured
 * it needs an Authorization header, which EventSource cannot send; so this module has its
 * own small SSE reader and reconnects itself, sending Last-Event-ID. Clicking a row opens an
 * inline pane that follows that conversation's answer over its own stream.
 *
 * Owns the table's rows (one per conversation id), the totals and the pane. Server text only
 * ever reaches the DOM through text nodes.
 */

import { SseParser } from "/web/sse-parser.js";
import { storeApiKey, storedApiKey } from "/web/api-key.js";

const FIREHOSE_URL = "/v1/events?all=1";
const RETRY_DEFAULT_MS = 2000;
const RETRY_MAX_MS = 30000;
const COLUMNS = [
  "conversation", "status", "model", "subscribers", "chunks", "tokens", "tokens_per_second",
  "ttft", "age",
];
// Row fields as the firehose names them; `stats` rows carry some of them.
const ROW_FIELDS = [
  "model", "created_at", "status", "turn", "subscribers", "chunks", "tokens", "tokens_estimated",
  "tokens_per_second", "ttft_seconds", "duration_seconds", "finish_reason", "error",
];
// What `turn_done` / `turn_error` report about the turn that ended.
const TURN_END_FIELDS = [
  "turn", "finish_reason", "chunks", "tokens", "tokens_estimated", "ttft_seconds",
  "duration_seconds", "tokens_per_second",
];

// ---------------------------------------------------------------------------------------------
// Server-Sent Events over fetch(): a reconnecting reader (the parser is sse-parser.js).

/**
 * Reads an SSE URL with fetch() and keeps reading it: when the stream ends or drops it
 * waits the server's `retry:` hint and reconnects with Last-Event-ID, as EventSource would.
 * A refusal (4xx) stops it. Callbacks: onOpen(), onEvent({type, data, id}), onDrop(),
 * onRefused({status, code, message}).
 */
class EventStreamReader {
  /** @type {AbortController | null} */
  controller = null;
  retryMs = RETRY_DEFAULT_MS;
  failures = 0;
  closed = false;
  /** @type {number | null} */
  timer = null;

  constructor(url, { headers = {}, onOpen, onEvent, onDrop, onRefused }) {
    this.url = url;
    this.headers = headers;
    this.callbacks = { onOpen, onEvent, onDrop, onRefused };
    this.parser = new SseParser((event) => this.callbacks.onEvent(event), (ms) => { this.retryMs = ms; });
  }

  start() {
    this.connect();
    return this;
  }

  close() {
    this.closed = true;
    if (this.timer !== null) window.clearTimeout(this.timer);
    this.controller?.abort();
  }

  async connect() {
    this.timer = null;
    if (this.closed) return;
    this.controller = new AbortController();
    const headers = { Accept: "text/event-stream", ...this.headers };
    if (this.parser.lastEventId) headers["Last-Event-ID"] = this.parser.lastEventId;
    let response;
    try {
      response = await fetch(this.url, { headers, signal: this.controller.signal, cache: "no-store" });
    } catch {
      this.dropped();
      return;
    }
    if (!response.ok) {
      const payload = await response.json().catch(() => null);
      if (response.status >= 400 && response.status < 500 && response.status !== 429) {
        this.closed = true;
        this.callbacks.onRefused({
          status: response.status,
          code: String(payload?.error?.code ?? `http_${response.status}`),
          message: String(payload?.error?.message ?? `HTTP ${response.status}`),
        });
        return;
      }
      this.dropped();
      return;
    }
    this.failures = 0;
    this.parser.reset();
    this.callbacks.onOpen();
    try {
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.closed) break;
        this.parser.feed(value);
      }
    } catch {
      // Dropped mid-stream (or closed by us): reconnect below unless closed.
    }
    this.dropped();
  }

  dropped() {
    if (this.closed) return;
    this.callbacks.onDrop();
    // The server's hint first; back off when the server cannot be reached at all.
    const delay = Math.min(this.retryMs * 2 ** Math.min(this.failures, 5), RETRY_MAX_MS);
    this.failures += 1;
    this.timer = window.setTimeout(() => this.connect(), delay);
  }
}

// ---------------------------------------------------------------------------------------------
// Formatting.

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function formatCount(value) {
  return isNumber(value) ? String(Math.round(value)) : "–";
}

function formatRate(value) {
  if (!isNumber(value)) return "–";
  return value >= 100 ? String(Math.round(value)) : value.toFixed(1);
}

function formatSeconds(seconds) {
  if (!isNumber(seconds)) return "–";
  return seconds >= 10 ? `${seconds.toFixed(1)} s` : `${Math.round(seconds * 1000)} ms`;
}

function formatAge(seconds) {
  if (!isNumber(seconds)) return "–";
  const whole = Math.max(0, Math.floor(seconds));
  if (whole < 60) return `${whole} s`;
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
}

function createElement(tagName, className, text) {
  const element = document.createElement(tagName);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function parseData(event) {
  try {
    const data = JSON.parse(event.data);
    return data !== null && typeof data === "object" ? data : null;
  } catch {
    console.warn(`Ignored a "${event.type}" event whose data is not JSON.`);
    return null;
  }
}


function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

// ---------------------------------------------------------------------------------------------
// One row of the table.

class ConversationRow {
  /** The row's fields, as the firehose names them. */
  fields = {};

  constructor(id, onSelect) {
    this.id = id;
    this.root = createElement("tr", "conversation-row");
    this.root.dataset.conversation = id;
    this.root.tabIndex = 0;
    this.root.title = "Watch this conversation's answer";
    this.cells = {};
    for (const column of COLUMNS) {
      const cell = createElement("td");
      cell.dataset.col = column;
      if (!["conversation", "status", "model"].includes(column)) cell.className = "number";
      this.cells[column] = cell;
      this.root.append(cell);
    }
    this.cells.conversation.append(createElement("code", "", id));
    this.root.addEventListener("click", () => onSelect(id));
    this.root.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        onSelect(id);
      }
    });
  }

  /** Sets the fields of `data` among `names` that it has. */
  update(data, names = ROW_FIELDS) {
    for (const name of names) if (Object.hasOwn(data, name)) this.fields[name] = data[name];
  }

  /** @param {number} now the server's time (unix seconds) for the age */
  render(now) {
    const f = this.fields;
    const status = typeof f.status === "string" ? f.status : "streaming";
    this.root.dataset.status = status;
    const code = f.error?.code;
    setText(this.cells.status, status === "error" && typeof code === "string" ? `error: ${code}` : status);
    this.cells.status.title = typeof f.error?.message === "string" ? f.error.message : "";
    setText(this.cells.model, typeof f.model === "string" ? f.model : "");
    setText(this.cells.subscribers, formatCount(f.subscribers));
    setText(this.cells.chunks, formatCount(f.chunks));
    setText(this.cells.tokens, `${f.tokens_estimated === true ? "~" : ""}${formatCount(f.tokens)}`);
    setText(this.cells.tokens_per_second, formatRate(f.tokens_per_second));
    setText(this.cells.ttft, formatSeconds(f.ttft_seconds));
    setText(this.cells.age, isNumber(f.created_at) ? formatAge(now - f.created_at) : "–");
  }
}

// ---------------------------------------------------------------------------------------------
// The inline pane: one conversation's answer (choice 0 of every turn), as text.

class WatchPane {
  /** @type {EventStreamReader | null} */
  stream = null;
  /** @type {string | null} */
  conversationId = null;
  /** @type {Map<number, {text: string, status: string}>} */
  turns = new Map();

  constructor(apiKey) {
    const byId = (id) => document.getElementById(id);
    this.apiKey = apiKey;
    this.root = byId("watch-pane");
    this.idLabel = byId("watch-id");
    this.status = byId("watch-status");
    this.openLink = byId("watch-open");
    this.turnsElement = byId("watch-turns");
    byId("watch-close").addEventListener("click", () => this.close());
  }

  open(conversationId) {
    if (conversationId === this.conversationId) return;
    this.close();
    this.conversationId = conversationId;
    this.root.hidden = false;
    this.root.dataset.conversation = conversationId;
    this.idLabel.textContent = conversationId;
    this.openLink.href = `/?c=${encodeURIComponent(conversationId)}`;
    this.setStatus("connecting", "connecting…");
    // With an API key, the multiplexed stream (a key stands in for watch tokens there);
    // else the conversation's own stream. Both replay from the start, then follow it live.
    const id = encodeURIComponent(conversationId);
    const url = this.apiKey() ? `/v1/events?conversations=${id}` : `/v1/conversations/${id}/events`;
    this.stream = new EventStreamReader(url, {
      headers: authHeaders(this.apiKey()),
      onOpen: () => this.setStatus("live", "live"),
      onDrop: () => this.setStatus("reconnecting", "reconnecting…"),
      onRefused: (error) => this.setStatus("ended", `cannot watch: ${error.message}`),
      onEvent: (event) => this.apply(event),
    }).start();
  }

  apply(event) {
    const data = parseData(event);
    if (data === null) return;
    const turnNumber = Number.isInteger(data.turn) ? data.turn : null;
    switch (event.type) {
      case "turn":
        if (turnNumber !== null) this.turn(turnNumber).status = "streaming";
        break;
      case "answer":
        if (turnNumber !== null && data.choice === 0 && typeof data.content === "string") {
          this.turn(turnNumber).text += data.content;
        }
        break;
      case "done":
        if (turnNumber !== null) this.turn(turnNumber).status = "done";
        break;
      case "error":
        if (turnNumber !== null) this.turn(turnNumber).status = data.code === "cancelled" ? "cancelled" : `error: ${data.code}`;
        break;
      case "snapshot":
        this.turns.clear();
        for (const turnData of Array.isArray(data.turns) ? data.turns : []) {
          if (!Number.isInteger(turnData?.turn)) continue;
          const choices = Array.isArray(turnData.choices) ? turnData.choices : [];
          const choice = choices.find((c) => c?.choice === 0);
          this.turns.set(turnData.turn, {
            text: typeof choice?.content === "string" ? choice.content : "",
            status: typeof turnData.status === "string" ? turnData.status : "done",
          });
        }
        break;
      case "end":
      case "conversation_end":
        this.stream?.close();
        this.setStatus("ended", `ended: ${typeof data.reason === "string" ? data.reason : "unknown"}`);
        break;
      default:
        return;
    }
    this.render();
  }

  turn(number) {
    let turn = this.turns.get(number);
    if (turn === undefined) {
      turn = { text: "", status: "streaming" };
      this.turns.set(number, turn);
    }
    return turn;
  }

  render() {
    const numbers = [...this.turns.keys()].sort((a, b) => a - b);
    while (this.turnsElement.children.length > numbers.length) this.turnsElement.lastElementChild.remove();
    numbers.forEach((number, index) => {
      const turn = this.turns.get(number);
      let element = this.turnsElement.children[index];
      if (element === undefined) {
        element = createElement("div", "watch-turn");
        element.append(createElement("p", "watch-turn-meta"), createElement("div", "watch-answer"));
        this.turnsElement.append(element);
      }
      element.dataset.turn = String(number);
      element.dataset.status = turn.status;
      setText(element.firstElementChild, `Turn ${number} · ${turn.status}`);
      setText(element.lastElementChild, turn.text);
    });
  }

  setStatus(state, text) {
    this.status.dataset.state = state;
    this.status.textContent = text;
  }

  close() {
    this.stream?.close();
    this.stream = null;
    this.conversationId = null;
    this.turns.clear();
    this.turnsElement.replaceChildren();
    this.root.hidden = true;
    delete this.root.dataset.conversation;
  }
}

// ---------------------------------------------------------------------------------------------
// The dashboard: the firehose, the table, the totals.

class Dashboard {
  /** @type {Map<string, ConversationRow>} */
  rows = new Map();
  /** @type {EventStreamReader | null} */
  stream = null;
  /** The latest `stats` totals (null before the first). */
  totals = null;
  /** The server's clock at the latest `stats` (unix seconds), for ages. */
  serverTime = null;
  /** The server's clock minus ours, from the latest `stats`. */
  clockOffset = 0;
  statsReceived = 0;
  connections = 0;
  /** @type {string | null} */
  selected = null;

  constructor() {
    const byId = (id) => document.getElementById(id);
    this.status = byId("status");
    this.updated = byId("updated");
    this.connectionNote = byId("connection-note");
    this.error = byId("dashboard-error");
    this.keyForm = byId("api-key-form");
    this.keyInput = byId("api-key");
    this.tbody = byId("conversation-rows");
    this.empty = byId("no-conversations");
    this.totalElements = {
      live: byId("total-live"),
      subscribers: byId("total-subscribers"),
      eventsPerSecond: byId("total-events-per-second"),
      held: byId("total-conversations"),
      deliveriesPerSecond: byId("total-deliveries-per-second"),
      dashboards: byId("total-dashboards"),
    };
    this.pane = new WatchPane(() => storedApiKey());
  }

  start() {
    this.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      storeApiKey(this.keyInput.value.trim());
      this.keyForm.hidden = true;
      this.openFirehose();
    });
    // Ages move on between two `stats` events.
    window.setInterval(() => this.renderRows(), 1000);
    this.openFirehose();
  }

  openFirehose() {
    this.stream?.close();
    this.showError("");
    this.setStatus("connecting", "connecting…");
    this.stream = new EventStreamReader(FIREHOSE_URL, {
      headers: authHeaders(storedApiKey()),
      onOpen: () => this.onOpen(),
      onDrop: () => this.onDrop(),
      onRefused: (error) => this.onRefused(error),
      onEvent: (event) => this.apply(event),
    }).start();
  }

  onOpen() {
    this.connections += 1;
    this.setStatus("live", "live");
    if (this.connections > 1) {
      this.status.dataset.reconnects = String(this.connections - 1);
      const after = this.stream?.parser.lastEventId;
      this.setConnectionNote(after ? `resumed after event ${after}` : "reconnected");
    }
  }

  onDrop() {
    this.setStatus("reconnecting", "reconnecting…");
    this.setConnectionNote("connection lost");
  }

  onRefused(error) {
    this.setStatus("disconnected", "disconnected");
    if (error.status === 401) {
      this.keyForm.hidden = false;
      this.keyInput.focus();
      this.showError(storedApiKey() ? "The API key was refused." : "The firehose needs an API key: enter it.");
    } else {
      this.showError(`The firehose stream was refused: ${error.message}`);
    }
  }

  apply(event) {
    const data = parseData(event);
    if (data === null) return;
    const id = typeof data.conversation === "string" ? data.conversation : null;
    switch (event.type) {
      case "snapshot":
        this.replaceTable(Array.isArray(data.conversations) ? data.conversations : []);
        if (data.totals && typeof data.totals === "object") this.totals = data.totals;
        break;
      case "created":
        if (id !== null) this.row(id).update({ ...data, status: "streaming" });
        break;
      case "turn_started":
        if (id !== null) {
          this.row(id).update({
            status: "streaming", turn: data.turn, model: data.model, chunks: 0, tokens: 0,
            tokens_estimated: null, tokens_per_second: null, ttft_seconds: null,
            duration_seconds: null, finish_reason: null, error: null,
          });
        }
        break;
      case "first_token":
        if (id !== null) this.row(id).update(data, ["ttft_seconds"]);
        break;
      case "turn_done":
        if (id !== null) this.row(id).update({ ...pick(data, TURN_END_FIELDS), status: "done" });
        break;
      case "turn_error":
        if (id !== null) {
          const cancelled = data.code === "cancelled";
          this.row(id).update({
            ...pick(data, TURN_END_FIELDS),
            status: cancelled ? "cancelled" : "error",
            error: { code: String(data.code ?? "error"), message: String(data.message ?? "") },
          });
        }
        break;
      case "conversation_ended":
        if (id !== null) this.removeRow(id);
        break;
      case "stats":
        this.applyStats(data);
        break;
      case "end":
        // Shutdown: the reader reconnects after the retry hint, to the next server up.
        this.setConnectionNote(`server: ${typeof data.reason === "string" ? data.reason : "end"}`);
        break;
      default:
        return;
    }
    this.render();
  }

  /** A `stats` event: the rows that changed, the totals, the server's clock. */
  applyStats(data) {
    for (const partial of Array.isArray(data.conversations) ? data.conversations : []) {
      // Rows for conversations not in the table are ignored: `created` adds rows.
      const row = this.rows.get(partial?.conversation);
      if (row !== undefined) row.update(partial);
    }
    if (data.totals && typeof data.totals === "object") this.totals = data.totals;
    if (isNumber(data.time)) this.clockOffset = data.time - Date.now() / 1000;
    this.statsReceived += 1;
    this.updated.dataset.stats = String(this.statsReceived);
    setText(this.updated, `updated ${new Date().toLocaleTimeString()}`);
  }

  replaceTable(rows) {
    for (const id of [...this.rows.keys()]) this.removeRow(id);
    const sorted = rows.filter((r) => typeof r?.conversation === "string")
      .sort((a, b) => (a.created_at ?? 0) - (b.created_at ?? 0));
    for (const data of sorted) this.row(data.conversation).update(data);
  }

  row(id) {
    let row = this.rows.get(id);
    if (row === undefined) {
      row = new ConversationRow(id, (selected) => this.select(selected));
      this.rows.set(id, row);
      // Newest first.
      this.tbody.prepend(row.root);
      row.root.classList.toggle("selected", id === this.selected);
    }
    return row;
  }

  removeRow(id) {
    const row = this.rows.get(id);
    if (row === undefined) return;
    row.root.remove();
    this.rows.delete(id);
  }

  select(id) {
    this.selected = id;
    for (const row of this.rows.values()) row.root.classList.toggle("selected", row.id === id);
    this.pane.open(id);
  }

  render() {
    this.renderRows();
    this.renderTotals();
  }

  renderRows() {
    const now = Date.now() / 1000 + this.clockOffset;
    for (const row of this.rows.values()) row.render(now);
    this.empty.hidden = this.rows.size > 0;
  }

  renderTotals() {
    // Live and held from the table itself, so they agree with it between two `stats`.
    let live = 0;
    for (const row of this.rows.values()) if (row.fields.status === "streaming") live += 1;
    const totals = this.totals ?? {};
    setText(this.totalElements.live, String(live));
    setText(this.totalElements.held, String(this.rows.size));
    setText(this.totalElements.subscribers, formatCount(totals.subscribers));
    setText(this.totalElements.eventsPerSecond, formatRate(totals.events_per_second));
    setText(this.totalElements.deliveriesPerSecond, formatRate(totals.deliveries_per_second));
    setText(this.totalElements.dashboards, formatCount(totals.firehose_subscribers));
  }

  setStatus(state, text) {
    this.status.dataset.state = state;
    this.status.textContent = text;
  }

  setConnectionNote(text) {
    this.connectionNote.textContent = text;
    this.connectionNote.hidden = text === "";
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = message === "";
  }
}

function pick(data, names) {
  const picked = {};
  for (const name of names) if (Object.hasOwn(data, name)) picked[name] = data[name];
  return picked;
}

new Dashboard().start();
