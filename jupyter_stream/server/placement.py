"""Which pool runs a function, and where a new worker kernel may go.

Functions with the same requirements (kernel, GPU spec, environment) share a
`WorkerPool`; others get their own. The `Placement` owns every pool and decides each
kernel start: the server-wide `max_workers` caps all pools together, and a worker of a
GPU pool gets GPUs no other worker holds (`GpuInventory`). When the machine is full, an
idle worker of another pool is stopped to make room (the one holding a needed GPU, or any
idle one for the cap); otherwise the start waits until a worker stops or goes idle.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..requirements import GpuRequest, parse_gpu_spec
from .gpus import GpuInventory

if TYPE_CHECKING:
    from .kernels import WorkerKernel
    from .pool import WorkerPool

log = logging.getLogger("jupyter_stream")

DEFAULT_SCALEDOWN_WINDOW = 60.0


@dataclass(frozen=True)
class PoolKey:
    """What makes two functions' workers interchangeable."""

    kernel: str
    gpu: str | None
    env: tuple[tuple[str, str], ...]
    concurrency: int | None = None  # calls one kernel runs at once (None: the server's calls_per_worker)

    def describe(self) -> str:
        parts = [f"kernel {self.kernel}", f"gpu {self.gpu}" if self.gpu else "no GPU"]
        parts += [f"concurrency {self.concurrency}"] if self.concurrency else []
        parts += [f"env {', '.join(k for k, _ in self.env)}"] if self.env else []  # names only: values may be secrets
        return ", ".join(parts)


@dataclass(eq=False)
class Seat:
    """A worker kernel's place: counted against `max_workers` from the moment its start is
    decided until it has stopped, with the GPUs it holds meanwhile."""

    index: int
    pool: WorkerPool
    gpus: list[int]
    worker: WorkerKernel | None = None
    victims: list[WorkerKernel] = field(default_factory=list)
    #: started over the server-wide cap for a call from inside a worker: it serves such calls first
    over_cap: bool = False


class Placement:
    def __init__(self, *, max_workers: int, inventory: GpuInventory | None = None, default_kernel: str = "python3"):
        self.max_workers = max_workers
        self.inventory = inventory if inventory is not None else GpuInventory([])
        self.default_kernel = default_kernel
        self.pools: dict[PoolKey, WorkerPool] = {}
        self.seats: set[Seat] = set()
        self.blocked: set[WorkerPool] = set()  # pools with waiting calls that could not start a kernel
        self._counter = itertools.count(1)
        self._pool_numbers = itertools.count(1)
        self._secret = secrets.token_bytes(32)
        self.closed = False

    # -- pools ------------------------------------------------------------------------

    def key_for(self, requirements: dict[str, Any]) -> PoolKey:
        return PoolKey(requirements.get("kernel") or self.default_kernel, requirements.get("gpu"),
                       tuple(sorted((requirements.get("env") or {}).items())), requirements.get("concurrency"))

    def add_pool(self, pool: WorkerPool) -> None:
        pool.placement = self
        pool.number = next(self._pool_numbers)  # tells apart pools whose env differs only in values
        self.pools[pool.key] = pool

    def pool_for(self, requirements: dict[str, Any], make: Any) -> WorkerPool:
        """The pool for these requirements, made with `make(key)` the first time."""
        key = self.key_for(requirements)
        pool = self.pools.get(key)
        if pool is None:
            pool = make(key)
            self.add_pool(pool)
        return pool

    # -- starting kernels ----------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.seats)

    def reserve(self, pool: WorkerPool, over_max: bool = False, evict: bool = True, over_cap: bool = False) -> Seat | None:
        """A seat for one more kernel of `pool`, or None if it must wait. `over_max`: a
        replacement for a kernel that is being recycled (it may exceed the caps a moment).
        `over_cap`: for a call made from inside a worker whose caller holds a seat while it
        waits (the server-wide cap may be exceeded, the pool's own maximum and the GPUs
        not). `evict`: idle kernels of other pools may be stopped for it (for waiting
        calls, not for a pool's warm minimum, or two pools would keep stopping each
        other's)."""
        if self.closed or (not over_max and pool.full):
            return None
        victims: list[WorkerKernel] = []
        if not over_max and not over_cap and self.total >= self.max_workers:
            victim = self._idle_worker(exclude=pool) if evict else None
            if victim is None:
                self.blocked.add(pool)
                return None
            victims.append(victim)
        gpus: list[int] = []
        if pool.gpu:
            choice = self._choose_gpus(pool.gpu, pool, victims)
            if choice is None:
                self.blocked.add(pool)
                return None
            gpus, more = choice
            if more and not evict:
                return None
            victims += [v for v in more if v not in victims]
        for victim in victims:
            log.info("jupyter_stream: stopping idle %s (pid %s) of pool [%s] to make room for pool [%s]",
                     victim.name, victim.pid, victim.pool.key.describe(), pool.key.describe())
            victim.pool.evict(victim)
        if over_cap and self.total >= self.max_workers:
            log.info("jupyter_stream: starting a worker of pool [%s] over max_workers (%d): a call from inside a worker "
                     "waits for it, and its caller holds a seat meanwhile", pool.key.describe(), self.max_workers)
        seat = Seat(next(self._counter), pool, gpus, victims=victims,
                    over_cap=over_cap and not over_max and self.total >= self.max_workers)
        self.seats.add(seat)
        self.inventory.hold(gpus, seat)
        self.blocked.discard(pool)
        return seat

    def can_start(self, pool: WorkerPool) -> bool:
        """Whether `reserve` would find room for `pool` now (it changes nothing)."""
        if self.closed or pool.full:
            return False
        victims = []
        if self.total >= self.max_workers:
            victim = self._idle_worker(exclude=pool)
            if victim is None:
                return False
            victims.append(victim)
        return not pool.gpu or self._choose_gpus(pool.gpu, pool, victims, quiet=True) is not None

    def _idle_worker(self, exclude: WorkerPool, holding: set[int] | None = None) -> WorkerKernel | None:
        """An idle worker of another pool (one above its pool's minimum first)."""
        candidates = []
        for seat in self.seats:
            worker = seat.worker
            if worker is None or seat.pool is exclude or not worker.accepting or worker.load > 0:
                continue
            if holding is not None and not holding & set(seat.gpus):
                continue
            candidates.append((len(seat.pool.workers) <= seat.pool.min_workers, seat.pool.idle_since.get(worker, 0.0), worker))
        candidates.sort(key=lambda c: (c[0], c[1]))
        return candidates[0][2] if candidates else None

    def _choose_gpus(self, requests: tuple[GpuRequest, ...], pool: WorkerPool,
                     victims: list[WorkerKernel], quiet: bool = False) -> tuple[list[int], list[WorkerKernel]] | None:
        """Devices for one alternative of the spec, in order: free ones, else free ones plus
        those held by idle workers of other pools (only those whose GPUs are picked are
        stopped). `quiet`: a question only (`can_start`), nothing is logged."""
        inventory = self.inventory
        freed = {i for v in victims for i in self.seat_of(v).gpus} if victims else set()
        for request in requests:
            free = [d.index for d in inventory.matching(request) if d.index not in inventory.holders or d.index in freed]
            chosen = self._pick(request, free, quiet)
            if chosen is not None:
                return chosen, []
        for request in requests:
            chosen = [d.index for d in inventory.matching(request) if d.index not in inventory.holders or d.index in freed]
            more: list[WorkerKernel] = []
            while self._pick(request, chosen, True) is None:
                wanted = {d.index for d in inventory.matching(request)} - set(chosen)
                victim = self._idle_worker(exclude=pool, holding=wanted)
                if victim is None or victim in more:
                    break
                more.append(victim)
                chosen += sorted(set(self.seat_of(victim).gpus) & wanted)
            picked = self._pick(request, chosen, quiet)
            if picked is not None:
                return picked, [v for v in more if set(self.seat_of(v).gpus) & set(picked)]
        return None

    def _pick(self, request: GpuRequest, available: list[int], quiet: bool = False) -> list[int] | None:
        """`request.count` of the `available` devices, or None. Several devices of any kind
        are of one kind (the kind with most available first), unless the request is
        ``mixed`` or this machine has no kind with that many devices (then mixed, with a
        log line); until one kind has enough free, it waits."""
        if len(available) < request.count:
            return None
        if not request.one_kind:
            return sorted(available)[: request.count]
        by_name: dict[str, list[int]] = {}
        for index in sorted(available):
            by_name.setdefault(self.inventory.devices[index].name, []).append(index)
        best = max(by_name.values(), key=len)
        if len(best) >= request.count:
            return best[: request.count]
        if any(len(devices) >= request.count for devices in self.inventory.by_name().values()):
            return None  # one kind has enough devices: wait for them to be free
        chosen = sorted(available)[: request.count]
        if not quiet:
            log.info("jupyter_stream: no %d GPUs of one kind on this machine; giving %s mixed devices %s (ask for mixed:%d "
                     "to say so)", request.count, request, ", ".join(f"{i}: {self.inventory.devices[i].name}" for i in chosen),
                     request.count)
        return chosen

    def seat_of(self, worker: WorkerKernel) -> Seat:
        return next(seat for seat in self.seats if seat.worker is worker)

    def free(self, seat: Seat) -> None:
        """A kernel has stopped (or never started): its place and GPUs go to whoever waits."""
        if seat in self.seats:
            self.seats.discard(seat)
            self.inventory.release(seat)
            self.wake()

    def wake(self) -> None:
        """Let pools whose calls wait for room try again."""
        if self.closed:
            return
        for pool in list(self.blocked):
            self.blocked.discard(pool)
            pool.grow_for_waiters()

    async def shutdown(self) -> None:
        """Stop every pool's kernels (the server is stopping); nothing starts meanwhile."""
        self.closed = True
        await asyncio.gather(*(pool.shutdown() for pool in self.pools.values()), return_exceptions=True)

    # -- finding workers -------------------------------------------------------------------

    def pool_tag(self, key: PoolKey) -> str:
        """A short tag of a pool's whole key (env values included, not shown): the same
        for the same requirements while the server runs, different for others."""
        return hmac.new(self._secret, repr(key).encode(), "sha256").hexdigest()[:6]

    def worker_key(self, index: int) -> str:
        """What worker `index` shows to say it is that worker (only it has this in its env)."""
        return hmac.new(self._secret, str(index).encode(), "sha256").hexdigest()[:32]

    def worker_named(self, claim: str) -> WorkerKernel | None:
        """The live worker whose ``JUPYTER_STREAM_WORKER`` value is `claim`, or None."""
        index, _, key = claim.partition(":")
        if not index.isdigit() or not hmac.compare_digest(key, self.worker_key(int(index))):
            return None
        for pool in self.pools.values():
            for worker in pool.workers + pool.draining:
                if worker.index == int(index) and worker.alive:
                    return worker
        return None

    def info(self) -> dict[str, Any]:
        return {"max_workers": self.max_workers,
                "gpus": [{"index": d.index, "name": d.name, "uuid": d.uuid, "memory_total": d.memory_total,
                          "held_by": getattr(getattr(self.inventory.holders.get(d.index), "worker", None), "name", None)}
                         for d in self.inventory.devices],
                "simulated_gpus": self.inventory.simulated}


def gpu_requests(spec: str | None) -> tuple[GpuRequest, ...]:
    return parse_gpu_spec(spec) if spec else ()
