"""Registrations made with ``--persist`` (``persist=True``), kept on disk so that the
server registers them again when it restarts.

Endpoints and functions belong to the server, not to the kernel that registered them;
without ``--persist`` they last until the server stops. A persisted one is its
registration's JSON body, as the client sent it, in one file per name under
`JupyterStream.persist_dir` (owner-only permissions: it holds code the workers will
run). The server restores it through the same checks as a new registration, and has a
worker load its pickle before serving it again.

Since a stored registration is code the workers run, `load` reads nothing that someone
else could have written: the directory and each file must belong to the server's user
and be writable by no one else, and a file may not be a symbolic link.

The share links of persisted endpoints are kept beside them, in `SHARES_FILE`, the same
way: only each token's SHA-256 digest is stored (`shares.Share.record`), and the file is
read under the same rules, since a digest written there by someone else would open an
endpoint to them.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

KINDS = ("endpoint", "function")
#: the share links of persisted endpoints (digests, never tokens); not a registration
SHARES_FILE = "shares.json"


@dataclass
class StoredRegistration:
    kind: str
    name: str
    path: str
    body: bytes  # the registration's JSON, as sent
    fn_hash: str | None


class RegistrationStore:
    """One JSON file per persisted endpoint or function."""

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, kind: str, name: str) -> str:
        return os.path.join(self.directory, f"{kind}-{name}.json")

    def save(self, kind: str, name: str, registration: bytes, fn_hash: str) -> str:
        """Write atomically (a crash leaves the old file or the new one, never half). The
        registration's JSON (checked already, and up to hundreds of MB of base64) goes in
        as it came, not parsed and written out again."""
        head = json.dumps({"kind": kind, "name": name, "fn_hash": fn_hash, "saved": time.time()})
        return self.write(f"{kind}-{name}.json", [head[:-1].encode() + b', "registration": ', registration, b"}"])

    def write(self, filename: str, parts: list[bytes]) -> str:
        """Write `parts` to `filename` in the directory, atomically and owner-only."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{filename[:-5]}-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
            path = os.path.join(self.directory, filename)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def save_shares(self, records: list[dict]) -> None:
        """Keep these share records (`shares.Share.record`: digests, no tokens); none
        removes the file."""
        if records:
            self.write(SHARES_FILE, [json.dumps({"shares": records}).encode()])
        else:
            try:
                os.unlink(os.path.join(self.directory, SHARES_FILE))
            except FileNotFoundError:
                pass

    def load_shares(self) -> tuple[list[dict], str | None]:
        """The stored share records, and what is wrong with the file if it cannot be trusted
        or read (then no share is taken from it)."""
        path = os.path.join(self.directory, SHARES_FILE)
        try:
            problem = unsafe(os.stat(self.directory), "the directory", self.directory, 0o700)
            if problem:
                return [], problem
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return [], None
        except OSError as e:
            return [], f"{path} cannot be opened ({e}; a symbolic link is not followed)"
        with os.fdopen(fd, "rb") as f:
            problem = unsafe(os.fstat(f.fileno()), "the file", path, 0o600)
            if problem:
                return [], problem
            try:
                records = json.load(f)["shares"]
                if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                    raise ValueError("'shares' is not a list of objects")
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                return [], f"{path} is not a file of share links ({type(e).__name__}: {e}); delete it"
        return records, None

    def remove(self, kind: str, name: str) -> bool:
        try:
            os.unlink(self.path(kind, name))
            return True
        except FileNotFoundError:
            return False

    def load(self) -> Iterator[StoredRegistration | tuple[str, str]]:
        """Each stored registration, or ``(path, what is wrong with it)``."""
        try:
            problem = unsafe(os.stat(self.directory), "the directory", self.directory, 0o700)
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        if problem:
            yield self.directory, problem
            return
        for filename in names:
            if not filename.endswith(".json") or filename.startswith(".") or filename == SHARES_FILE:
                continue
            path = os.path.join(self.directory, filename)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                continue  # removed since the listing (a newer registration of that name)
            except OSError as e:
                yield path, f"it cannot be opened ({e}; a symbolic link is not followed)"
                continue
            with os.fdopen(fd, "rb") as f:
                problem = unsafe(os.fstat(f.fileno()), "the file", path, 0o600)
                if problem:
                    yield path, problem
                    continue
                try:
                    record = json.load(f)
                    kind, name = record["kind"], record["name"]
                    if kind not in KINDS or filename != f"{kind}-{name}.json":
                        raise ValueError(f"it names {kind} {name!r}")
                    body = json.dumps(record["registration"]).encode()
                except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                    yield path, f"the file is not a stored registration ({type(e).__name__}: {e}); delete it"
                    continue
            yield StoredRegistration(kind, name, path, body, record.get("fn_hash"))


def unsafe(st: os.stat_result, what: str, path: str, mode: int) -> str | None:
    """Why a stored registration's directory or file must not be trusted (someone other
    than the server's user owns it or may write to it), or None."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return (f"{what} belongs to user {st.st_uid}, not to the server's user ({os.getuid()}): it could hold "
                f"someone else's code. If it is yours, `chown` it; otherwise delete it")
    if stat.S_IMODE(st.st_mode) & 0o022:
        return (f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): anyone could have put code there. "
                f"Check it, then `chmod {mode:o} {path}`")
    return None
