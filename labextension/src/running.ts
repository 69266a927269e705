/**
 * JupyterLab's Running panel gains a "Streams" section: the worker kernels (Shut Down:
 * `DELETE api/stream/workers/<name>`, the pool starts another if it needs one) and the
 * calls running now, open streams first (Stop: `DELETE api/stream/calls/<id>`).
 */

import { IRunningSessions } from '@jupyterlab/running';
import { ISignal, Signal } from '@lumino/signaling';

import { Call, Worker } from './events';
import { duration } from './format';
import { streamIcon } from './icons';
import { StreamState } from './model';
import { StreamStore } from './store';

const KIND_WORDS: Record<Call['kind'], string> = { request: 'stream', map: '.map', remote: '.remote' };

export class StreamsRunningManager implements IRunningSessions.IManager {
  readonly name = 'Streams';
  readonly shutdownAllLabel = 'Shut Down All';
  readonly shutdownAllConfirmationText =
    'Shut down every worker kernel of jupyter-stream and stop every open stream and call? ' +
    'Pools start new workers when calls come.';
  private _changed = new Signal<this, void>(this);
  private _workers: Worker[] = [];
  private _calls: Call[] = [];

  constructor(
    private readonly store: StreamStore,
    private readonly openPanel: () => void
  ) {
    this.read(store.state);
    store.changed.connect((_, state) => {
      const before = [this._workers, this._calls];
      this.read(state);
      if (before[0] !== this._workers || before[1] !== this._calls) {
        this._changed.emit();
      }
    });
  }

  get runningChanged(): ISignal<this, void> {
    return this._changed;
  }

  shutdownLabel = (item: IRunningSessions.IRunningItem): string =>
    item.className?.includes('jupyter-stream-running-worker') ? 'Shut Down' : 'Stop';

  running(): IRunningSessions.IRunningItem[] {
    const calls = [...this._calls].sort((a, b) => (a.kind === 'request' ? 0 : 1) - (b.kind === 'request' ? 0 : 1));
    return [
      ...this._workers.map(w => this.workerItem(w)),
      ...calls.map(c => this.callItem(c))
    ];
  }

  refreshRunning(): void {
    this._changed.emit();
  }

  shutdownAll(): void {
    const failed = (e: unknown): void => console.warn('jupyter-stream:', e);
    for (const c of this._calls) {
      this.store.stopCall(c.id).catch(failed);
    }
    for (const w of this._workers) {
      this.store.shutdownWorker(w.name).catch(failed);
    }
  }

  private read(state: StreamState): void {
    const workers = (state.workers.pools ?? []).flatMap(p => p.workers);
    const all = workers.length ? workers : state.workers.workers ?? [];
    if (!sameBy(all, this._workers, w => `${w.name}:${w.state}:${w.busy}`)) {
      this._workers = all;
    }
    if (!sameBy(state.calls, this._calls, c => `${c.id}:${c.done}`)) {
      this._calls = state.calls;
    }
  }

  private workerItem(w: Worker): IRunningSessions.IRunningItem {
    return {
      className: 'jupyter-stream-running-worker',
      icon: () => streamIcon,
      label: () => w.name,
      labelTitle: () => `${w.kernel ?? 'kernel'}${w.pid ? ', pid ' + w.pid : ''}: ${w.state ?? 'idle'}`,
      detail: () => `${w.state ?? 'idle'}${w.busy ? ` · ${w.busy} busy` : ''}`,
      open: this.openPanel,
      shutdown: () => void this.store.shutdownWorker(w.name).catch(e => console.warn('jupyter-stream:', e))
    };
  }

  private callItem(c: Call): IRunningSessions.IRunningItem {
    const progress = c.kind === 'map' ? ` ${c.done ?? 0}/${c.total ?? '?'}` : '';
    return {
      className: `jupyter-stream-running-call jupyter-stream-running-${c.kind}`,
      icon: () => streamIcon,
      label: () => `${KIND_WORDS[c.kind]} ${c.function}${progress}`,
      labelTitle: () => `${c.kind} ${c.id} of ${c.function}${c.client ? ' from ' + c.client : ''}`,
      detail: () => duration(Date.now() / 1000 - c.started),
      open: this.openPanel,
      shutdown: () => void this.store.stopCall(c.id).catch(e => console.warn('jupyter-stream:', e))
    };
  }
}

function sameBy<T>(a: T[], b: T[], key: (t: T) => string): boolean {
  return a.length === b.length && a.every((x, i) => key(x) === key(b[i]));
}
