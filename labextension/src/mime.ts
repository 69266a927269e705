/**
 * The mime renderers, as a JupyterLab mime extension: the endpoint card and the finished
 * map's summary. They rank above the ipywidgets view (rank -10), so a bundle that has
 * both is drawn by these; they are safe (text only, nothing of the output runs), so a
 * reopened notebook that is not trusted shows them too.
 */

import { IRenderMime } from '@jupyterlab/rendermime-interfaces';

import { ENDPOINT_MIME, EndpointCardRenderer, MAP_MIME, MapSummaryRenderer } from './card';

/** Below the widget manager's -10: preferred over the widget view. */
export const RANK = -20;

const extensions: IRenderMime.IExtension[] = [
  {
    id: 'jupyter-stream:endpoint-card',
    description: 'The endpoint card of a %%stream_endpoint cell, live from the server',
    rendererFactory: {
      safe: true,
      mimeTypes: [ENDPOINT_MIME],
      createRenderer: () => new EndpointCardRenderer()
    },
    rank: RANK,
    dataType: 'json'
  },
  {
    id: 'jupyter-stream:map-summary',
    description: "A finished .map's progress summary",
    rendererFactory: {
      safe: true,
      mimeTypes: [MAP_MIME],
      createRenderer: () => new MapSummaryRenderer()
    },
    rank: RANK,
    dataType: 'json'
  }
];

export default extensions;
