/**
 * The server's state as the panel, the status bar, the cards and the Running panel
 * show it, and the reducer that keeps it: `reduce(state, event)` returns a new state
 * for each event of the server's stream (`events.ts`), never changing the old one, so
 * that a view can tell what changed by identity.
 */

import {
  Call,
  Endpoint,
  Share,
  StreamEvent,
  StreamFunction,
  Workers
} from './events';

/**
 * How the state is kept current:
 * - `connecting`: no snapshot yet (or reconnecting after one: the data is the last seen);
 * - `live`: the event stream is open;
 * - `polling`: the server has no event stream (an older jupyter-stream): read every few s;
 * - `offline`: the server cannot be reached; retrying with backoff.
 */
export type Connection = 'connecting' | 'live' | 'polling' | 'offline';

export interface StreamState {
  connection: Connection;
  /** why the last connection failed, for the panel's status line */
  problem: string;
  /** null until the first snapshot */
  server: { id: string; version: string } | null;
  endpoints: Endpoint[];
  functions: StreamFunction[];
  workers: Workers;
  shares: Share[];
  calls: Call[];
}

export const EMPTY: StreamState = {
  connection: 'connecting',
  problem: '',
  server: null,
  endpoints: [],
  functions: [],
  workers: {},
  shares: [],
  calls: []
};

/** `items` with `item` in place of the one of the same key (or added at the end). */
function upsert<T>(items: T[], item: T, key: (t: T) => string): T[] {
  const k = key(item);
  const index = items.findIndex(i => key(i) === k);
  if (index < 0) {
    return [...items, item];
  }
  const copy = items.slice();
  copy[index] = item;
  return copy;
}

function without<T>(items: T[], k: string, key: (t: T) => string): T[] {
  return items.filter(i => key(i) !== k);
}

const byName = (x: { name: string }): string => x.name;
const byId = (x: { id: string }): string => x.id;

/** The state after `event`. */
export function reduce(state: StreamState, event: StreamEvent): StreamState {
  switch (event.type) {
    case 'snapshot': {
      // everything anew: after a server restart nothing of the old state is true
      const s = event.data;
      return {
        ...state,
        server: s.server,
        endpoints: s.endpoints ?? [],
        functions: s.functions ?? [],
        workers: s.workers ?? {},
        shares: s.shares ?? [],
        calls: s.calls ?? []
      };
    }
    case 'endpoint': {
      const { action, endpoint } = event.data;
      if (action === 'removed') {
        return {
          ...state,
          endpoints: without(state.endpoints, endpoint.name, byName)
        };
      }
      const old = state.endpoints.find(e => e.name === endpoint.name);
      // a re-registration replaces the endpoint; stats update what is known of it
      const merged = action === 'stats' && old ? { ...old, ...endpoint } : endpoint;
      return { ...state, endpoints: upsert(state.endpoints, merged, byName) };
    }
    case 'function': {
      const { action, function: fn } = event.data;
      if (action === 'removed') {
        return { ...state, functions: without(state.functions, fn.name, byName) };
      }
      const old = state.functions.find(f => f.name === fn.name);
      const merged = action === 'stats' && old ? { ...old, ...fn } : fn;
      return { ...state, functions: upsert(state.functions, merged, byName) };
    }
    case 'workers':
      return { ...state, workers: event.data };
    case 'share': {
      const { action, share } = event.data;
      if (action === 'forgotten') {
        return { ...state, shares: without(state.shares, share.id, byId) };
      }
      const old = state.shares.find(s => s.id === share.id);
      // keep the links of a share made here: the server sends its token only once
      return { ...state, shares: upsert(state.shares, { ...old, ...share }, byId) };
    }
    case 'call': {
      const { action, call } = event.data;
      if (action === 'ended') {
        return { ...state, calls: without(state.calls, call.id, byId) };
      }
      const old = state.calls.find(c => c.id === call.id);
      return { ...state, calls: upsert(state.calls, { ...old, ...call }, byId) };
    }
  }
  return state;
}

/** `reduce` over several events. */
export function reduceAll(state: StreamState, events: StreamEvent[]): StreamState {
  return events.reduce(reduce, state);
}

/** What a card knows of its endpoint: not yet known, there, or removed from the server. */
export function endpointStatus(
  state: StreamState,
  name: string
): { status: 'unknown' } | { status: 'live'; endpoint: Endpoint } | { status: 'removed' } {
  const endpoint = state.endpoints.find(e => e.name === name);
  if (endpoint) {
    return { status: 'live', endpoint };
  }
  return state.server === null ? { status: 'unknown' } : { status: 'removed' };
}

export interface FunctionGroup {
  /** the class's name, or '' for plain functions */
  cls: string;
  functions: StreamFunction[];
}

/**
 * Functions grouped by class: `LLM.generate` is method `generate` of class `LLM`
 * (an instance's, `LLM-3f2a.generate`, groups under `LLM-3f2a`); plain functions come
 * first, in a group of their own.
 */
export function groupFunctions(functions: StreamFunction[]): FunctionGroup[] {
  const plain: StreamFunction[] = [];
  const classes = new Map<string, StreamFunction[]>();
  for (const fn of functions) {
    const dot = fn.name.indexOf('.');
    if (dot < 0) {
      plain.push(fn);
    } else {
      const cls = fn.name.slice(0, dot);
      classes.set(cls, [...(classes.get(cls) ?? []), fn]);
    }
  }
  const groups: FunctionGroup[] = plain.length ? [{ cls: '', functions: plain }] : [];
  for (const cls of [...classes.keys()].sort()) {
    groups.push({ cls, functions: classes.get(cls) ?? [] });
  }
  return groups;
}

/** The method's own name: `generate` of `LLM.generate`. */
export function methodName(name: string): string {
  const dot = name.indexOf('.');
  return dot < 0 ? name : name.slice(dot + 1);
}

/** Live workers, and how many of them run a call now. */
export function workerCounts(workers: Workers): { busy: number; total: number } {
  const all = (workers.pools ?? []).flatMap(p => p.workers);
  const alive = (all.length ? all : workers.workers ?? []).filter(w => w.alive !== false);
  return {
    busy: alive.filter(w => w.state === 'busy' || (w.busy ?? 0) > 0).length,
    total: alive.length
  };
}

/** The status bar's words: "2 endpoints · 1/3 workers". */
export function statusText(state: StreamState): string {
  const n = state.endpoints.length;
  const { busy, total } = workerCounts(state.workers);
  return `${n} endpoint${n === 1 ? '' : 's'} · ${busy}/${total} workers`;
}

/** The calls running for a function (or an endpoint's requests), newest first. */
export function callsOf(state: StreamState, name: string): Call[] {
  return state.calls
    .filter(c => c.function === name)
    .sort((a, b) => b.started - a.started);
}

/** An endpoint's share links that still work. */
export function activeShares(state: StreamState, endpoint: string): Share[] {
  return state.shares.filter(
    s => s.endpoint === endpoint && (s.state ?? 'active') === 'active'
  );
}
