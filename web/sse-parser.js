/**
 * The WHATWG event-stream parser, for pages that read Server-Sent Events with fetch() (to
 * send headers an EventSource cannot). Pure: text in, events out; no I/O, no DOM. Fed text
 * as it arrives, split anywhere, with CR, LF or CRLF line ends; calls `onEvent({type, data,
 * id})` for each complete event and `onRetry(ms)` for a `retry:` field. Tested at every split
 * point and line ending in tests/browser/test_sse_parser.py.
 */

export class SseParser {
  buffer = "";
  /** A CR ended the last chunk: an LF starting the next one belongs to it. */
  pendingCr = false;
  eventType = "";
  data = [];
  /** The id of the last event dispatched: what a reconnect resumes after. */
  lastEventId = "";
  idBuffer = "";

  constructor(onEvent, onRetry) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
  }

  /** A new connection: whatever the old one left half-received is dropped. */
  reset() {
    this.buffer = "";
    this.pendingCr = false;
    this.eventType = "";
    this.data = [];
    this.idBuffer = this.lastEventId;
  }

  feed(text) {
    if (text === "") return;
    if (this.pendingCr && text.startsWith("\n")) text = text.slice(1);
    this.pendingCr = false;
    this.buffer += text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF split across chunks.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) this.pendingCr = true;
      this.line(this.buffer.slice(start, match.index));
      start = match.index + match[0].length;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.eventType = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.idBuffer = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.onRetry(Number(value));
  }

  dispatch() {
    // Only a complete event moves the position: a drop mid-event resumes before it.
    this.lastEventId = this.idBuffer;
    const type = this.eventType || "message";
    const data = this.data;
    this.eventType = "";
    this.data = [];
    if (data.length === 0) return;
    this.onEvent({ type, data: data.join("\n"), id: this.lastEventId });
  }
}
