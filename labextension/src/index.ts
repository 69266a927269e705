/**
 * jupyter-stream's JupyterLab extension (JupyterLab 4 and Notebook 7): the Streams
 * panel in the left sidebar, its status bar item and command, and the Running panel's
 * Streams section. The cards' mime renderers are a mime extension of their own
 * (`mime.ts`). All of them share one connection to the server's event stream
 * (`store.ts`).
 */

import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IRunningSessionManagers } from '@jupyterlab/running';
import { IStatusBar } from '@jupyterlab/statusbar';

import { streamIcon } from './icons';
import { PANEL_ID, StreamsPanel } from './panel';
import { StreamsRunningManager } from './running';
import { StreamsStatus } from './statusbar';
import { getStore } from './store';

export const OPEN_PANEL = 'jupyter-stream:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-stream:plugin',
  description: 'The Streams panel, its status bar item and the Running panel section of jupyter-stream',
  autoStart: true,
  optional: [ICommandPalette, IStatusBar, IRunningSessionManagers, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    statusBar: IStatusBar | null,
    running: IRunningSessionManagers | null,
    restorer: ILayoutRestorer | null
  ): void => {
    const store = getStore();
    const panel = new StreamsPanel(store);
    app.shell.add(panel, 'left', { rank: 650 });
    restorer?.add(panel, PANEL_ID);
    const open = (): void => {
      app.shell.activateById(PANEL_ID);
    };

    app.commands.addCommand(OPEN_PANEL, {
      label: 'Streams: Show panel',
      caption: "Show jupyter-stream's endpoints, functions, running calls and workers",
      icon: streamIcon,
      execute: open
    });
    palette?.addItem({ command: OPEN_PANEL, category: 'Streams' });

    statusBar?.registerStatusItem('jupyter-stream:status', {
      item: new StreamsStatus(store, () => void app.commands.execute(OPEN_PANEL)),
      align: 'left',
      rank: 100
    });

    running?.add(new StreamsRunningManager(store, open));
  }
};

export default plugin;
