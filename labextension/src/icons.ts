/** The extension's icon: a play mark with the lines of a stream, in the theme's icon color. */

import { LabIcon } from '@jupyterlab/ui-components';

const SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M3 5.5v7l6-3.5z"/>
    <rect x="11" y="5" width="10" height="2" rx="1"/>
    <rect x="11" y="11" width="7" height="2" rx="1"/>
    <rect x="3" y="17" width="18" height="2" rx="1"/>
    <rect x="3" y="14" width="12" height="1.5" rx=".75" opacity=".6"/>
  </g>
</svg>`;

export const streamIcon = new LabIcon({ name: 'jupyter-stream:streams', svgstr: SVG });
