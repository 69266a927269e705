/**
 * The server's event stream, as types: `GET {base_url}api/stream/events` (server-sent
 * events behind Jupyter's auth). This module is the one place that says what the
 * server sends; `model.ts` turns these events into the state the panel shows.
 *
 * Each event has `id: <n>`, `event: <type>` and `data: <JSON>`; a `: keep-alive`
 * comment comes every 15 s. `snapshot` comes first, and again on every reconnect.
 * Times are epoch seconds.
 */

/** What an endpoint or function asks of its workers (env: names only). */
export interface Requirements {
  gpu?: string | string[] | null;
  env?: string[];
  concurrency?: number | null;
  min_workers?: number | null;
  max_workers?: number | null;
  scaledown_window?: number | null;
  kernel?: string | null;
}

/** One parameter of an endpoint's signature, as the demo page and the card read it. */
export interface Parameter {
  name: string;
  /** int, float, bool, str, list, object, request, any */
  type?: string;
  /** a list's item type */
  item?: string;
  required?: boolean;
  optional?: boolean;
  default?: unknown;
  /** an object parameter's fields (a dataclass or model taking the whole body) */
  fields?: { name: string; type?: string }[];
}

export interface EndpointStats {
  requests: number;
  open_streams: number;
  errors: number;
  bytes_sent?: number;
  /** seconds, or null before the first request */
  latency_p50?: number | null;
  latency_p99?: number | null;
}

export interface Endpoint {
  name: string;
  doc?: string;
  url?: string;
  path?: string;
  media_type?: string;
  media_type_declared?: boolean;
  owner?: string;
  created?: number;
  persist?: boolean;
  openai?: boolean;
  queue_timeout?: number | null;
  parameters?: Parameter[];
  requirements?: Requirements;
  stats?: EndpointStats;
}

export interface FunctionStats {
  calls: number;
  items: number;
  failed: number;
  retried: number;
  stolen?: number;
}

export interface StreamFunction {
  name: string;
  doc?: string;
  owner?: string;
  created?: number;
  generator?: boolean;
  retries?: number;
  timeout?: number | null;
  queue_timeout?: number | null;
  requirements?: Requirements;
  stats?: FunctionStats;
}

export interface WorkerGpu {
  index: number;
  name: string;
  uuid?: string;
  memory_total?: number | null;
  memory_used?: number | null;
}

export interface Worker {
  name: string;
  pid?: number | null;
  alive?: boolean;
  state?: 'idle' | 'busy' | 'draining';
  busy?: number;
  unresponsive?: boolean;
  /** bytes */
  rss?: number | null;
  gpus?: WorkerGpu[];
  kernel?: string;
}

export interface Pool {
  name: string;
  kernel_name?: string;
  gpu?: string | string[] | null;
  env?: string[];
  concurrency?: number | null;
  min_workers?: number;
  max_workers?: number;
  calls_per_worker?: number;
  waiting_calls?: number;
  functions?: string[];
  endpoints?: string[];
  workers: Worker[];
}

export interface Gpu {
  index: number;
  name: string;
  uuid?: string;
  memory_total?: number | null;
  /** the worker that holds it, or null */
  held_by?: string | null;
}

/** The JSON of `GET api/stream/workers`. */
export interface Workers {
  max_workers?: number;
  gpus?: Gpu[];
  workers?: Worker[];
  pools?: Pool[];
}

export interface Share {
  id: string;
  endpoint: string;
  created?: number;
  expires?: number | null;
  state?: 'active' | 'expired' | 'revoked';
  revoked?: number | null;
  /** only in the reply that made it: the server keeps no copy of the token */
  token?: string;
  url?: string;
  demo_url?: string;
}

export interface Call {
  id: string;
  kind: 'remote' | 'map' | 'request';
  /** the function's name, or the endpoint's for a request */
  function: string;
  started: number;
  done?: number;
  /** null when the input's length is unknown */
  total?: number | null;
  failed?: number;
  retried?: number;
  lanes?: number;
  client?: string;
}

export interface Snapshot {
  server: { id: string; version: string };
  endpoints: Endpoint[];
  functions: StreamFunction[];
  workers: Workers;
  shares: Share[];
  calls: Call[];
}

/** One event of the stream, by its `event:` field. */
export type StreamEvent =
  | { type: 'snapshot'; data: Snapshot }
  | {
      type: 'endpoint';
      data: { action: 'registered' | 'removed' | 'stats'; endpoint: Endpoint };
    }
  | {
      type: 'function';
      data: {
        action: 'registered' | 'removed' | 'stats';
        function: StreamFunction;
      };
    }
  | { type: 'workers'; data: Workers }
  | {
      type: 'share';
      data: { action: 'created' | 'revoked' | 'forgotten'; share: Share };
    }
  | {
      type: 'call';
      data: { action: 'started' | 'progress' | 'ended'; call: Call };
    };

export const EVENT_TYPES = [
  'snapshot',
  'endpoint',
  'function',
  'workers',
  'share',
  'call'
] as const;

/**
 * A parsed SSE event (`event`, `data` as text) as a typed `StreamEvent`, or null for
 * one this version does not know (a newer server may send more kinds) or whose data
 * is not JSON.
 */
export function toStreamEvent(type: string, data: string): StreamEvent | null {
  if (!(EVENT_TYPES as readonly string[]).includes(type)) {
    return null;
  }
  let value: unknown;
  try {
    value = JSON.parse(data);
  } catch {
    return null;
  }
  if (value === null || typeof value !== 'object') {
    return null;
  }
  return { type, data: value } as StreamEvent;
}
