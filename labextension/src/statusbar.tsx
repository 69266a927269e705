/** The status bar's "N endpoints · busy/total workers"; a click opens the Streams panel. */

import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { useStreamState } from './common';
import { streamIcon } from './icons';
import { statusText } from './model';
import { StreamStore } from './store';

function Status(props: { store: StreamStore; open: () => void }): JSX.Element {
  const state = useStreamState(props.store);
  return (
    <span className="jupyter-stream-status-text" title="jupyter-stream: open the Streams panel" onClick={props.open}>
      <streamIcon.react tag="span" className="jupyter-stream-status-icon" />
      {statusText(state)}
    </span>
  );
}

export class StreamsStatus extends ReactWidget {
  constructor(
    private readonly store: StreamStore,
    private readonly open: () => void
  ) {
    super();
    this.addClass('jupyter-stream-status');
    this.addClass('jp-mod-highlighted');
  }

  render(): JSX.Element {
    return <Status store={this.store} open={this.open} />;
  }
}
