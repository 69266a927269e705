/**
 * Small pieces the panel and the cards share: the store as a React hook, a copy button,
 * a link shown whole with its copy button (struck out once it stopped working).
 */

import * as React from 'react';

import { StreamState } from './model';
import { StreamStore } from './store';

/** The store's state, re-rendering the component when it changes. */
export function useStreamState(store: StreamStore): StreamState {
  const [state, setState] = React.useState(store.state);
  React.useEffect(() => {
    const changed = (_: StreamStore, next: StreamState): void => setState(next);
    store.changed.connect(changed);
    setState(store.state);
    return () => {
      store.changed.disconnect(changed);
    };
  }, [store]);
  return state;
}

/** Copy `text` to the clipboard; where the page may not (plain http from another host), select `select`'s text. */
export async function copyText(text: string, select?: Element | null): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (select) {
      const range = document.createRange();
      range.selectNodeContents(select);
      const selection = window.getSelection();
      selection?.removeAllRanges();
      selection?.addRange(range);
    }
    return false;
  }
}

/** A button that copies `text`, saying "Copied" for a moment (or "Press Ctrl+C" with the text selected). */
export function CopyButton(props: { text: string; label?: string; title?: string }): JSX.Element {
  const [said, setSaid] = React.useState('');
  const ref = React.useRef<HTMLButtonElement>(null);
  const label = props.label ?? 'Copy';
  const click = async (): Promise<void> => {
    const ok = await copyText(props.text, ref.current?.previousElementSibling);
    setSaid(ok ? 'Copied' : 'Press Ctrl+C');
    window.setTimeout(() => setSaid(''), 1500);
  };
  return (
    <button
      ref={ref}
      className="jupyter-stream-copy jp-Button jp-mod-minimal jp-mod-styled"
      title={props.title ?? 'Copy to the clipboard'}
      data-copy={props.text}
      onClick={() => void click()}
    >
      {said || label}
    </button>
  );
}

/** A link shown whole (wrapped where long) with a copy button; struck out once it stopped working. */
export function LinkField(props: { label: string; url: string; dead?: boolean }): JSX.Element {
  return (
    <div className={`jupyter-stream-link jupyter-stream-share-${props.label}`}>
      <span className="jupyter-stream-link-label">{props.label}</span>
      <code className="jupyter-stream-link-text">{props.dead ? <del>{props.url}</del> : props.url}</code>
      {props.dead ? null : <CopyButton text={props.url} />}
    </div>
  );
}

/** The code that revokes share `id` from any kernel of this server. */
export function revokeHint(id: string): string {
  return `jupyter_stream.Share.lookup('${id}').revoke()`;
}
