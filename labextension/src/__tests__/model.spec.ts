/**
 * The events -> model reducer, fed the recorded event stream (fixtures/events.sse) the
 * way the store feeds it: through the SSE parser and `toStreamEvent`.
 */

import * as fs from 'fs';
import * as path from 'path';

import { Snapshot, StreamEvent, toStreamEvent } from '../events';
import {
  EMPTY,
  StreamState,
  activeShares,
  callsOf,
  endpointStatus,
  groupFunctions,
  reduce,
  reduceAll,
  statusText,
  workerCounts
} from '../model';
import { SseParser } from '../sse';

/** The events of an SSE text, typed, fed in chunks of `chunk` characters. */
function parse(text: string, chunk = 97): StreamEvent[] {
  const events: StreamEvent[] = [];
  const parser = new SseParser(({ event, data }) => {
    const parsed = toStreamEvent(event, data);
    if (parsed) {
      events.push(parsed);
    }
  });
  for (let i = 0; i < text.length; i += chunk) {
    parser.feed(text.slice(i, i + chunk));
  }
  parser.end();
  return events;
}

const RECORDED = fs.readFileSync(path.join(__dirname, 'fixtures', 'events.sse'), 'utf-8');

function snapshot(over: Partial<Snapshot> = {}): StreamEvent {
  return {
    type: 'snapshot',
    data: { server: { id: 's1', version: '0.1.0' }, endpoints: [], functions: [], workers: {}, shares: [], calls: [], ...over }
  };
}

describe('the recorded event stream', () => {
  const events = parse(RECORDED);
  const state = reduceAll(EMPTY, events);

  it('parses every event, in order, whatever the chunking', () => {
    expect(events.map(e => e.type)).toEqual([
      'snapshot',
      'endpoint',
      'function',
      'function',
      'call',
      'endpoint',
      'workers',
      'call',
      'endpoint',
      'call',
      'call',
      'share',
      'function'
    ]);
    expect(parse(RECORDED, 1)).toEqual(events);
    expect(parse(RECORDED.replace(/\n/g, '\r\n'), 5)).toEqual(events);
  });

  it('ends with the endpoint, its latest stats, and what it was registered with', () => {
    expect(state.server).toEqual({ id: 'a3f1c2', version: '0.1.0' });
    expect(state.endpoints.map(e => e.name)).toEqual(['ticks']);
    const ticks = state.endpoints[0];
    expect(ticks.stats).toEqual({
      requests: 1,
      open_streams: 0,
      errors: 0,
      bytes_sent: 27,
      latency_p50: 0.0021,
      latency_p99: 0.0021
    });
    // a stats event carries only the stats: the rest is kept
    expect(ticks.owner).toBe('notebooks/quickstart.ipynb');
    expect(ticks.parameters).toEqual([{ name: 'n', type: 'int', required: false, default: 3 }]);
  });

  it('keeps functions, merging stats into what registration said', () => {
    const square = state.functions.find(f => f.name === 'square');
    expect(square?.stats).toEqual({ calls: 1, items: 40, failed: 1, retried: 2, stolen: 3 });
    expect(square?.requirements).toEqual({ gpu: 'H100', env: ['MODEL'] });
    expect(groupFunctions(state.functions)).toEqual([
      { cls: '', functions: [square] },
      { cls: 'LLM', functions: [state.functions.find(f => f.name === 'LLM.generate')] }
    ]);
  });

  it('follows calls from started through progress to ended', () => {
    expect(state.calls.map(c => c.id)).toEqual(['c-18']); // the request c-17 ended
    expect(callsOf(state, 'square')[0]).toMatchObject({ done: 40, total: 100, failed: 1, retried: 2, lanes: 2 });
    expect(callsOf(state, 'ticks')).toEqual([]);
  });

  it('replaces the workers whole, and counts the busy ones for the status bar', () => {
    expect(workerCounts(state.workers)).toEqual({ busy: 1, total: 2 });
    expect(statusText(state)).toBe('1 endpoint · 1/2 workers');
    expect(state.workers.gpus?.[0].held_by).toBe('worker-2');
  });

  it('lists the share as active', () => {
    expect(activeShares(state, 'ticks').map(s => s.id)).toEqual(['08162467051db7a5']);
  });
});

describe('each event kind', () => {
  const base = reduce(EMPTY, snapshot());

  it('endpoint: registered, stats, registered again (replaced), removed', () => {
    let s = reduce(base, {
      type: 'endpoint',
      data: { action: 'registered', endpoint: { name: 'a', media_type: 'text/plain', stats: { requests: 0, open_streams: 0, errors: 0 } } }
    });
    s = reduce(s, { type: 'endpoint', data: { action: 'stats', endpoint: { name: 'a', stats: { requests: 5, open_streams: 2, errors: 1 } } } });
    expect(s.endpoints).toEqual([{ name: 'a', media_type: 'text/plain', stats: { requests: 5, open_streams: 2, errors: 1 } }]);
    s = reduce(s, { type: 'endpoint', data: { action: 'registered', endpoint: { name: 'a', media_type: 'application/x-ndjson' } } });
    expect(s.endpoints).toEqual([{ name: 'a', media_type: 'application/x-ndjson' }]);
    const before = s;
    s = reduce(s, { type: 'endpoint', data: { action: 'removed', endpoint: { name: 'a' } } });
    expect(s.endpoints).toEqual([]);
    expect(before.endpoints).toHaveLength(1); // the old state is left as it was
  });

  it('function: registered, stats, removed', () => {
    let s = reduce(base, { type: 'function', data: { action: 'registered', function: { name: 'f', retries: 2 } } });
    s = reduce(s, { type: 'function', data: { action: 'stats', function: { name: 'f', stats: { calls: 1, items: 3, failed: 0, retried: 0 } } } });
    expect(s.functions).toEqual([{ name: 'f', retries: 2, stats: { calls: 1, items: 3, failed: 0, retried: 0 } }]);
    s = reduce(s, { type: 'function', data: { action: 'removed', function: { name: 'f' } } });
    expect(s.functions).toEqual([]);
  });

  it('workers: the whole JSON replaces the old one', () => {
    const s = reduce(base, { type: 'workers', data: { max_workers: 4, pools: [] } });
    expect(s.workers).toEqual({ max_workers: 4, pools: [] });
  });

  it('share: created (its links kept), revoked, forgotten', () => {
    let s = reduce(base, {
      type: 'share',
      data: { action: 'created', share: { id: 'x1', endpoint: 'a', state: 'active', url: 'u', demo_url: 'd', token: 't' } }
    });
    s = reduce(s, { type: 'share', data: { action: 'revoked', share: { id: 'x1', endpoint: 'a', state: 'revoked', revoked: 5 } } });
    expect(s.shares).toEqual([{ id: 'x1', endpoint: 'a', state: 'revoked', revoked: 5, url: 'u', demo_url: 'd', token: 't' }]);
    expect(activeShares(s, 'a')).toEqual([]);
    s = reduce(s, { type: 'share', data: { action: 'forgotten', share: { id: 'x1', endpoint: 'a' } } });
    expect(s.shares).toEqual([]);
  });

  it('call: started, progress, ended', () => {
    let s = reduce(base, { type: 'call', data: { action: 'started', call: { id: 'c', kind: 'map', function: 'f', started: 1, total: null } } });
    s = reduce(s, { type: 'call', data: { action: 'progress', call: { id: 'c', kind: 'map', function: 'f', started: 1, done: 7 } } });
    expect(s.calls).toEqual([{ id: 'c', kind: 'map', function: 'f', started: 1, total: null, done: 7 }]);
    s = reduce(s, { type: 'call', data: { action: 'ended', call: { id: 'c', kind: 'map', function: 'f', started: 1 } } });
    expect(s.calls).toEqual([]);
  });

  it('ignores events of kinds it does not know, and data that is not JSON', () => {
    expect(toStreamEvent('metrics', '{}')).toBeNull();
    expect(toStreamEvent('endpoint', '{not json')).toBeNull();
    expect(toStreamEvent('endpoint', '42')).toBeNull();
  });
});

describe('a reconnect', () => {
  it('starts over from the fresh snapshot: after a server restart nothing old is kept', () => {
    let s: StreamState = reduceAll(EMPTY, parse(RECORDED));
    expect(s.calls).toHaveLength(1);
    s = { ...s, connection: 'connecting' }; // the stream ended; the store reconnects
    s = reduce(
      s,
      snapshot({
        server: { id: 'b7e9d0', version: '0.1.0' },
        endpoints: [{ name: 'persisted', stats: { requests: 0, open_streams: 0, errors: 0 } }]
      })
    );
    expect(s.server?.id).toBe('b7e9d0');
    expect(s.endpoints.map(e => e.name)).toEqual(['persisted']);
    expect(s.functions).toEqual([]);
    expect(s.calls).toEqual([]);
    expect(s.shares).toEqual([]);
    expect(s.workers).toEqual({});
    expect(s.connection).toBe('connecting'); // the store, not the reducer, says it is live
    expect(endpointStatus(s, 'ticks')).toEqual({ status: 'removed' });
  });
});

describe('a card asking after its endpoint', () => {
  it('is unknown before the first snapshot, live while registered, removed after', () => {
    expect(endpointStatus(EMPTY, 'ticks')).toEqual({ status: 'unknown' });
    let s = reduceAll(EMPTY, parse(RECORDED));
    expect(endpointStatus(s, 'ticks')).toMatchObject({ status: 'live', endpoint: { name: 'ticks' } });
    s = reduce(s, { type: 'endpoint', data: { action: 'removed', endpoint: { name: 'ticks' } } });
    expect(endpointStatus(s, 'ticks')).toEqual({ status: 'removed' });
    expect(statusText(s)).toBe('0 endpoints · 1/2 workers');
  });
});
