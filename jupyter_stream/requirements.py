"""What a function asks of the workers that run it: GPUs, pool size, kernel, environment.

``--gpu`` takes Modal's forms: ``any``, ``N`` (that many GPUs of any kind: of one kind
when this machine has that many of one, mixed only when it has not), ``TYPE`` (matched
case-insensitively against the device name, as a whole word: ``H100`` matches "NVIDIA
H100 80GB HBM3", ``A10`` does not match an A100), ``TYPE:N``, ``mixed:N`` (any N devices,
of whatever kinds are free), and a comma-separated fallback list tried in order
(``H100,A100:2``; a Python list in the decorators).

Both sides check these: the client early in the notebook cell, the server again (it trusts
no client) and against its own devices (`server.gpus`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .signatures import RegistrationError

GPU_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: set by the server for each worker; a registration may not set them
RESERVED_ENV = {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "JUPYTER_STREAM_WORKER", "JPY_PARENT_PID"}
MAX_WORKERS_LIMIT = 1024
MAX_SCALEDOWN_WINDOW = 7 * 24 * 3600.0
MAX_GPUS = 64
REQUIREMENT_FIELDS = {"gpu", "min_workers", "max_workers", "scaledown_window", "kernel", "env", "concurrency"}
MAX_CONCURRENCY = 1000
GPU_SPEC_HELP = "any, N, TYPE, TYPE:N, mixed:N, or a fallback list such as H100,A100:2"


@dataclass(frozen=True)
class GpuRequest:
    """One alternative of a GPU spec: `count` devices whose name matches `kind` (any if
    None); several devices of any kind are of one kind unless `mixed`."""

    kind: str | None
    count: int
    mixed: bool = False

    def __str__(self) -> str:
        if self.mixed:
            return f"mixed:{self.count}"
        if self.kind is None:
            return "any" if self.count == 1 else str(self.count)
        return self.kind if self.count == 1 else f"{self.kind}:{self.count}"

    @property
    def one_kind(self) -> bool:
        """Whether its devices should all be of one kind (several of any kind, not mixed)."""
        return self.kind is None and not self.mixed and self.count > 1

    def matches(self, device_name: str) -> bool:
        if self.kind is None:
            return True
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(self.kind)}(?![A-Za-z0-9])", device_name, re.IGNORECASE) is not None


def parse_gpu_spec(spec: Any) -> tuple[GpuRequest, ...]:
    """The alternatives of a GPU spec, in the order they are tried; () for no GPU."""
    if spec is None or spec is False or (isinstance(spec, str) and not spec.strip()):
        return ()
    if isinstance(spec, (list, tuple)):
        parts = [str(part) for part in spec]
        if not parts or not all(isinstance(part, (str, int)) and not isinstance(part, bool) for part in spec):
            raise ValueError(f"a GPU spec list must hold strings such as 'H100' or 'A100:2', got {spec!r}")
    elif isinstance(spec, int) and not isinstance(spec, bool):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = spec.split(",")
    else:
        raise ValueError(f"the GPU spec must be a string ({GPU_SPEC_HELP}), got {type(spec).__name__}")
    requests = []
    for part in parts:
        requests.append(_parse_one(part.strip(), spec))
    return tuple(requests)


def _parse_one(part: str, whole: Any) -> GpuRequest:
    bad = f"invalid GPU spec {whole!r}"
    if not part:
        raise ValueError(f"{bad}: an empty entry; write {GPU_SPEC_HELP}")
    kind, sep, count_text = part.partition(":")
    kind = kind.strip()
    if sep:
        count_text = count_text.strip()
        if not count_text.isdigit():
            raise ValueError(f"{bad}: the count after ':' in {part!r} must be a whole number, as in H100:2")
        count = int(count_text)
    elif kind.isdigit():
        kind, count = "", int(kind)
    else:
        count = 1
    if not 1 <= count <= MAX_GPUS:
        raise ValueError(f"{bad}: {part!r} asks for {count} GPUs; ask for 1 to {MAX_GPUS}")
    if kind.lower() in ("", "any"):
        return GpuRequest(None, count)
    if kind.lower() == "mixed":
        return GpuRequest(None, count, mixed=True)
    if not GPU_TYPE_RE.fullmatch(kind):
        raise ValueError(f"{bad}: {kind!r} is not a GPU type; write {GPU_SPEC_HELP}")
    return GpuRequest(kind.upper(), count)


def format_gpu_spec(requests: tuple[GpuRequest, ...]) -> str | None:
    """The canonical text of a parsed spec (None for no GPU): equal specs, equal text."""
    return ",".join(str(r) for r in requests) or None


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value


def check_requirements(raw: Any) -> dict[str, Any]:
    """A registration's ``requirements``, checked and in canonical form (absent = default)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RegistrationError(f"'requirements' must be an object with some of {sorted(REQUIREMENT_FIELDS)}")
    unknown = set(raw) - REQUIREMENT_FIELDS
    if unknown:
        raise RegistrationError(f"unknown requirements {sorted(unknown)}; allowed: {sorted(REQUIREMENT_FIELDS)}")
    out: dict[str, Any] = {}
    try:
        if raw.get("gpu") is not None:
            gpu = format_gpu_spec(parse_gpu_spec(raw["gpu"]))
            if gpu:
                out["gpu"] = gpu
        for name in ("min_workers", "max_workers"):
            if raw.get(name) is not None:
                out[name] = _whole(f"--{name.replace('_', '-')}", raw[name], 0 if name == "min_workers" else 1, MAX_WORKERS_LIMIT)
        if raw.get("concurrency") is not None:
            out["concurrency"] = _whole("--concurrency", raw["concurrency"], 1, MAX_CONCURRENCY)
        if "min_workers" in out and "max_workers" in out and out["min_workers"] > out["max_workers"]:
            raise ValueError(f"--min-workers ({out['min_workers']}) is more than --max-workers ({out['max_workers']})")
        window = raw.get("scaledown_window")
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, float)) or not math.isfinite(window) \
                    or not 0 < window <= MAX_SCALEDOWN_WINDOW:
                raise ValueError(f"--scaledown-window must be a number of seconds above 0 and at most "
                                 f"{MAX_SCALEDOWN_WINDOW:g} (7 days), got {window!r}")
            out["scaledown_window"] = float(window)
        kernel = raw.get("kernel")
        if kernel is not None:
            if not isinstance(kernel, str) or not re.fullmatch(r"[A-Za-z0-9._\-]{1,128}", kernel):
                raise ValueError(f"--kernel must be a kernelspec name such as python3, got {kernel!r}")
            out["kernel"] = kernel
        env = raw.get("env")
        if env:
            out["env"] = check_env(env)
    except ValueError as e:
        raise RegistrationError(str(e)) from None
    return out


def check_env(env: Any) -> dict[str, str]:
    if not isinstance(env, dict):
        raise ValueError("--env must be KEY=VALUE pairs (a dict of strings)")
    if len(env) > 256:
        raise ValueError("--env may set at most 256 variables")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise ValueError(f"--env: {key!r} is not an environment variable name (letters, digits, _)")
        if key in RESERVED_ENV:
            raise ValueError(f"--env: {key} is set by jupyter-stream for each worker (use --gpu to choose GPUs)")
        if not isinstance(value, str) or "\x00" in value or len(value) > 32768:
            raise ValueError(f"--env: the value of {key} must be a string without NUL, of at most 32768 characters")
    return dict(sorted(env.items()))


def env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``--env KEY=VALUE`` options (repeatable) as a dict."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def requirement_fields(*, gpu: Any = None, min_workers: int | None = None, max_workers: int | None = None,
                       scaledown_window: float | None = None, kernel: str | None = None,
                       env: dict[str, str] | None = None, concurrency: int | None = None) -> dict[str, Any]:
    """The ``requirements`` field of a registration from the options a user gave,
    checked here so that a mistake fails in the cell, before anything is sent."""
    given = {"gpu": gpu, "min_workers": min_workers, "max_workers": max_workers,
             "scaledown_window": scaledown_window, "kernel": kernel, "env": env, "concurrency": concurrency}
    try:
        return check_requirements({k: v for k, v in given.items() if v is not None})
    except RegistrationError as e:
        raise ValueError(str(e)) from None
