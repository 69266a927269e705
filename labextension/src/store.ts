/**
 * The one connection of this page to the server's state: it reads
 * `GET api/stream/events` (fetch streaming through JupyterLab's ServerConnection, so
 * the token header, the login cookie and the base URL are Jupyter's own), keeps the
 * state with `model.reduce`, and tells its views when it changed. When the stream ends
 * (the server restarted, the network went away) it connects again with backoff and
 * starts over from the snapshot the server sends first. A server without the event
 * stream (an older jupyter-stream) is read every few seconds instead.
 *
 * The panel, the status bar, the Running panel's section and every card share one
 * `StreamStore` (`getStore()`); it also makes the REST calls their buttons need.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { Endpoint, Share, Snapshot, StreamFunction, Workers, toStreamEvent } from './events';
import { EMPTY, StreamState, reduce } from './model';
import { SseParser } from './sse';

/** Reconnection waits: 1 s, doubling up to 30 s (with some jitter). */
export const FIRST_RETRY_MS = 1000;
export const MAX_RETRY_MS = 30000;
/** No byte for this long (the server sends a keep-alive every 15 s): the connection is dead. */
export const SILENCE_MS = 45000;
/** Polling interval when the server has no event stream. */
export const POLL_MS = 2000;
/** Views are told of changes at most this often. */
export const NOTIFY_MS = 100;

/** The links of a share made from this page (the server keeps no copy of its token). */
export interface ShareLinks {
  url: string;
  demo_url: string;
}

export class StreamStore {
  readonly settings: ServerConnection.ISettings;
  private _state: StreamState = EMPTY;
  private _changed = new Signal<StreamStore, StreamState>(this);
  private _links = new Map<string, ShareLinks>();
  private _started = false;
  private _disposed = false;
  private _controller: AbortController | null = null;
  private _notify = 0;

  constructor(settings?: ServerConnection.ISettings) {
    this.settings = settings ?? ServerConnection.makeSettings();
  }

  get state(): StreamState {
    return this._state;
  }

  /** Emitted (at most every NOTIFY_MS) after the state changed. */
  get changed(): ISignal<StreamStore, StreamState> {
    return this._changed;
  }

  /** Start reading the server's events (once; later calls do nothing). */
  start(): void {
    if (this._started || this._disposed) {
      return;
    }
    this._started = true;
    void this.run();
  }

  dispose(): void {
    this._disposed = true;
    this._controller?.abort();
  }

  /** The links of share `id`, when it was made from this page. */
  links(id: string): ShareLinks | undefined {
    return this._links.get(id);
  }

  // -- URLs ---------------------------------------------------------------------------

  /** `path` on this server, as the browser reaches it: absolute, from the page's base URL. */
  url(path: string): string {
    return URLExt.join(this.settings.baseUrl, path);
  }

  /** `path` on this server, as a link's href: the base URL's path and `path` (no origin). */
  href(path: string): string {
    return URLExt.join(new URL(this.settings.baseUrl, location.href).pathname, path);
  }

  /** A curl line that streams `url` in a terminal, with this page's token when it has one. */
  curl(url: string): string {
    const token = this.settings.token;
    const auth = token
      ? ` -H ${shellQuote('Authorization: token ' + token)}`
      : ' -H "Authorization: token $JUPYTER_TOKEN"';
    return `curl --no-buffer${auth} ${shellQuote(url)}`;
  }

  // -- the actions of the panel's and cards' buttons -----------------------------------

  /** A request to this server with Jupyter's auth; throws with the server's message on an error status. */
  async request(path: string, init: RequestInit = {}): Promise<Response> {
    const response = await ServerConnection.makeRequest(this.url(path), init, this.settings);
    if (!response.ok) {
      throw new Error(await errorMessage(response));
    }
    return response;
  }

  /** A new share link of `endpoint` (1 hour unless said otherwise). */
  async share(endpoint: string, expires: string | number | null = '1h'): Promise<Share> {
    const response = await this.request('api/stream/shares', {
      method: 'POST',
      body: JSON.stringify({ endpoint, expires })
    });
    const share = (await response.json()) as Share;
    if (share.url && share.demo_url) {
      this._links.set(share.id, { url: share.url, demo_url: share.demo_url });
    }
    this.apply(s => reduce(s, { type: 'share', data: { action: 'created', share } }));
    return share;
  }

  async revoke(share: Share): Promise<void> {
    await this.request(`api/stream/shares/${encodeURIComponent(share.id)}`, { method: 'DELETE' });
    this.apply(s =>
      reduce(s, { type: 'share', data: { action: 'revoked', share: { ...share, state: 'revoked' } } })
    );
  }

  async removeEndpoint(name: string): Promise<void> {
    await this.request(`api/stream/endpoints/${encodeURIComponent(name)}`, { method: 'DELETE' });
    this.apply(s => reduce(s, { type: 'endpoint', data: { action: 'removed', endpoint: { name } } }));
  }

  /** Stop a running call, map or request. */
  async stopCall(id: string): Promise<void> {
    await this.request(`api/stream/calls/${encodeURIComponent(id)}`, { method: 'DELETE' });
  }

  /** Shut a worker kernel down (its pool starts another if it needs one). */
  async shutdownWorker(name: string): Promise<void> {
    await this.request(`api/stream/workers/${encodeURIComponent(name)}`, { method: 'DELETE' });
  }

  // -- keeping the state ----------------------------------------------------------------

  private apply(change: (state: StreamState) => StreamState): void {
    this._state = change(this._state);
    if (!this._notify) {
      this._notify = window.setTimeout(() => {
        this._notify = 0;
        this._changed.emit(this._state);
      }, NOTIFY_MS);
    }
  }

  private async run(): Promise<void> {
    let wait = FIRST_RETRY_MS;
    while (!this._disposed) {
      let outcome: 'ended' | 'missing';
      try {
        outcome = await this.readEvents(() => {
          wait = FIRST_RETRY_MS; // a snapshot came: the next failure starts its backoff anew
        });
      } catch (e) {
        if (this._disposed) {
          return;
        }
        const problem = e instanceof Error ? e.message : String(e);
        this.apply(s => ({ ...s, connection: 'offline', problem }));
        outcome = 'ended';
      }
      if (outcome === 'missing') {
        await this.pollWhileMissing();
        wait = FIRST_RETRY_MS;
        continue;
      }
      if (this._state.connection === 'live') {
        this.apply(s => ({ ...s, connection: 'connecting', problem: 'the event stream ended' }));
      }
      await sleep(wait * (0.8 + 0.4 * Math.random()));
      wait = Math.min(wait * 2, MAX_RETRY_MS);
    }
  }

  /** Read the event stream until it ends; 'missing' when the server has none (404). */
  private async readEvents(onSnapshot: () => void): Promise<'ended' | 'missing'> {
    const controller = (this._controller = new AbortController());
    let silence = 0;
    const watch = (): void => {
      window.clearTimeout(silence);
      silence = window.setTimeout(() => controller.abort(), SILENCE_MS);
    };
    watch();
    try {
      const response = await ServerConnection.makeRequest(
        this.url('api/stream/events'),
        // 'reload': never a cached copy, and no cache-busting query argument ('no-store' adds one)
        { headers: { Accept: 'text/event-stream' }, cache: 'reload', signal: controller.signal },
        this.settings
      );
      if (response.status === 404) {
        return 'missing';
      }
      if (!response.ok || !response.body) {
        throw new Error(await errorMessage(response));
      }
      const parser = new SseParser(({ event, data }) => {
        const parsed = toStreamEvent(event, data);
        if (parsed === null) {
          return;
        }
        if (parsed.type === 'snapshot') {
          onSnapshot();
          this.apply(s => ({ ...reduce(s, parsed), connection: 'live', problem: '' }));
        } else {
          this.apply(s => reduce(s, parsed));
        }
      });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) {
          break;
        }
        watch();
        parser.feed(decoder.decode(value, { stream: true }));
      }
      return 'ended';
    } catch (e) {
      if (controller.signal.aborted && !this._disposed) {
        throw new Error(`no word from the server for ${SILENCE_MS / 1000} s`);
      }
      throw e;
    } finally {
      window.clearTimeout(silence);
    }
  }

  /**
   * The server has no event stream: read its state every POLL_MS from the REST API,
   * and look for the stream again now and then (the server may be upgraded and restarted).
   */
  private async pollWhileMissing(): Promise<void> {
    for (let round = 0; round < 15 && !this._disposed; round++) {
      try {
        const snapshot = await this.readSnapshot();
        this.apply(s => ({
          ...reduce(s, { type: 'snapshot', data: snapshot }),
          connection: 'polling',
          problem: 'this server has no event stream (GET api/stream/events: 404)'
        }));
      } catch (e) {
        const problem = e instanceof Error ? e.message : String(e);
        this.apply(s => ({ ...s, connection: 'offline', problem }));
      }
      await sleep(POLL_MS);
    }
  }

  private async readSnapshot(): Promise<Snapshot> {
    const get = async <T>(path: string): Promise<T> => (await this.request(path)).json() as Promise<T>;
    const [endpoints, functions, workers, shares] = await Promise.all([
      get<{ endpoints: Endpoint[] }>('api/stream/endpoints'),
      get<{ functions: StreamFunction[] }>('api/stream/functions'),
      get<Workers>('api/stream/workers'),
      get<{ shares: Share[] }>('api/stream/shares')
    ]);
    return {
      server: { id: '', version: '' },
      endpoints: endpoints.endpoints,
      functions: functions.functions,
      workers,
      shares: shares.shares,
      calls: []
    };
  }
}

let store: StreamStore | null = null;

/** This page's store (made on first use, with the page's server settings). */
export function getStore(): StreamStore {
  if (store === null) {
    store = new StreamStore();
  }
  store.start();
  return store;
}

export function shellQuote(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

/** The message of an error response: jupyter-server's JSON `message`, an endpoint's `error`, or the status. */
export async function errorMessage(response: Response): Promise<string> {
  let text = '';
  try {
    text = await response.text();
    const body = JSON.parse(text) as { message?: string; error?: { type?: string; message?: string } };
    if (body.error?.message !== undefined) {
      return `${body.error.type ?? 'Error'}: ${body.error.message}`;
    }
    if (body.message) {
      return body.message;
    }
  } catch {
    // not JSON: the text itself
  }
  return `HTTP ${response.status}${text ? ': ' + text.slice(0, 300) : ''}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise(resolve => window.setTimeout(resolve, ms));
}
