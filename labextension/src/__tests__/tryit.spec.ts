/**
 * Try it's request from a form, and the response as the card shows it: the same cases as
 * the kernel's card (tests/test_try_it.py), with parameters as the server describes them.
 */

import { Parameter } from '../events';
import { localTime } from '../format';
import { LineSplitter, SseEvent, SseParser } from '../sse';
import { MAX_ITEMS, ResponseReader, buildRequest, initialText, initialValue, kindOf, placeholder, queryString } from '../tryit';

// describe_parameters(hello) for
// def hello(name: str, times: int = 1, loud: bool = False, tags: list[str] = ["a", "b"], note: str | None = None)
const HELLO: Parameter[] = [
  { name: 'name', type: 'str', required: true },
  { name: 'times', type: 'int', required: false, default: 1 },
  { name: 'loud', type: 'bool', required: false, default: false },
  { name: 'tags', type: 'list', item: 'str', required: false, default: "['a', 'b']" },
  { name: 'note', type: 'str', optional: true, required: false, default: null }
];

const encode = (text: string): Uint8Array => new TextEncoder().encode(text);

describe('the form', () => {
  const start: Record<string, string | boolean> = {
    ...Object.fromEntries(HELLO.map(p => [p.name, initialValue(p)])),
    name: 'Ada'
  };

  it('starts from the defaults, as one would type them', () => {
    expect(HELLO.map(initialText)).toEqual(['', '1', 'false', 'a, b', '']);
    expect(initialValue(HELLO[2])).toBe(false); // a checkbox
    expect(HELLO.map(placeholder)).toEqual(['required', '', '', 'comma-separated, or a JSON array', 'None']);
  });

  it('sends what was changed and leaves the defaults to the function', () => {
    expect(buildRequest(HELLO, start)).toEqual({ method: 'GET', query: [['name', 'Ada']], body: null });
    const changed = { ...start, times: '3', loud: true, tags: 'x, y ,z', note: 'hi' };
    expect(buildRequest(HELLO, changed).query).toEqual([
      ['name', 'Ada'],
      ['times', '3'],
      ['loud', 'true'],
      ['tags', 'x'],
      ['tags', 'y'],
      ['tags', 'z'],
      ['note', 'hi']
    ]);
    expect(buildRequest(HELLO, { ...start, tags: '["x", "y"]' }).query[1]).toEqual(['tags', '["x", "y"]']);
    // required and empty: sent, so that the server says what is missing
    expect(buildRequest(HELLO, { ...start, name: '' }).query).toEqual([['name', '']]);
    expect(queryString(buildRequest(HELLO, { ...start, times: '3' }).query)).toBe('?name=Ada&times=3');
    expect(queryString([])).toBe('');
  });

  it('POSTs a parameter that takes the JSON body, and names a field whose JSON does not parse', () => {
    const goodbye: Parameter[] = [
      { name: 'data', type: 'object', required: true },
      { name: 'loud', type: 'bool', required: false, default: false }
    ];
    expect(buildRequest(goodbye, { data: '{"name": "Ada"}', loud: true })).toEqual({
      method: 'POST',
      query: [['loud', 'true']],
      body: '{"name":"Ada"}'
    });
    expect(() => buildRequest(goodbye, { data: '{nope', loud: false })).toThrow(/^data: not valid JSON/);
  });

  it('leaves out a Request parameter, and an optional bool left at its default', () => {
    const p: Parameter[] = [
      { name: 'request', type: 'request', required: false },
      { name: 'flag', type: 'bool', optional: true, required: false, default: null }
    ];
    expect(buildRequest(p, { flag: '' })).toEqual({ method: 'GET', query: [], body: null });
    expect(buildRequest(p, { flag: 'false' }).query).toEqual([['flag', 'false']]);
  });
});

describe('the response', () => {
  it('parses server-sent events into their fields, across chunk boundaries', () => {
    const reader = new ResponseReader('text/event-stream; charset=utf-8');
    const body =
      ': keep-alive\n\nevent: greet\nid: 7\ndata: first line\ndata: second line\n\ndata: plain\n\n' +
      'event: error\ndata: {"error": {"type": "ValueError", "message": "bad n", "traceback": "Traceback:\\n  line 1\\n"}}\n\n' +
      'data: no blank line at the end';
    for (let i = 0; i < body.length; i += 7) {
      reader.push(encode(body.slice(i, i + 7)));
    }
    reader.end();
    const shown = reader.shown();
    expect(shown).toEqual({
      kind: 'table',
      rowClass: 'jupyter-stream-event',
      columns: ['event', 'id', 'data'],
      rows: [
        ['greet', '7', 'first line\nsecond line'],
        ['message', '', 'plain'],
        ['error', '', 'error: ValueError: bad n\nTraceback:\n  line 1'],
        ['message', '', 'no blank line at the end']
      ]
    });
    expect(reader.summary()).toBe('4 events');
  });

  it('shows NDJSON rows as a table of their keys, keeping the latest MAX_ITEMS', () => {
    const reader = new ResponseReader('application/x-ndjson');
    for (let i = 0; i < MAX_ITEMS + 10; i++) {
      reader.push(encode(JSON.stringify(i === 0 ? { i } : { i, square: i * i }) + '\n'));
    }
    reader.end();
    const shown = reader.shown();
    expect(shown.kind).toBe('table');
    if (shown.kind === 'table') {
      expect(shown.columns).toEqual(['i', 'square']);
      expect(shown.rows).toHaveLength(MAX_ITEMS);
      expect(shown.rows[0]).toEqual(['10', '100']);
    }
    expect(reader.earlier).toBe(10);
    expect(reader.summary()).toBe('50 rows');
  });

  it('lays out JSON, shows text as lines and counts bytes', () => {
    const json = new ResponseReader('application/json');
    json.push(encode('{"y": [1, 2]}'));
    json.end();
    expect(json.shown()).toEqual({ kind: 'text', text: '{\n  "y": [\n    1,\n    2\n  ]\n}' });
    const text = new ResponseReader('text/plain');
    text.push(encode('one\r\ntwo\nthree'));
    text.end();
    expect(text.shown()).toEqual({ kind: 'text', text: 'one\ntwo\nthree' });
    expect(text.summary()).toBe('3 lines');
    const bin = new ResponseReader('image/png');
    bin.push(new Uint8Array(1500));
    bin.end();
    expect(bin.shown()).toEqual({ kind: 'bytes', bytes: 1500 });
    expect(bin.summary()).toBe('1,500 bytes');
  });

  it('knows the kinds by media type', () => {
    expect(['text/event-stream', 'application/x-ndjson', 'application/problem+json', 'text/csv', 'audio/wav'].map(kindOf)).toEqual([
      'sse',
      'ndjson',
      'json',
      'text',
      'bytes'
    ]);
  });
});

describe('the SSE parser', () => {
  it('keeps the last id as EventSource does, and counts comments', () => {
    const seen: SseEvent[] = [];
    const parser = new SseParser(e => seen.push(e));
    parser.feed('id: 1\ndata: a\n\n: keep-alive\n\ndata:b\r');
    parser.feed('\n\r\nevent: x\ndata\n\n');
    expect(seen).toEqual([
      { event: 'message', id: '1', data: 'a' },
      { event: 'message', id: '', data: 'b' },
      { event: 'x', id: '', data: '' }
    ]);
    expect(parser.lastEventId).toBe('1');
    expect(parser.comments).toBe(1);
  });

  it('splits lines on CR, LF and CRLF, even when a CRLF is split between chunks', () => {
    const lines = new LineSplitter();
    expect(lines.feed('a\rb\r')).toEqual(['a']);
    expect(lines.feed('\nc\n')).toEqual(['b', 'c']);
    expect(lines.feed('d')).toEqual([]);
    expect(lines.end()).toEqual(['d']);
  });
});

describe('times', () => {
  it('reads as on the demo page: local time with its zone, the day when not today', () => {
    const now = new Date(2026, 4, 17, 12, 0, 0);
    const t = new Date(2026, 4, 17, 14, 5, 0).getTime() / 1000;
    expect(localTime(t, false, now)).toMatch(/^14:05 UTC([+-]\d+(:\d\d)?)?$/);
    expect(localTime(t + 86400, false, now)).toMatch(/^May 18, 14:05 UTC/);
    expect(localTime(t, true, now)).toMatch(/^2026-05-17 14:05:00 UTC/);
  });
});
