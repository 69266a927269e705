"""Secrets never reach the server's log.

A share token or the server's token may come in a URL's query (``?share=``, ``?token=``).
jupyter-server scrubs its own access lines, but other lines carry the URL as it came:
tornado's warning for a refused request (``403 POST /api/kernels?share=...: '_xsrf'
argument missing from POST``), an uncaught exception's request, a websocket's refusal.
`SecretsFilter`, on every handler of the server's log (which tornado's loggers and ours
propagate to), rewrites each record's text, its traceback included, before it is written.
"""

from __future__ import annotations

import logging
import re

#: a query parameter whose value is a credential, in a URL or a request's repr, also
#: percent-encoded inside another URL (a login redirect's ``?next=%2Flab%3Fshare%3D...``)
SECRET_QUERY = re.compile(r"((?:[?&;]|%3F|%26|%3B)(?:token|share)(?:=|%3D))[^&\s'\"<>%]+(?:%2[dD][^&\s'\"<>%]*)*",
                          re.IGNORECASE)
HIDDEN = "[secret]"


def scrub(text: str) -> str:
    return SECRET_QUERY.sub(rf"\g<1>{HIDDEN}", text)


class SecretsFilter(logging.Filter):
    """Replaces credentials in a record's message and traceback (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that does not format is written as it is
            return True
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def install(log: logging.Logger) -> None:
    """Put a `SecretsFilter` on every handler of `log` (once)."""
    for handler in log.handlers:
        if not any(isinstance(f, SecretsFilter) for f in handler.filters):
            handler.addFilter(SecretsFilter())
