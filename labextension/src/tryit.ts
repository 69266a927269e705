/**
 * The card's "Try it", apart from its view: the request a form makes from an endpoint's
 * parameters (as the demo page and the notebook's card make it: fields left as they
 * started are not sent, so the function's defaults apply; a parameter that takes a JSON
 * body is POSTed), and the response as a person reads it (`ResponseReader`): server-sent
 * events parsed into event, id and data, NDJSON as rows, JSON laid out, text as lines.
 */

import { Parameter } from './events';
import { LineSplitter, SseEvent, SseParser } from './sse';

/** Events, rows or lines of a tried response kept on the card (the latest). */
export const MAX_ITEMS = 40;

/** The parameters a person fills in (a `Request` parameter is the request itself). */
export function formParameters(parameters: Parameter[]): Parameter[] {
  return parameters.filter(p => p.type !== 'request');
}

/** How a field of parameter `p` is shown. */
export function fieldKind(p: Parameter): 'checkbox' | 'select' | 'json' | 'text' {
  if (p.type === 'bool') {
    return p.optional ? 'select' : 'checkbox';
  }
  return p.type === 'object' ? 'json' : 'text';
}

/** What a text field starts with: the parameter's default, as one would type it. */
export function initialText(p: Parameter): string {
  const value = p.default;
  if (value === undefined || value === null) {
    return '';
  }
  if (Array.isArray(value)) {
    return value.map(v => (typeof v === 'string' ? v : JSON.stringify(v))).join(', ');
  }
  if (p.type === 'list' && typeof value === 'string' && value.startsWith('[')) {
    try {
      const items = JSON.parse(value.replace(/'/g, '"')) as unknown[];
      return items.map(String).join(', ');
    } catch {
      return value;
    }
  }
  return String(value);
}

/** A field's placeholder: "required", "None" for a None default, how to write a list. */
export function placeholder(p: Parameter): string {
  if (p.type === 'list') {
    return 'comma-separated, or a JSON array';
  }
  if (p.type === 'object') {
    return 'a JSON object: the request body';
  }
  if (p.required) {
    return 'required';
  }
  return p.default === null || p.default === undefined ? 'None' : '';
}

/** A field's starting value: the text, or a checkbox's state, or '' (a select's "default"). */
export function initialValue(p: Parameter): string | boolean {
  const kind = fieldKind(p);
  if (kind === 'checkbox') {
    return p.default === true;
  }
  return kind === 'select' || kind === 'json' ? '' : initialText(p);
}

export interface TryRequest {
  method: 'GET' | 'POST';
  query: [string, string][];
  body: string | null;
}

/**
 * The request for the form's `values` (name -> its text, or a checkbox's state). Throws
 * an Error naming a field whose JSON does not parse.
 */
export function buildRequest(parameters: Parameter[], values: Record<string, string | boolean>): TryRequest {
  const query: [string, string][] = [];
  let body: unknown = undefined;
  for (const p of formParameters(parameters)) {
    const kind = p.type ?? 'any';
    const value = values[p.name];
    if (kind === 'bool') {
      if (typeof value === 'boolean') {
        if (p.required || value !== p.default) {
          query.push([p.name, value ? 'true' : 'false']);
        }
      } else if (value === 'true' || value === 'false') {
        query.push([p.name, value]); // an optional bool's select, set
      }
      continue;
    }
    const raw = typeof value === 'string' ? value : '';
    const text = raw.trim();
    if (!p.required && text === initialText(p).trim()) {
      continue; // as it started: the function's default applies
    }
    if (kind === 'object') {
      try {
        body = JSON.parse(text || 'null');
      } catch (e) {
        throw new Error(`${p.name}: not valid JSON (${e instanceof Error ? e.message : e})`);
      }
    } else if (kind === 'list') {
      const items = text.startsWith('[')
        ? [text]
        : text
            .split(',')
            .map(s => s.trim())
            .filter(s => s);
      for (const item of items.length ? items : ['[]']) {
        query.push([p.name, item]);
      }
    } else {
      query.push([p.name, kind === 'str' ? raw : text]);
    }
  }
  if (body === undefined) {
    return { method: 'GET', query, body: null };
  }
  return { method: 'POST', query, body: JSON.stringify(body) };
}

/** The query string of `query` ('' when empty), as the request line shows it. */
export function queryString(query: [string, string][]): string {
  return query.length ? '?' + new URLSearchParams(query).toString() : '';
}

/** How a response of `mediaType` is shown: sse, ndjson, json, text or bytes. */
export function kindOf(mediaType: string): 'sse' | 'ndjson' | 'json' | 'text' | 'bytes' {
  const base = mediaType.split(';')[0].trim().toLowerCase();
  if (base === 'text/event-stream') {
    return 'sse';
  }
  if (
    ['application/x-ndjson', 'application/ndjson', 'application/jsonl', 'application/x-jsonlines'].includes(base)
  ) {
    return 'ndjson';
  }
  if (base === 'application/json' || base.endsWith('+json')) {
    return 'json';
  }
  if (base.startsWith('text/') || base === 'application/xml' || base === 'application/javascript') {
    return 'text';
  }
  return 'bytes';
}

/**
 * An endpoint's error (`{"error": {...}}`, or jupyter-server's `{"message": ...}`) as
 * lines a person reads: the type and message, then the worker's traceback.
 */
export function readableError(text: string): string[] {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    return [text.slice(0, 2000)];
  }
  if (body === null || typeof body !== 'object') {
    return [text.slice(0, 2000)];
  }
  const { error, message } = body as { error?: unknown; message?: string };
  if (error !== null && typeof error === 'object') {
    const e = error as { type?: string; message?: string; traceback?: string | string[] };
    const traceback = Array.isArray(e.traceback) ? e.traceback.join('') : String(e.traceback ?? '');
    const lines = traceback.trimEnd() ? traceback.trimEnd().split('\n') : [];
    return [`error: ${e.type ?? 'Error'}: ${e.message ?? ''}`, ...lines];
  }
  return [`error: ${message || text.slice(0, 2000)}`];
}

/** A JSON value in a table cell: strings as they are, the rest as compact JSON. */
export function cell(value: unknown): string {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

export type Item =
  | { kind: 'event'; event: SseEvent }
  | { kind: 'row'; value: unknown }
  | { kind: 'line'; text: string };

/** What the card shows of a response: a table, a block of text, or a byte count. */
export type Shown =
  | { kind: 'table'; rowClass: string; columns: string[]; rows: string[][] }
  | { kind: 'text'; text: string }
  | { kind: 'bytes'; bytes: number };

/** A tried response as it arrives, parsed by its kind; `shown()` is what the card draws. */
export class ResponseReader {
  readonly kind: ReturnType<typeof kindOf>;
  /** items seen, including those no longer kept */
  count = 0;
  bytes = 0;
  items: Item[] = [];
  private decoder = new TextDecoder();
  private sse: SseParser;
  private lines = new LineSplitter();
  private document = '';

  constructor(mediaType: string) {
    this.kind = kindOf(mediaType);
    this.sse = new SseParser(event => this.keep({ kind: 'event', event }));
  }

  /** Bytes of the body, as they arrive. */
  push(chunk: Uint8Array): void {
    this.bytes += chunk.byteLength;
    if (this.kind !== 'bytes') {
      this.text(this.decoder.decode(chunk, { stream: true }));
    }
  }

  /** The body ended. */
  end(): void {
    if (this.kind === 'bytes') {
      return;
    }
    this.text(this.decoder.decode());
    if (this.kind === 'sse') {
      this.sse.end();
    } else {
      this.lines.end().forEach(line => this.line(line));
    }
  }

  private text(text: string): void {
    if (this.kind === 'sse') {
      this.sse.feed(text);
    } else {
      this.lines.feed(text).forEach(line => this.line(line));
    }
  }

  private line(line: string): void {
    if (this.kind === 'ndjson') {
      if (line.trim()) {
        try {
          this.keep({ kind: 'row', value: JSON.parse(line) });
        } catch {
          this.keep({ kind: 'line', text: line });
        }
      }
    } else if (this.kind === 'json') {
      this.document += line + '\n';
    } else {
      this.keep({ kind: 'line', text: line });
    }
  }

  private keep(item: Item): void {
    this.items.push(item);
    this.count += 1;
    if (this.items.length > MAX_ITEMS) {
      this.items.splice(0, this.items.length - MAX_ITEMS);
    }
  }

  /** "3 events", "12 rows", "5 lines", or "1,024 bytes". */
  summary(): string {
    const noun = { sse: 'event', ndjson: 'row', text: 'line' }[this.kind as string];
    if (noun === undefined) {
      return `${this.bytes.toLocaleString('en-US')} bytes`;
    }
    return `${this.count.toLocaleString('en-US')} ${noun}${this.count === 1 ? '' : 's'}`;
  }

  /** Items seen but no longer kept (only the latest MAX_ITEMS are). */
  get earlier(): number {
    return this.count - this.items.length;
  }

  shown(): Shown {
    if (this.kind === 'sse') {
      const rows = this.items.map(item => {
        const e = (item as { event: SseEvent }).event;
        const data = e.event === 'error' ? readableError(e.data).join('\n') : e.data;
        return [e.event, e.id, data];
      });
      return { kind: 'table', rowClass: 'jupyter-stream-event', columns: ['event', 'id', 'data'], rows };
    }
    if (this.kind === 'ndjson') {
      const objects = this.items.every(
        i => i.kind === 'row' && i.value !== null && typeof i.value === 'object' && !Array.isArray(i.value)
      );
      if (objects && this.items.length) {
        const values = this.items.map(i => (i as { value: Record<string, unknown> }).value);
        const columns = [...new Set(values.flatMap(v => Object.keys(v)))];
        const rows = values.map(v => columns.map(c => (c in v ? cell(v[c]) : '')));
        return { kind: 'table', rowClass: 'jupyter-stream-row', columns, rows };
      }
      const rows = this.items.map(i => [i.kind === 'row' ? cell(i.value) : (i as { text: string }).text]);
      return { kind: 'table', rowClass: 'jupyter-stream-row', columns: ['row'], rows };
    }
    if (this.kind === 'json') {
      let text = this.document.trimEnd();
      try {
        text = JSON.stringify(JSON.parse(text), null, 2);
      } catch {
        // shown as it came
      }
      return { kind: 'text', text: text.slice(0, 20000) };
    }
    if (this.kind === 'text') {
      return { kind: 'text', text: this.items.map(i => (i as { text: string }).text).join('\n') };
    }
    return { kind: 'bytes', bytes: this.bytes };
  }
}
