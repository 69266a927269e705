"""Live progress of a `.map` / `.starmap` / `.for_each`: counts, rate, ETA, final state.

`MapProgress` is the state (pure, unit-tested); it asks its display to render at most
every `MIN_INTERVAL` seconds, so a fast map costs a few renders per second, not one per
item, and stays far below jupyter-server's IOPub rate limits. In a notebook the display
is an ipywidgets bar whose plain-text fallback (nbconvert, consoles) is a summary line,
never a widget repr, and whose final bundle also carries `MAP_MIME` (the figures, which
the JupyterLab extension draws without the kernel); in a terminal it is a line on stderr,
rewritten in place; elsewhere (a script whose stderr is a file) the summary line once, at
the end.
"""

from __future__ import annotations

import html
import os
import sys
import time
from typing import Any

#: Seconds between two renders while a map runs (about 10 updates a second at most).
MIN_INTERVAL = 0.1
#: A finished map's figures in an output bundle, for the JupyterLab extension's renderer.
MAP_MIME = "application/vnd.jupyter-stream.map+json"


class MapProgress:
    """Counts of one map. `total` is None when the input's length is unknown."""

    def __init__(self, label: str, total: int | None, display: Any = None, clock: Any = time.monotonic):
        self.label = label
        self.total = total
        self.display = display
        self.clock = clock
        self.started = clock()
        self.ended: float | None = None
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.lanes: int | None = None  # workers running this map, as the server last said
        self.state = "running"  # then "success", "partial" (some items failed), "failed" or "cancelled"
        self.renders = 0
        self._last_render = float("-inf")

    # -- updates from the map ------------------------------------------------------------

    def on_sent(self, n: int) -> None:
        self.sent += n

    def on_results(self, done: int, failed: int = 0) -> None:
        """`done` more items have their final result, `failed` of them a failure."""
        self.done += done
        self.failed += failed

    def on_retry(self) -> None:
        self.retried += 1

    def on_lanes(self, lanes: int) -> None:
        self.lanes = lanes

    def finish(self, state: str) -> None:
        if self.ended is None:
            self.state = state
            self.ended = self.clock()
            self.render(force=True)

    # -- derived figures ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Sent to the server and not answered yet."""
        return max(self.sent - self.done, 0)

    @property
    def running(self) -> int:
        """On a worker now: one item per worker running the map (all in flight until the
        server has said how many workers that is)."""
        return self.in_flight if self.lanes is None else min(self.in_flight, self.lanes)

    @property
    def queued(self) -> int:
        """Sent and waiting for a worker (items travel in batches)."""
        return self.in_flight - self.running

    @property
    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    @property
    def rate(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.ended is not None:
            return None
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "label": self.label, "state": self.state, "total": self.total, "done": self.done,
            "running": self.running, "queued": self.queued, "failed": self.failed, "retried": self.retried,
            "rate": self.rate, "elapsed": self.elapsed, "eta": self.eta,
        }

    def figures(self) -> dict[str, Any]:
        """The finished map as the JupyterLab extension draws it (`MAP_MIME`)."""
        return {
            "version": 1, "function": self.label.rsplit(".", 1)[0], "label": self.label, "total": self.total,
            "done": self.done, "failed": self.failed, "retried": self.retried, "elapsed": round(self.elapsed, 3),
            "rate": round(self.rate, 3), "ok": self.state == "success", "state": self.state, "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line: what a person wants to know about the map at a glance."""
        done = f"{self.done:,}/{self.total:,}" if self.total is not None else f"{self.done:,}"
        parts = [f"{self.label}: {done} done"]
        if self.state == "running":
            parts.append(f"{self.running:,} running")
            if self.queued:
                parts.append(f"{self.queued:,} queued")
        parts.append(f"{self.failed:,} failed")
        parts.append(f"{self.retried:,} retried")
        parts.append(f"{self.rate:,.1f}/s")
        parts.append(f"{_duration(self.elapsed)} elapsed")
        if self.eta is not None:
            parts.append(f"ETA {_duration(self.eta)}")
        if self.state != "running":
            parts.append({"success": "✔ done", "partial": f"◐ {self.done - self.failed:,} of {self.done:,} succeeded",
                          "failed": "✘ failed", "cancelled": "■ cancelled"}[self.state])
        return " · ".join(parts)

    def render(self, force: bool = False) -> None:
        """Ask the display to redraw, at most every `MIN_INTERVAL` seconds unless forced."""
        now = self.clock()
        if self.display is None or (not force and now - self._last_render < MIN_INTERVAL):
            return
        self._last_render = now
        self.renders += 1
        self.display.update(self)


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class WidgetDisplay:
    """An ipywidgets progress bar with a label of counts; its text/plain fallback is the
    summary line, so saved or converted notebooks show text, not a widget repr."""

    COLORS = {"running": "", "success": "success", "partial": "warning", "failed": "danger", "cancelled": "warning"}

    def __init__(self, progress: MapProgress):
        import ipywidgets as widgets
        from IPython.display import display

        self.bar = widgets.IntProgress(value=0, min=0, max=max(progress.total or 1, 1), description="",
                                       layout=widgets.Layout(width="180px", flex="0 0 auto"))  # room for the summary
        self.bar.add_class("jupyter-stream-progress")
        self.text = widgets.HTML(layout=widgets.Layout(overflow="hidden", flex="1 1 auto"))  # one line, never wrapped
        self.box = widgets.HBox([self.bar, self.text])
        self.box.add_class("jupyter-stream-map")
        self.handle = display(self._bundle(progress), raw=True, display_id=True)

    def _bundle(self, progress: MapProgress) -> dict[str, Any]:
        bundle = {
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": self.box.model_id},
            "text/plain": progress.summary(),
        }
        if progress.state != "running":  # live progress stays the widget; the summary outlives the kernel
            bundle[MAP_MIME] = progress.figures()
        return bundle

    def update(self, progress: MapProgress) -> None:
        total = progress.total
        if total is None:  # unknown length: the bar shows the share of sent inputs done
            self.bar.max = max(progress.sent, 1)
        self.bar.value = progress.done
        self.bar.bar_style = self.COLORS[progress.state]
        summary = html.escape(progress.summary())
        self.text.value = (f'<span class="jupyter-stream-summary" title="{summary}" '
                           f'style="white-space: nowrap; overflow: hidden; text-overflow: ellipsis; display: block">{summary}</span>')
        if progress.state != "running":
            self.handle.update(self._bundle(progress), raw=True)


class StderrDisplay:
    """A progress line rewritten in place on a terminal's stderr."""

    def update(self, progress: MapProgress) -> None:
        end = "\n" if progress.state != "running" else ""
        sys.stderr.write("\r" + progress.summary() + end)
        sys.stderr.flush()


class SummaryDisplay:
    """Where nothing can be redrawn (a script's stderr in a file or a pipe): the summary
    line once, when the map ends."""

    def update(self, progress: MapProgress) -> None:
        if progress.state != "running":
            print(progress.summary(), file=sys.stderr, flush=True)


def display_for(progress: MapProgress) -> Any:
    """The display that fits where this process runs, or None for none."""
    if os.environ.get("JUPYTER_STREAM_WORKER"):
        return None  # a map inside a worker has no one to show it to
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        try:
            return WidgetDisplay(progress)
        except ImportError:
            return None
    if sys.stderr is None:
        return None
    return StderrDisplay() if sys.stderr.isatty() else SummaryDisplay()


def start(label: str, total: int | None, enabled: bool = True) -> MapProgress:
    progress = MapProgress(label, total)
    if enabled:
        progress.display = display_for(progress)
        progress.render(force=True)
    return progress
