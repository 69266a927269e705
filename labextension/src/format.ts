/**
 * Numbers and moments as people read them, the same way the notebook's card, `Share`
 * and the demo page write them: local time with its offset from UTC ("14:05 UTC+2",
 * "Jun 3, 14:05 UTC" when not today), sizes in KiB/MiB/GiB, durations in s/min/h.
 */

const MONTHS = 'Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec'.split(' ');

function pad(n: number): string {
  return String(n).padStart(2, '0');
}

function zoneOf(d: Date): string {
  const off = -d.getTimezoneOffset();
  const h = Math.floor(Math.abs(off) / 60);
  const m = Math.abs(off) % 60;
  return off === 0 ? 'UTC' : `UTC${off > 0 ? '+' : '-'}${h}${m ? ':' + pad(m) : ''}`;
}

/** Epoch seconds as local time with its zone; `full` adds the date and seconds (for a tooltip). */
export function localTime(t: number, full = false, now: Date = new Date()): string {
  const d = new Date(t * 1000);
  if (full) {
    return (
      `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${zoneOf(d)}`
    );
  }
  const shown = `${pad(d.getHours())}:${pad(d.getMinutes())} ${zoneOf(d)}`;
  return d.toDateString() === now.toDateString() ? shown : `${MONTHS[d.getMonth()]} ${d.getDate()}, ${shown}`;
}

/** 1,234 */
export function count(n: number | null | undefined): string {
  return (n ?? 0).toLocaleString('en-US');
}

/** Bytes in binary units: 512 B, 1.5 KiB, 52 MiB, 79.6 GiB. */
export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/** Seconds as a short duration: 0.4s, 12.0s, 3m05s, 2h10m. */
export function duration(seconds: number): string {
  const s = Math.max(seconds, 0);
  if (s < 60) {
    return `${s.toFixed(1)}s`;
  }
  const minutes = Math.floor(s / 60);
  if (minutes < 60) {
    return `${minutes}m${pad(Math.floor(s % 60))}s`;
  }
  return `${Math.floor(minutes / 60)}h${pad(minutes % 60)}m`;
}

/** A latency in seconds as milliseconds ("12 ms", "1.2 s"), or "–" before there is one. */
export function latency(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined) {
    return '–';
  }
  if (seconds < 1) {
    const ms = seconds * 1000;
    return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
  }
  return `${seconds.toFixed(1)} s`;
}

/** A GPU spec as the panel shows it: `H100:2`, `H100 or A100:2`, or `no GPU`. */
export function gpuSpec(gpu: string | string[] | null | undefined): string {
  if (gpu === null || gpu === undefined || gpu === '' || (Array.isArray(gpu) && gpu.length === 0)) {
    return 'no GPU';
  }
  return Array.isArray(gpu) ? gpu.join(' or ') : gpu;
}
