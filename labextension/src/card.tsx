/**
 * The cards a notebook's outputs carry, drawn by this extension from the output's own
 * data (so they need nothing from the kernel: they work after a kernel restart, in a
 * reopened notebook and in Notebook 7), with live figures from the server:
 *
 * - `application/vnd.jupyter-stream.endpoint+json`, the endpoint card: its name, media
 *   type, link (from this page's own base URL, not the kernel's idea of the server), demo
 *   page, a curl line to copy, live counters, a "Try it" form built from its parameters
 *   that shows the response as it arrives, and "Share". Once the endpoint is removed from
 *   the server, its links are struck out and Try it and Share disabled.
 * - `application/vnd.jupyter-stream.map+json`, a finished map's summary.
 *
 * The kernel's bundle also has the ipywidgets view and text/html and text/plain
 * fallbacks; these renderers rank above the widget view, so JupyterLab picks them.
 */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { ServerConnection } from '@jupyterlab/services';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CopyButton, LinkField, revokeHint, useStreamState } from './common';
import { Parameter, Share } from './events';
import { count, duration, localTime } from './format';
import { endpointStatus } from './model';
import { StreamStore, getStore } from './store';
import {
  ResponseReader,
  Shown,
  buildRequest,
  fieldKind,
  formParameters,
  initialValue,
  placeholder,
  queryString,
  readableError
} from './tryit';

export const ENDPOINT_MIME = 'application/vnd.jupyter-stream.endpoint+json';
export const MAP_MIME = 'application/vnd.jupyter-stream.map+json';

/** What the kernel puts in the endpoint card's bundle. */
export interface EndpointCardData {
  version: number;
  name: string;
  path: string;
  url?: string;
  media_type: string;
  media_type_declared?: boolean;
  parameters?: Parameter[] | null;
  doc?: string;
  owner?: string;
}

/** What the kernel puts in a finished map's bundle. */
export interface MapSummaryData {
  version: number;
  function: string;
  label?: string;
  total: number | null;
  done: number;
  failed: number;
  retried: number;
  elapsed: number;
  rate: number;
  ok: boolean;
  /** success, partial, failed or cancelled */
  state?: string;
  summary?: string;
}

const NAME = /^[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)?$/;

/** The card's data from an output bundle, or null when it is not a card this version can draw. */
export function endpointCardData(value: unknown): EndpointCardData | null {
  if (value === null || typeof value !== 'object') {
    return null;
  }
  const data = value as Partial<EndpointCardData>;
  if (typeof data.name !== 'string' || !NAME.test(data.name)) {
    return null;
  }
  return {
    version: data.version ?? 1,
    name: data.name,
    // always the server's own route for this name: an output cannot point the card elsewhere
    path: `stream/${data.name}`,
    url: data.url,
    media_type: typeof data.media_type === 'string' ? data.media_type : 'text/event-stream',
    media_type_declared: data.media_type_declared,
    parameters: Array.isArray(data.parameters) ? data.parameters : null,
    doc: typeof data.doc === 'string' ? data.doc : '',
    owner: typeof data.owner === 'string' ? data.owner : ''
  };
}

// -- the endpoint card ------------------------------------------------------------------

interface Tried {
  request: string;
  note: string;
  shown: Shown | null;
  earlier: number;
  error: string[];
}

function Counters(props: { open: number; requests: number; errors: number }): JSX.Element {
  const parts: [string, string, number][] = [
    ['open_streams', 'streams open', props.open],
    ['requests', 'requests', props.requests],
    ['errors', 'errors', props.errors]
  ];
  return (
    <span className="jupyter-stream-counters">
      {parts.map(([key, label, n], i) => (
        <React.Fragment key={key}>
          {i ? ' · ' : ''}
          <span className={`jupyter-stream-${key}`}>
            {label}: <b>{count(n)}</b>
          </span>
        </React.Fragment>
      ))}
    </span>
  );
}

function Table(props: { shown: Shown & { kind: 'table' } }): JSX.Element {
  const { columns, rows, rowClass } = props.shown;
  return (
    <table className="jupyter-stream-output">
      <thead>
        <tr>
          {columns.map((c, i) => (
            <th key={i}>{c}</th>
          ))}
        </tr>
      </thead>
      <tbody>
        {rows.map((row, i) => (
          <tr key={i} className={rowClass}>
            {row.map((c, j) => (
              <td key={j}>{c}</td>
            ))}
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function Response(props: { tried: Tried }): JSX.Element {
  const { tried } = props;
  let body: JSX.Element | null = null;
  if (tried.error.length) {
    body = <pre className="jupyter-stream-output">{tried.error.join('\n')}</pre>;
  } else if (tried.shown?.kind === 'table') {
    body = tried.shown.rows.length ? <Table shown={tried.shown} /> : null;
  } else if (tried.shown?.kind === 'text') {
    body = <pre className="jupyter-stream-output">{tried.shown.text}</pre>;
  } else if (tried.shown?.kind === 'bytes') {
    body = <div className="jupyter-stream-output">{count(tried.shown.bytes)} bytes received</div>;
  }
  return (
    <>
      {tried.earlier > 0 ? <div className="jupyter-stream-earlier">{count(tried.earlier)} earlier not shown</div> : null}
      {body}
      <div className="jupyter-stream-note">
        {tried.request ? <code className="jupyter-stream-request">{tried.request}</code> : null}{' '}
        <i>{tried.note}</i>
      </div>
    </>
  );
}

/** A docstring's line, `name` shown as code (as on the demo page). */
function Doc(props: { text: string }): JSX.Element {
  return (
    <div className="jupyter-stream-doc">
      {props.text.split(/(`[^`\n]+`)/).map((part, i) =>
        /^`[^`\n]+`$/.test(part) ? <code key={i}>{part.slice(1, -1)}</code> : part
      )}
    </div>
  );
}

function Field(props: {
  p: Parameter;
  value: string | boolean;
  disabled: boolean;
  onChange: (v: string | boolean) => void;
}): JSX.Element {
  const { p, value, disabled, onChange } = props;
  const kind = fieldKind(p);
  const hint =
    `${p.name}: ${p.type ?? 'any'}` +
    (p.required ? ' (required)' : ` = ${p.default === null || p.default === undefined ? 'None' : JSON.stringify(p.default)}`);
  let input: JSX.Element;
  if (kind === 'checkbox') {
    input = (
      <input type="checkbox" checked={value === true} disabled={disabled} onChange={e => onChange(e.target.checked)} />
    );
  } else if (kind === 'select') {
    input = (
      <select className="jp-mod-styled" value={String(value)} disabled={disabled} onChange={e => onChange(e.target.value)}>
        <option value="">default ({p.default === null || p.default === undefined ? 'None' : String(p.default)})</option>
        <option value="true">true</option>
        <option value="false">false</option>
      </select>
    );
  } else if (kind === 'json') {
    input = (
      <textarea
        value={String(value)}
        placeholder={placeholder(p)}
        disabled={disabled}
        spellCheck={false}
        onChange={e => onChange(e.target.value)}
      />
    );
  } else {
    input = (
      <input
        type="text"
        value={String(value)}
        placeholder={placeholder(p)}
        disabled={disabled}
        spellCheck={false}
        onChange={e => onChange(e.target.value)}
      />
    );
  }
  return (
    <label className={`jupyter-stream-field jupyter-stream-field-${p.name}`} title={hint}>
      <span className="jupyter-stream-field-name">{p.name}</span>
      {input}
    </label>
  );
}

function ShareLinks(props: { share: Share; dead: 'removed' | 'revoked' | ''; onRevoke: () => void }): JSX.Element {
  const { share, dead } = props;
  let note: JSX.Element;
  if (dead === 'removed') {
    note = <i>these links stopped working: the endpoint was removed</i>;
  } else if (dead === 'revoked') {
    note = <i>these links stopped working: share {share.id} was revoked</i>;
  } else {
    const until = share.expires ? (
      <>
        until{' '}
        <span className="jupyter-stream-expires" title={localTime(share.expires, true)}>
          {localTime(share.expires)}
        </span>
      </>
    ) : (
      <>with no expiry</>
    );
    note = (
      <i>
        anyone with a link can run this endpoint (and nothing else of the server) {until}; share{' '}
        <code className="jupyter-stream-share-id">{share.id}</code>, revoke it here or with{' '}
        <code className="jupyter-stream-revoke">{revokeHint(share.id)}</code>
      </i>
    );
  }
  return (
    <div className="jupyter-stream-share-links">
      <LinkField label="demo" url={share.demo_url ?? ''} dead={dead !== ''} />
      <LinkField label="stream" url={share.url ?? ''} dead={dead !== ''} />
      <div className="jupyter-stream-share-note">
        {note}
        {dead ? null : (
          <button className="jupyter-stream-revoke-button jp-Button jp-mod-styled jp-mod-warn" onClick={props.onRevoke}>
            Revoke
          </button>
        )}
      </div>
    </div>
  );
}

export function EndpointCard(props: { data: EndpointCardData; store: StreamStore }): JSX.Element {
  const { data, store } = props;
  const state = useStreamState(store);
  const known = endpointStatus(state, data.name);
  const removed = known.status === 'removed';
  const live = known.status === 'live' ? known.endpoint : null;
  const parameters = formParameters(data.parameters ?? live?.parameters ?? []);
  const mediaType = live?.media_type ?? data.media_type;
  const url = store.url(data.path);
  const href = store.href(data.path);

  const [values, setValues] = React.useState<Record<string, string | boolean>>(() =>
    Object.fromEntries(parameters.map(p => [p.name, initialValue(p)]))
  );
  const [tried, setTried] = React.useState<Tried | null>(null);
  const [share, setShare] = React.useState<Share | null>(null);
  const [shareProblem, setShareProblem] = React.useState('');
  const trying = React.useRef<AbortController | null>(null);
  const [running, setRunning] = React.useState(false);
  React.useEffect(() => () => trying.current?.abort(), []);

  // the share's state as the server has it (revoked from elsewhere, or gone with its endpoint)
  const serverShare = share ? state.shares.find(s => s.id === share.id) : undefined;
  const shareDead: 'removed' | 'revoked' | '' = removed
    ? 'removed'
    : serverShare && serverShare.state && serverShare.state !== 'active'
      ? 'revoked'
      : '';

  const tryIt = async (): Promise<void> => {
    if (trying.current) {
      trying.current.abort();
      return;
    }
    let request;
    try {
      request = buildRequest(parameters, values);
    } catch (e) {
      setTried({ request: '', note: `check the form: ${(e as Error).message}`, shown: null, earlier: 0, error: [] });
      return;
    }
    const controller = (trying.current = new AbortController());
    setRunning(true);
    const query = queryString(request.query);
    let line = `${request.method} /${data.path}${query}`;
    let reader: ResponseReader | null = null;
    let note = 'stream ended';
    const show = (n: string, error: string[] = []): void =>
      setTried({ request: line, note: n, shown: reader?.shown() ?? null, earlier: reader?.earlier ?? 0, error });
    show('connecting…');
    try {
      // 'reload', not ServerConnection's default 'no-store', which adds a cache-busting query argument
      const init: RequestInit = { method: request.method, signal: controller.signal, cache: 'reload' };
      if (request.body !== null) {
        init.body = request.body;
        init.headers = { 'Content-Type': 'application/json' };
      }
      const response = await ServerConnection.makeRequest(url + query, init, store.settings);
      line += ` → ${response.status}`;
      if (response.status >= 400) {
        show(`HTTP ${response.status}`, readableError(await response.text()));
        return;
      }
      reader = new ResponseReader(response.headers.get('Content-Type') ?? mediaType);
      show('connected, waiting for the response…');
      if (response.body) {
        const body = response.body.getReader();
        let drawn = 0;
        for (;;) {
          const { done, value } = await body.read();
          if (done) {
            break;
          }
          reader.push(value);
          if (performance.now() - drawn > 100) {
            drawn = performance.now(); // at most ten redraws a second
            show(`streaming… ${reader.summary()}`);
          }
        }
      }
      reader.end();
    } catch (e) {
      note = controller.signal.aborted ? 'stopped' : `${(e as Error).name}: ${(e as Error).message}`;
    } finally {
      trying.current = null;
      setRunning(false);
    }
    show(reader ? `${note} · ${reader.summary()}` : note);
  };

  const makeShare = async (): Promise<void> => {
    try {
      setShare(await store.share(data.name, '1h'));
      setShareProblem('');
    } catch (e) {
      setShareProblem(`could not share: ${(e as Error).message}`);
    }
  };

  const revoke = async (): Promise<void> => {
    if (share) {
      try {
        await store.revoke(share);
      } catch (e) {
        setShareProblem(`could not revoke: ${(e as Error).message}`);
      }
    }
  };

  const stats = live?.stats;
  const goneTitle = 'The endpoint was removed from the server';
  return (
    <div className={`jupyter-stream-card${removed ? ' jupyter-stream-card-removed' : ''}`}>
      <div className="jupyter-stream-card-title">
        <b className="jupyter-stream-card-name">{data.name}</b> <code className="jupyter-stream-media">{mediaType}</code>{' '}
        &rarr;{' '}
        {removed ? (
          <del className="jupyter-stream-url">{url}</del>
        ) : (
          <a className="jupyter-stream-url" href={href} target="_blank" rel="noopener noreferrer">
            {url}
          </a>
        )}{' '}
        &middot;{' '}
        {removed ? (
          <del className="jupyter-stream-demo">demo page</del>
        ) : (
          <a className="jupyter-stream-demo" href={href + '/demo'} target="_blank" rel="noopener noreferrer">
            demo page
          </a>
        )}
      </div>
      {data.doc ? <Doc text={data.doc.split('\n')[0]} /> : null}
      <div className="jupyter-stream-curl-line">
        <pre className="jupyter-stream-curl">{removed ? <del>{store.curl(url)}</del> : store.curl(url)}</pre>
        {removed ? null : <CopyButton text={store.curl(url)} title="Copy the curl line" />}
      </div>
      {parameters.length ? (
        <div className="jupyter-stream-form">
          {parameters.map(p => (
            <Field
              key={p.name}
              p={p}
              value={values[p.name] ?? initialValue(p)}
              disabled={removed}
              onChange={v => setValues({ ...values, [p.name]: v })}
            />
          ))}
        </div>
      ) : null}
      <div className="jupyter-stream-actions">
        <button
          className="jupyter-stream-try jp-Button jp-mod-styled jp-mod-accept"
          disabled={removed}
          title={removed ? goneTitle : running ? 'Stop the stream' : 'Call the endpoint with these values and show the response here'}
          onClick={() => void tryIt()}
        >
          {running ? '■ Stop' : '▶ Try it'}
        </button>
        <button
          className="jupyter-stream-share jp-Button jp-mod-styled"
          disabled={removed}
          title={removed ? goneTitle : 'Make a link (1 hour) that opens this endpoint and its demo page, nothing else'}
          onClick={() => void makeShare()}
        >
          Share
        </button>
        {removed ? (
          <span className="jupyter-stream-removed">
            <b>removed</b> from the server
          </span>
        ) : (
          <Counters open={stats?.open_streams ?? 0} requests={stats?.requests ?? 0} errors={stats?.errors ?? 0} />
        )}
      </div>
      <div className="jupyter-stream-shared">
        {share ? <ShareLinks share={share} dead={shareDead} onRevoke={() => void revoke()} /> : null}
        {shareProblem ? <div className="jupyter-stream-problem">{shareProblem}</div> : null}
      </div>
      <div className="jupyter-stream-events">{tried ? <Response tried={tried} /> : null}</div>
    </div>
  );
}

/** A mime renderer for the endpoint card. */
export class EndpointCardRenderer extends ReactWidget implements IRenderMime.IRenderer {
  private data: EndpointCardData | null = null;

  constructor() {
    super();
    this.addClass('jupyter-stream-rendered');
  }

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.data = endpointCardData(model.data[ENDPOINT_MIME]);
    this.update();
    return Promise.resolve();
  }

  render(): JSX.Element {
    if (this.data === null) {
      return <div className="jupyter-stream-card">this endpoint card's data is not readable by this version of jupyter-stream</div>;
    }
    return <EndpointCard key={this.data.name} data={this.data} store={getStore()} />;
  }
}

// -- the finished map's summary ---------------------------------------------------------

const BAR_STYLE: Record<string, string> = {
  success: 'success',
  partial: 'warning',
  cancelled: 'warning',
  failed: 'danger'
};

/** The summary line the kernel wrote, or one made from the figures. */
export function mapSummary(d: MapSummaryData): string {
  if (d.summary) {
    return d.summary;
  }
  const done = d.total === null ? count(d.done) : `${count(d.done)}/${count(d.total)}`;
  return [
    `${d.label ?? d.function}: ${done} done`,
    `${count(d.failed)} failed`,
    `${count(d.retried)} retried`,
    `${d.rate.toFixed(1)}/s`,
    `${duration(d.elapsed)} elapsed`,
    d.ok ? '✔ done' : '✘ failed'
  ].join(' · ');
}

export function MapSummary(props: { data: MapSummaryData }): JSX.Element {
  const d = props.data;
  const state = d.state ?? (d.ok ? 'success' : 'failed');
  const percent = d.total ? Math.min(100, (100 * d.done) / d.total) : 100;
  const summary = mapSummary(d);
  return (
    <div className={`jupyter-stream-map jupyter-stream-map-${state}`}>
      <div className="jupyter-stream-progress" title={`${d.function}: ${count(d.done)} done`}>
        <div className={`progress-bar progress-bar-${BAR_STYLE[state] ?? 'success'}`} style={{ width: `${percent}%` }} />
      </div>
      <span className="jupyter-stream-summary" title={summary}>
        {summary}
      </span>
    </div>
  );
}

export class MapSummaryRenderer extends ReactWidget implements IRenderMime.IRenderer {
  private data: MapSummaryData | null = null;

  renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    const value = model.data[MAP_MIME];
    this.data = value !== null && typeof value === 'object' ? (value as unknown as MapSummaryData) : null;
    this.update();
    return Promise.resolve();
  }

  render(): JSX.Element {
    return this.data ? <MapSummary data={this.data} /> : <div />;
  }
}
