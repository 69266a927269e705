/**
 * Reading a response as it arrives: lines (split on CR, LF or CRLF, even when a chunk
 * ends between the two), and server-sent events parsed from them the way a browser's
 * EventSource parses them (`event`, `id`, `data`, comments skipped). The Streams panel
 * reads the server's event stream with it; the card's "Try it" reads an endpoint's.
 */

export interface SseEvent {
  /** `message` when the event named no type */
  event: string;
  /** the event's own `id:` field, '' when it had none */
  id: string;
  data: string;
}

/** Text in, whole lines out (without their line breaks). */
export class LineSplitter {
  private buffer = '';

  /** The lines `text` completes. */
  feed(text: string): string[] {
    this.buffer += text;
    const lines: string[] = [];
    const re = /\r\n|\r|\n/g;
    let start = 0;
    let m: RegExpExecArray | null;
    while ((m = re.exec(this.buffer))) {
      if (m[0] === '\r' && m.index === this.buffer.length - 1) {
        break; // maybe the first half of a CRLF: wait for the next chunk
      }
      lines.push(this.buffer.slice(start, m.index));
      start = re.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return lines;
  }

  /** The last line, if the text did not end with a line break. */
  end(): string[] {
    const rest = this.buffer;
    this.buffer = '';
    return rest ? [rest.replace(/\r$/, '')] : [];
  }
}

export class SseParser {
  /** the last `id:` seen, as EventSource keeps it (for Last-Event-ID) */
  lastEventId = '';
  /** comments seen (`: keep-alive`) */
  comments = 0;
  private lines = new LineSplitter();
  private data: string[] = [];
  private type = '';
  private id = '';

  constructor(private readonly onEvent: (event: SseEvent) => void) {}

  feed(text: string): void {
    for (const line of this.lines.feed(text)) {
      this.line(line);
    }
  }

  /** The body ended: a last event without its blank line still counts. */
  end(): void {
    for (const line of this.lines.end()) {
      this.line(line);
    }
    this.dispatch();
  }

  private line(text: string): void {
    if (text === '') {
      this.dispatch();
      return;
    }
    if (text[0] === ':') {
      this.comments += 1;
      return;
    }
    const colon = text.indexOf(':');
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? '' : text.slice(colon + 1);
    if (value[0] === ' ') {
      value = value.slice(1);
    }
    if (field === 'data') {
      this.data.push(value);
    } else if (field === 'event') {
      this.type = value;
    } else if (field === 'id' && !value.includes('\0')) {
      this.id = value;
      this.lastEventId = value;
    }
  }

  private dispatch(): void {
    if (this.data.length) {
      this.onEvent({ event: this.type || 'message', id: this.id, data: this.data.join('\n') });
    }
    this.data = [];
    this.type = '';
    this.id = '';
  }
}
