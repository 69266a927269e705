/**
 * The Streams panel (left sidebar, widget id `jupyter-stream-panel`): what the server
 * serves and runs, live from its event stream. Endpoints (link, owner, counters,
 * latency; Copy curl, Open demo, Share and its links, Remove), functions and classes
 * (counters; running calls and maps with a progress bar and Stop), pools and workers
 * (requirements; each worker's state, busy calls, RSS, GPUs), and, before anything is
 * registered, how to make a first endpoint.
 */

import { Dialog, showDialog } from '@jupyterlab/apputils';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { CopyButton, LinkField, revokeHint, useStreamState } from './common';
import { Call, Endpoint, Pool, StreamFunction, Worker } from './events';
import { bytes, count, duration, gpuSpec, latency, localTime } from './format';
import { StreamState, activeShares, callsOf, groupFunctions, methodName, workerCounts } from './model';
import { streamIcon } from './icons';
import { StreamStore } from './store';

export const PANEL_ID = 'jupyter-stream-panel';

export const FIRST_ENDPOINT = `%load_ext jupyter_stream

%%stream_endpoint
import time

def ticks(n: int = 10):
    for i in range(n):
        yield f"data: tick {i}\\n\\n"
        time.sleep(0.5)`;

/** Run `action`; say what went wrong in a dialog if it fails. */
async function act(what: string, action: () => Promise<unknown>): Promise<void> {
  try {
    await action();
  } catch (e) {
    await showDialog({
      title: `Could not ${what}`,
      body: (e as Error).message,
      buttons: [Dialog.okButton()]
    });
  }
}

function basename(path: string): string {
  return path.split('/').pop() || path;
}

function Section(props: { title: string; count?: number; className: string; children: React.ReactNode }): JSX.Element {
  return (
    <section className={`jupyter-stream-section ${props.className}`}>
      <h3 className="jupyter-stream-section-title">
        {props.title}
        {props.count !== undefined ? <span className="jupyter-stream-badge">{props.count}</span> : null}
      </h3>
      {props.children}
    </section>
  );
}

function Figure(props: { label: string; value: string; className?: string; title?: string }): JSX.Element {
  return (
    <span className={`jupyter-stream-figure ${props.className ?? ''}`} title={props.title}>
      <span className="jupyter-stream-figure-label">{props.label}</span> <b>{props.value}</b>
    </span>
  );
}

function EndpointItem(props: { endpoint: Endpoint; state: StreamState; store: StreamStore }): JSX.Element {
  const { endpoint, state, store } = props;
  const path = `stream/${endpoint.name}`;
  const url = store.url(path);
  const stats = endpoint.stats;
  const shares = activeShares(state, endpoint.name);
  const remove = async (): Promise<void> => {
    const answer = await showDialog({
      title: `Remove endpoint ${endpoint.name}?`,
      body:
        `${url} will answer 404 from now on, its share links stop working, and streams open now end. ` +
        'Run its cell again to register it anew.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Remove' })]
    });
    if (answer.button.accept) {
      await act(`remove ${endpoint.name}`, () => store.removeEndpoint(endpoint.name));
    }
  };
  return (
    <li className="jupyter-stream-item jupyter-stream-panel-endpoint" data-name={endpoint.name}>
      <div className="jupyter-stream-item-head">
        <span className="jupyter-stream-item-name">{endpoint.name}</span>
        <code className="jupyter-stream-media">{endpoint.media_type ?? 'text/event-stream'}</code>
        {endpoint.openai ? <span className="jupyter-stream-tag">OpenAI</span> : null}
        {endpoint.persist ? <span className="jupyter-stream-tag">persisted</span> : null}
      </div>
      <a className="jupyter-stream-item-link" href={store.href(path)} target="_blank" rel="noopener noreferrer">
        {url}
      </a>
      {endpoint.owner ? (
        <div className="jupyter-stream-owner" title={`registered by ${endpoint.owner}` + (endpoint.created ? ` at ${localTime(endpoint.created, true)}` : '')}>
          {basename(endpoint.owner)}
          {endpoint.created ? ` · since ${localTime(endpoint.created)}` : ''}
        </div>
      ) : null}
      <div className="jupyter-stream-figures">
        <Figure label="open" value={count(stats?.open_streams)} className="jupyter-stream-open" title="streams open now" />
        <Figure label="requests" value={count(stats?.requests)} className="jupyter-stream-requests" />
        <Figure label="errors" value={count(stats?.errors)} className={`jupyter-stream-errors${stats?.errors ? ' jupyter-stream-bad' : ''}`} />
        <Figure
          label="p50/p99"
          value={`${latency(stats?.latency_p50)} / ${latency(stats?.latency_p99)}`}
          className="jupyter-stream-latency"
          title="time to first byte, median and 99th percentile"
        />
      </div>
      <div className="jupyter-stream-buttons">
        <CopyButton text={store.curl(url)} label="Copy curl" title="Copy a curl line that streams this endpoint (with your token)" />
        <button className="jupyter-stream-open-demo jp-Button jp-mod-minimal jp-mod-styled" onClick={() => window.open(store.href(path) + '/demo', '_blank', 'noopener')}>
          Open demo
        </button>
        <button
          className="jupyter-stream-panel-share jp-Button jp-mod-minimal jp-mod-styled"
          title="Make a link (1 hour) that opens this endpoint and its demo page, nothing else"
          onClick={() => void act(`share ${endpoint.name}`, () => store.share(endpoint.name, '1h'))}
        >
          Share
        </button>
        <button className="jupyter-stream-remove jp-Button jp-mod-minimal jp-mod-styled" title="Remove this endpoint from the server" onClick={() => void remove()}>
          Remove
        </button>
      </div>
      {shares.length ? (
        <ul className="jupyter-stream-shares">
          {shares.map(share => {
            const links = store.links(share.id);
            return (
              <li key={share.id} className="jupyter-stream-panel-share-item" data-share={share.id}>
                {links ? (
                  <>
                    <LinkField label="demo" url={links.demo_url} />
                    <LinkField label="stream" url={links.url} />
                  </>
                ) : null}
                <div className="jupyter-stream-share-note">
                  share <code className="jupyter-stream-share-id">{share.id}</code>
                  {share.expires ? ` · until ${localTime(share.expires)}` : ' · no expiry'}
                  {links ? null : <span title={revokeHint(share.id)}> · made elsewhere (its links were shown there)</span>}
                  <button
                    className="jupyter-stream-panel-revoke jp-Button jp-mod-minimal jp-mod-styled"
                    onClick={() => void act(`revoke share ${share.id}`, () => store.revoke(share))}
                  >
                    Revoke
                  </button>
                </div>
              </li>
            );
          })}
        </ul>
      ) : null}
    </li>
  );
}

function Progress(props: { call: Call }): JSX.Element {
  const { call } = props;
  const done = call.done ?? 0;
  const known = call.total !== null && call.total !== undefined && call.total > 0;
  const percent = known ? Math.min(100, (100 * done) / (call.total as number)) : 0;
  return (
    <div className={`jupyter-stream-progress-bar${known ? '' : ' jupyter-stream-indeterminate'}`}>
      <div className="jupyter-stream-progress-fill" style={known ? { width: `${percent}%` } : undefined} />
    </div>
  );
}

function CallItem(props: { call: Call; store: StreamStore }): JSX.Element {
  const { call, store } = props;
  const done = count(call.done);
  const total = call.total === null || call.total === undefined ? '?' : count(call.total);
  const elapsed = duration(Date.now() / 1000 - call.started);
  return (
    <li className={`jupyter-stream-call jupyter-stream-call-${call.kind}`} data-call={call.id}>
      <div className="jupyter-stream-call-head">
        <span className="jupyter-stream-call-kind">{call.kind === 'map' ? '.map' : call.kind === 'remote' ? '.remote' : 'request'}</span>
        {call.kind === 'map' ? (
          <span className="jupyter-stream-call-count">
            {done}/{total} done
          </span>
        ) : null}
        {call.failed ? <span className="jupyter-stream-bad">{count(call.failed)} failed</span> : null}
        {call.retried ? <span>{count(call.retried)} retried</span> : null}
        {call.lanes ? <span>{call.lanes} workers</span> : null}
        <span className="jupyter-stream-call-elapsed">{elapsed}</span>
        <button
          className="jupyter-stream-stop jp-Button jp-mod-minimal jp-mod-styled"
          title="Stop this call (its workers stop its code)"
          onClick={() => void act('stop the call', () => store.stopCall(call.id))}
        >
          Stop
        </button>
      </div>
      {call.kind === 'map' ? <Progress call={call} /> : null}
    </li>
  );
}

function FunctionItem(props: { fn: StreamFunction; label: string; state: StreamState; store: StreamStore }): JSX.Element {
  const { fn, state, store } = props;
  const stats = fn.stats;
  const calls = callsOf(state, fn.name);
  return (
    <li className="jupyter-stream-item jupyter-stream-panel-function" data-name={fn.name}>
      <div className="jupyter-stream-item-head">
        <span className="jupyter-stream-item-name" title={fn.doc || fn.name}>
          {props.label}
        </span>
        {fn.generator ? <span className="jupyter-stream-tag">generator</span> : null}
        {fn.retries ? <span className="jupyter-stream-tag">retries {fn.retries}</span> : null}
        {fn.timeout ? <span className="jupyter-stream-tag">timeout {fn.timeout}s</span> : null}
      </div>
      <div className="jupyter-stream-figures">
        <Figure label="calls" value={count(stats?.calls)} />
        <Figure label="items" value={count(stats?.items)} />
        <Figure label="failed" value={count(stats?.failed)} className={stats?.failed ? 'jupyter-stream-bad' : ''} />
        <Figure label="retried" value={count(stats?.retried)} />
      </div>
      {calls.length ? (
        <ul className="jupyter-stream-calls">
          {calls.map(c => (
            <CallItem key={c.id} call={c} store={store} />
          ))}
        </ul>
      ) : null}
    </li>
  );
}

function WorkerRow(props: { worker: Worker; store: StreamStore }): JSX.Element {
  const { worker } = props;
  const state = worker.alive === false ? 'dead' : worker.unresponsive ? 'unresponsive' : worker.state ?? 'idle';
  return (
    <li className={`jupyter-stream-worker jupyter-stream-worker-${state}`} data-name={worker.name}>
      <span className="jupyter-stream-dot" />
      <span className="jupyter-stream-worker-name" title={worker.pid ? `pid ${worker.pid}` : undefined}>
        {worker.name}
      </span>
      <span className="jupyter-stream-worker-state">{state}</span>
      <Figure label="busy" value={count(worker.busy)} />
      <Figure label="RSS" value={bytes(worker.rss)} />
      {(worker.gpus ?? []).map(g => (
        <span key={g.index} className="jupyter-stream-gpu" title={g.uuid ?? g.name}>
          GPU {g.index} {g.name}
          {g.memory_total ? ` · ${g.memory_used === null || g.memory_used === undefined ? '?' : bytes(g.memory_used)} / ${bytes(g.memory_total)}` : ''}
        </span>
      ))}
    </li>
  );
}

function PoolItem(props: { pool: Pool; store: StreamStore }): JSX.Element {
  const { pool, store } = props;
  const serves = [...(pool.endpoints ?? []), ...(pool.functions ?? [])];
  return (
    <li className="jupyter-stream-item jupyter-stream-pool">
      <div className="jupyter-stream-item-head">
        <span className="jupyter-stream-item-name">{pool.name}</span>
      </div>
      <div className="jupyter-stream-figures">
        <Figure label="GPU" value={gpuSpec(pool.gpu)} />
        {pool.env?.length ? <Figure label="env" value={pool.env.join(', ')} title="names only: values may be secrets" /> : null}
        <Figure label="concurrency" value={String(pool.concurrency ?? 1)} />
        <Figure label="workers" value={`${pool.min_workers ?? 0}–${pool.max_workers ?? '?'}`} title="min–max" />
        {pool.waiting_calls ? <Figure label="waiting" value={count(pool.waiting_calls)} className="jupyter-stream-bad" /> : null}
      </div>
      {serves.length ? <div className="jupyter-stream-serves">serves {serves.join(', ')}</div> : null}
      <ul className="jupyter-stream-workers">
        {pool.workers.length ? (
          pool.workers.map(w => <WorkerRow key={w.name} worker={w} store={store} />)
        ) : (
          <li className="jupyter-stream-none">no worker now (one starts on the first call)</li>
        )}
      </ul>
    </li>
  );
}

export function EmptyState(): JSX.Element {
  return (
    <div className="jupyter-stream-empty">
      <p>
        <b>Nothing is served yet.</b> Put <code>%%stream_endpoint</code> on a notebook cell that defines a generator, run it, and
        its endpoint shows here with its link, its streams and its workers:
      </p>
      <div className="jupyter-stream-example">
        <pre>{FIRST_ENDPOINT}</pre>
        <CopyButton text={FIRST_ENDPOINT} />
      </div>
      <p>
        Then <code>curl --no-buffer</code> its URL (Copy curl here), or open its demo page. <code>%%stream_function</code> cells
        show here too, with their running maps.
      </p>
    </div>
  );
}

const CONNECTION_WORDS: Record<string, string> = {
  connecting: 'connecting…',
  live: 'live',
  polling: 'polling',
  offline: 'offline, retrying'
};

export function StreamsView(props: { store: StreamStore }): JSX.Element {
  const { store } = props;
  const state = useStreamState(store);
  const [, tick] = React.useState(0);
  React.useEffect(() => {
    const timer = window.setInterval(() => tick(n => n + 1), 1000); // elapsed times of running calls
    return () => window.clearInterval(timer);
  }, []);
  const groups = groupFunctions(state.functions);
  const pools = state.workers.pools ?? [];
  const { busy, total } = workerCounts(state.workers);
  const nothing = !state.endpoints.length && !state.functions.length;
  return (
    <div className="jupyter-stream-panel-body">
      <header className="jupyter-stream-panel-header">
        <streamIcon.react tag="span" className="jupyter-stream-panel-icon" />
        <h2>Streams</h2>
        <span className={`jupyter-stream-connection jupyter-stream-connection-${state.connection}`} title={state.problem || undefined}>
          <span className="jupyter-stream-dot" />
          {CONNECTION_WORDS[state.connection]}
        </span>
      </header>
      {state.problem && state.connection !== 'live' ? <div className="jupyter-stream-problem">{state.problem}</div> : null}
      {nothing && state.server !== null ? <EmptyState /> : null}
      {state.endpoints.length ? (
        <Section title="Endpoints" count={state.endpoints.length} className="jupyter-stream-endpoints">
          <ul className="jupyter-stream-list">
            {state.endpoints.map(e => (
              <EndpointItem key={e.name} endpoint={e} state={state} store={store} />
            ))}
          </ul>
        </Section>
      ) : null}
      {groups.length ? (
        <Section title="Functions and classes" count={state.functions.length} className="jupyter-stream-functions">
          {groups.map(g => (
            <div key={g.cls || '-'} className={g.cls ? 'jupyter-stream-class' : 'jupyter-stream-plain'} data-class={g.cls || undefined}>
              {g.cls ? <h4 className="jupyter-stream-class-name">class {g.cls}</h4> : null}
              <ul className="jupyter-stream-list">
                {g.functions.map(fn => (
                  <FunctionItem key={fn.name} fn={fn} label={g.cls ? '.' + methodName(fn.name) : fn.name} state={state} store={store} />
                ))}
              </ul>
            </div>
          ))}
        </Section>
      ) : null}
      {pools.length || state.workers.gpus?.length ? (
        <Section title={`Pools and workers · ${busy}/${total} busy`} className="jupyter-stream-pools">
          <ul className="jupyter-stream-list">
            {pools.map(p => (
              <PoolItem key={p.name} pool={p} store={store} />
            ))}
          </ul>
          {state.workers.gpus?.length ? (
            <ul className="jupyter-stream-gpus">
              {state.workers.gpus.map(g => (
                <li key={g.index} className="jupyter-stream-gpu-row">
                  GPU {g.index}: {g.name}
                  {g.memory_total ? ` · ${bytes(g.memory_total)}` : ''} · {g.held_by ? `held by ${g.held_by}` : 'free'}
                </li>
              ))}
            </ul>
          ) : null}
        </Section>
      ) : null}
    </div>
  );
}

/** The sidebar widget. */
export class StreamsPanel extends ReactWidget {
  constructor(private readonly store: StreamStore) {
    super();
    this.id = PANEL_ID;
    this.addClass('jupyter-stream-panel');
    this.title.icon = streamIcon;
    this.title.caption = 'Streams';
    this.title.label = 'Streams';
  }

  render(): JSX.Element {
    return <StreamsView store={this.store} />;
  }
}
