"""Worker kernels from a real Jupyter Kernel Gateway (issue 21): the core cases of the
endpoint, function and class suites on gateway workers, a gateway kernel killed mid-map,
the gateway itself killed mid-stream, idle culling, GPU specs mapped onto the gateway's
kernelspecs, and the errors a user sees when the gateway is unreachable, refuses the token,
lacks a kernelspec or is full. Last, without a server: which configuration the workers'
gateway takes, and the transport of gateway pools."""

import concurrent.futures
import os
import signal
import time

import httpx
import pytest

import jupyter_stream
from jupyter_stream.client.classes import register_class
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function
from jupyter_stream.pytest_plugin import KernelGateway, free_port

# the gateway relays at any rate (jupyter-server's default drops IOPub messages above 1,000/s)
GATEWAY_OPTIONS = ["--ZMQChannelsWebsocketConnection.limit_rate=False", "--JupyterWebsocketPersonality.list_kernels=True"]


@pytest.fixture(scope="module")
def gateway():
    gateway = KernelGateway(GATEWAY_OPTIONS, kernelspecs={"python3-h100": {"SPEC": "h100"}}).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def server(gateway, jstream_start_server):
    server = jstream_start_server([
        *gateway.options_for_server,
        "--JupyterStream.min_workers=1", "--JupyterStream.max_workers=3", "--JupyterStream.worker_poll_interval=0.2",
        "--WorkerGateway.gpus=NVIDIA H100 80GB HBM3", "--WorkerGateway.gpus=NVIDIA H100 80GB HBM3",
        "--WorkerGateway.gpu_kernelspecs={'H100': 'python3-h100'}",
    ])
    server.wait_for_workers(1)
    return server


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def whoami():
    import os

    return {"pid": os.getpid(), "ppid": os.getppid(), "spec": os.environ.get("SPEC"),
            "gpus": os.environ.get("KERNEL_GPUS"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_workers_are_the_gateways_kernels(server, gateway):
    workers = server.wait_for_workers(1)
    assert {(w["source"], w["transport"]) for w in workers} == {("gateway", "channels")}
    pool = server.workers()["pools"][0]
    assert pool["source"] == "gateway" and pool["gateway"] == gateway.url
    me = register_function(whoami, connection=server.connection).remote()
    assert parent_pid(me["pid"]) == gateway.process.pid  # started by the gateway, not by this server
    assert me["cuda"] is None  # a gateway worker's GPUs are the gateway's to give
    assert len(gateway.kernels()) == len(server.workers()["workers"])  # each worker is one of the gateway's kernels


def test_a_stream_arrives_progressively(server):
    def ticks(n: int = 4):
        import time

        for i in range(n):
            yield f"data: {i} {time.time()}\n\n"
            time.sleep(0.3)

    register_endpoint(ticks, connection=server.connection)
    seen = []
    with httpx.stream("GET", server.url + "stream/ticks", headers=server.headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append((time.time(), float(line.split()[2])))
    assert len(seen) == 4
    assert seen[-1][0] - seen[0][0] > 0.6  # the first event came long before the last was made
    assert all(arrived - made < 0.25 for arrived, made in seen)


def test_every_call_form(server):
    def square(x: int) -> int:
        return x * x

    def add(a: int, b: int) -> int:
        return a + b

    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    f = register_function(square, connection=server.connection)
    assert f.remote(9) == 81
    assert list(f.map(range(100))) == [x * x for x in range(100)]
    assert list(register_function(add, connection=server.connection).starmap([(1, 2), (3, 4)])) == [3, 7]
    assert f.spawn(5).get() == 25
    with pytest.raises(ValueError, match="bad 3"):
        register_function(boom, connection=server.connection).remote(3)


def test_nested_calls_from_a_gateway_worker(server):
    """The worker reaches this server with the environment its comm brought (a gateway
    passes on only KERNEL_ variables)."""

    def double(x: int) -> int:
        return 2 * x

    inner = register_function(double, connection=server.connection)

    def outer(x: int) -> int:
        return inner.remote(x) + 1

    assert register_function(outer, connection=server.connection).remote(20) == 41


def test_a_class_enters_once_and_streams_concurrently(server, tmp_path):
    class Echo:
        @jupyter_stream.enter
        def load(self):
            import os

            self.pid = os.getpid()
            self.loads = getattr(type(self), "loads", 0) + 1
            type(self).loads = self.loads

        @jupyter_stream.method
        def who(self) -> tuple:
            return self.pid, self.loads

        @jupyter_stream.endpoint(media_type="text/event-stream")
        def talk(self, n: int = 3):
            import time

            for i in range(n):
                yield f"data: {i}\n\n"
                time.sleep(0.2)

    served = register_class(Echo, connection=server.connection, concurrency=8)()
    first = served.who.remote()
    assert served.who.remote() == first and first[1] == 1
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: server.get("stream/Echo.talk?n=3").text, range(8)))
    assert bodies == ["data: 0\n\ndata: 1\n\ndata: 2\n\n"] * 8
    assert time.monotonic() - started < 3.0  # eight streams at once on one worker, not one after another


def test_a_client_that_leaves_ends_the_generator(server, tmp_path):
    marker = str(tmp_path / "finally")

    def endless():
        import time

        try:
            while True:
                yield "data: x\n\n"
                time.sleep(0.05)
        finally:
            open(marker, "w").close()

    register_endpoint(endless, connection=server.connection)
    with httpx.stream("GET", server.url + "stream/endless", headers=server.headers, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data"):
                break
    deadline = time.monotonic() + 5
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "the generator's finally did not run after its client left"
        time.sleep(0.05)
    assert server.wait_until_idle(5.0)


def test_a_killed_gateway_kernel_loses_no_map_item(server):
    def slow(x: int) -> int:
        import time

        time.sleep(0.001)
        return x

    f = register_function(slow, connection=server.connection, min_workers=2, max_workers=2)
    assert f.remote(0) == 0
    victim = None
    results = []
    for i, value in enumerate(f.map(range(3000))):
        results.append(value)
        if i == 300 and victim is None:
            pool = next(p for p in server.workers()["pools"] if "slow" in p["functions"])
            victim = next(w["pid"] for w in pool["workers"] if w["alive"])
            os.kill(victim, signal.SIGKILL)
    assert sorted(results) == list(range(3000))  # every item exactly once
    assert victim is not None and victim not in {w["pid"] for w in server.workers()["workers"]}


def test_an_endpoint_whose_gateway_kernel_dies_ends_with_an_error_event(server):
    def dies():
        import os

        yield f"data: {os.getpid()}\n\n"
        import time

        time.sleep(30)
        yield "data: never\n\n"

    register_endpoint(dies, connection=server.connection)
    with httpx.stream("GET", server.url + "stream/dies", headers=server.headers, timeout=30) as r:
        lines = r.iter_lines()
        pid = int(next(line for line in lines if line.startswith("data: ")).split()[1])
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = "\n".join(lines)
    assert "event: error" in rest and "WorkerDied" in rest
    assert time.monotonic() - killed < 5.0


def test_gpu_specs_map_to_the_gateways_kernelspecs(server):
    f = register_function(whoami, connection=server.connection, gpu="H100:2")
    me = f.remote()
    assert me["spec"] == "h100" and me["gpus"] == "2"
    pool = next(p for p in server.workers()["pools"] if "whoami" in p["functions"] and p["gpu"])
    assert pool["source"] == "gateway" and [g["name"] for g in pool["workers"][0]["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    with pytest.raises(Exception, match="offers 2"):
        register_function(whoami, name="too_many", connection=server.connection, gpu="H100:4")


def test_an_unknown_kernelspec_is_named_with_what_the_gateway_has(server):
    f = register_function(whoami, name="nokernel", connection=server.connection, kernel="no-such-spec")
    with pytest.raises(Exception) as info:
        f.remote()
    message = str(info.value)
    assert "no kernelspec named 'no-such-spec'" in message and "python3-h100" in message and "127.0.0.1" in message


def test_idle_culling_by_the_gateway_is_survived(jstream_start_server):
    """A gateway culls kernels idle for its timeout, connected or not; this server's pings
    (every poll) count as activity, so here they are further apart than the timeout."""
    gateway = KernelGateway([*GATEWAY_OPTIONS, "--MappingKernelManager.cull_idle_timeout=1",
                             "--MappingKernelManager.cull_interval=1", "--MappingKernelManager.cull_connected=True"]).start()
    try:
        server = jstream_start_server([*gateway.options_for_server, "--JupyterStream.min_workers=1",
                                       "--JupyterStream.worker_poll_interval=4"])
        f = register_function(whoami, connection=server.connection)
        first = f.remote()["pid"]
        deadline = time.monotonic() + 20
        while first in {w["pid"] for w in server.workers()["workers"]}:
            assert time.monotonic() < deadline, "the culled worker was not noticed"
            time.sleep(0.2)
        assert f.remote()["pid"] != first  # a new kernel from the gateway serves the next call
        assert "culling" in gateway.log().lower()
    finally:
        gateway.stop()


def test_a_wrong_token_and_an_unreachable_gateway_say_so_and_recover(jstream_start_server):
    port = free_port()
    server = jstream_start_server([f"--JupyterStream.worker_gateway_url=http://127.0.0.1:{port}",
                                   "--WorkerGateway.auth_token=the-token", "--JupyterStream.min_workers=0",
                                   "--JupyterStream.worker_poll_interval=0.2", "--WorkerGateway.connect_timeout=2"])
    f = register_function(whoami, connection=server.connection)
    with pytest.raises(Exception) as info:
        f.remote()
    assert f"the worker gateway at http://127.0.0.1:{port} cannot be reached" in str(info.value)
    assert "worker_gateway_url" in str(info.value)
    assert "cannot be reached" in server.log()

    wrong = KernelGateway(GATEWAY_OPTIONS, port=port, token="not-the-token").start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the pool backs off between tries: the next call that comes after one says why
            try:
                f.remote()
            except Exception as exc:  # noqa: BLE001
                if "refused the token" in str(exc):
                    assert "c.WorkerGateway.auth_token" in str(exc)
                    break
            assert time.monotonic() < deadline, "the wrong token was never named"
            time.sleep(0.5)
    finally:
        wrong.stop()

    right = KernelGateway(GATEWAY_OPTIONS, port=port, token="the-token").start()
    try:
        deadline = time.monotonic() + 90
        while True:  # calls recover by themselves once the gateway is back
            try:
                assert parent_pid(f.remote()["pid"]) == right.process.pid
                break
            except Exception:  # noqa: BLE001
                assert time.monotonic() < deadline, f"calls did not recover:\n{server.log()[-3000:]}"
                time.sleep(0.5)
    finally:
        right.stop()


def test_a_full_gateway_says_it_is_at_its_kernel_limit(jstream_start_server):
    gateway = KernelGateway([*GATEWAY_OPTIONS, "--KernelGatewayApp.max_kernels=1"]).start()
    try:
        server = jstream_start_server([*gateway.options_for_server, "--JupyterStream.min_workers=1",
                                       "--JupyterStream.worker_poll_interval=0.2"])
        server.wait_for_workers(1)
        other = register_function(whoami, name="elsewhere", connection=server.connection, env={"WHERE": "x"})
        with pytest.raises(Exception, match="at its kernel limit") as info:
            other.remote()
        assert "max_kernels" in str(info.value)
    finally:
        gateway.stop()


def test_a_gateway_that_drops_messages_ends_the_stream_and_says_how_to_fix_it(jstream_start_server):
    """jupyter-server's IOPub rate limit (on by default in a gateway) drops a kernel's
    messages past its rate: a stream must not go on with holes in it."""
    gateway = KernelGateway(["--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=20",
                             "--ZMQChannelsWebsocketConnection.rate_limit_window=1"]).start()
    try:
        server = jstream_start_server([*gateway.options_for_server, "--JupyterStream.min_workers=1",
                                       "--JupyterStream.worker_poll_interval=0.2"])

        def chatty():
            import time

            for i in range(400):
                yield f"data: {i}\n\n"
                time.sleep(0.005)

        register_endpoint(chatty, connection=server.connection)
        body = server.get("stream/chatty").text
        assert "event: error" in body and "limit_rate=False" in body
        assert "IOPub message rate exceeded" in server.log()
        f = register_function(whoami, connection=server.connection)
        assert f.remote()["pid"]  # a fresh worker serves the next call
    finally:
        gateway.stop()


def test_idle_gateway_workers_scale_down(server, gateway):
    f = register_function(whoami, name="scales", connection=server.connection, env={"POOL": "scales"},
                          scaledown_window=1)
    pid = f.remote()["pid"]
    assert len(gateway.kernels()) == len(server.workers()["workers"])
    deadline = time.monotonic() + 15
    while pid in {w["pid"] for w in server.workers()["workers"]}:
        assert time.monotonic() < deadline, "the idle gateway worker was not stopped"
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while len(gateway.kernels()) != len(server.workers()["workers"]):  # and the gateway shut its kernel down
        assert time.monotonic() < deadline, (gateway.kernels(), server.workers()["workers"])
        time.sleep(0.2)


def test_workers_follow_the_servers_own_gateway(gateway, jstream_start_server):
    """A server run with --gateway-url (its notebook kernels there) starts its workers there too."""
    server = jstream_start_server([f"--GatewayClient.url={gateway.url}", f"--GatewayClient.auth_token={gateway.token}",
                                   "--JupyterStream.min_workers=1"])
    workers = server.wait_for_workers(1)
    assert {w["source"] for w in workers} == {"gateway"}
    assert parent_pid(register_function(whoami, connection=server.connection).remote()["pid"]) == gateway.process.pid


def test_a_gateway_killed_mid_stream_ends_the_stream_with_an_error_and_calls_recover(jstream_start_server):
    """The worker's WebSocket drops with its gateway (SIGKILL): the stream ends at once with
    an error event, and once a gateway is back on the same port with the same token, calls
    are served by its kernels. A gateway and a server of its own (the others' are untouched).
    The server asks for worker_messages=zmq, which gateway workers cannot have: they fall
    back to the channels and the log says so once."""
    gateway = KernelGateway(GATEWAY_OPTIONS).start()
    again = None
    victim = None
    try:
        server = jstream_start_server([*gateway.options_for_server, "--JupyterStream.min_workers=1",
                                       "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.worker_messages=zmq"])
        assert {w["transport"] for w in server.wait_for_workers(1)} == {"channels"}
        assert server.log().count("are reached through their channels") == 1

        def waits():
            import os

            yield f"data: {os.getpid()}\n\n"
            import time

            time.sleep(30)
            yield "data: never\n\n"

        register_endpoint(waits, connection=server.connection)
        # no event for 10 s (heartbeats come every 15 s) fails the test instead of hanging it
        with httpx.stream("GET", server.url + "stream/waits", headers=server.headers,
                          timeout=httpx.Timeout(30, read=10)) as r:
            lines = r.iter_lines()
            victim = int(next(line for line in lines if line.startswith("data: ")).split()[1])
            assert parent_pid(victim) == gateway.process.pid
            killed = time.monotonic()
            gateway.process.kill()
            gateway.process.wait()
            rest = "\n".join(lines)
        assert "event: error" in rest and "WorkerDied" in rest, rest
        assert time.monotonic() - killed < 5.0

        again = KernelGateway(GATEWAY_OPTIONS, port=gateway.port, token=gateway.token).start()
        deadline = time.monotonic() + 90  # the pool retries its starts with a backoff (2, 4, 8 ... s)
        while not [w for w in server.workers()["workers"] if w["alive"] and w["pid"] != victim]:
            assert time.monotonic() < deadline, f"no worker from the restarted gateway:\n{server.log()[-3000:]}"
            time.sleep(0.2)
        me = register_function(whoami, connection=server.connection).remote()  # the next call is served
        assert parent_pid(me["pid"]) == again.process.pid
    finally:
        for g in (again, gateway):
            if g is not None:
                g.stop()
        if victim is not None:  # the killed gateway's kernel (ipykernel also exits when its parent does)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- how the workers' gateway is configured (no server, no gateway) -----------------------------

GATEWAY_ENV = ("JUPYTER_GATEWAY_URL", "JUPYTER_GATEWAY_AUTH_TOKEN", "JUPYTER_GATEWAY_HEADERS", "JUPYTER_GATEWAY_CLIENT_CERT")


def worker_gateway_of(config, worker_gateway_url="", server_gateway_url=None):
    """The `WorkerGateway` a server with `config` builds (`JupyterStream.make_worker_gateway`),
    its own gateway (the server's ``--gateway-url``) at `server_gateway_url`."""
    from types import SimpleNamespace

    from jupyter_server.gateway.gateway_client import GatewayClient
    from traitlets.config import LoggingConfigurable

    from jupyter_stream.server.app import JupyterStream

    serverapp = LoggingConfigurable(config=config)
    serverapp.gateway_config = GatewayClient(parent=serverapp, **({"url": server_gateway_url} if server_gateway_url else {}))
    app = SimpleNamespace(serverapp=serverapp, worker_gateway_url=worker_gateway_url, workers_follow_gateway=True)
    return JupyterStream.make_worker_gateway(app)


def test_the_servers_gateway_options_never_reach_a_worker_gateway_of_its_own(monkeypatch):
    """G1: c.GatewayClient.* (the server's own gateway: its token, headers, certificates) must
    not configure a separate worker gateway, though WorkerGateway subclasses GatewayClient."""
    from traitlets.config import Config

    for var in GATEWAY_ENV:
        monkeypatch.delenv(var, raising=False)
    config = Config()
    config.GatewayClient.url = "http://a:1"
    config.GatewayClient.auth_token = "server-token"
    config.GatewayClient.headers = '{"X-Server": "a"}'
    config.GatewayClient.client_cert = "/server/cert.pem"
    config.WorkerGateway.request_timeout = 7.0
    gateway = worker_gateway_of(config, worker_gateway_url="http://b:2", server_gateway_url="http://a:1")
    assert gateway.url == "http://b:2"
    assert gateway.auth_token == ""  # GatewayClient's default, not the server gateway's token
    assert gateway.headers == "{}" and gateway.client_cert is None
    assert gateway.request_timeout == 7.0  # its own section applies
    assert "server-token" not in repr(gateway.load_connection_args(headers={}))
    config.WorkerGateway.auth_token = "worker-token"
    assert worker_gateway_of(config, worker_gateway_url="http://b:2").auth_token == "worker-token"
    # c.WorkerGateway.url works as worker_gateway_url does
    config.WorkerGateway.url = "http://c:3"
    assert worker_gateway_of(config).url == "http://c:3"


def test_workers_that_follow_the_servers_gateway_take_its_options(monkeypatch):
    """With workers_follow_gateway (and no worker gateway of their own) they get the server's
    gateway options, unless c.WorkerGateway sets one."""
    from traitlets.config import Config

    for var in GATEWAY_ENV:
        monkeypatch.delenv(var, raising=False)
    config = Config()
    config.GatewayClient.auth_token = "server-token"
    config.GatewayClient.headers = '{"X-Server": "a"}'
    gateway = worker_gateway_of(config, server_gateway_url="http://a:1")
    assert (gateway.url, gateway.auth_token, gateway.headers) == ("http://a:1", "server-token", '{"X-Server": "a"}')
    config.WorkerGateway.auth_token = "worker-token"
    assert worker_gateway_of(config, server_gateway_url="http://a:1").auth_token == "worker-token"
    assert worker_gateway_of(Config()) is None  # no gateway anywhere: workers on this machine


@pytest.mark.parametrize("mode", ["direct", "zmq"])
def test_direct_or_zmq_worker_messages_fall_back_to_channels_on_gateway_pools(mode):
    """G4: gateway kernels have no ZMQ sockets here; asking for 'direct' or 'zmq' must not
    fail every gateway worker's start. Local pools keep the mode asked for."""
    from jupyter_stream.server.gateway import GatewayWorkerClient, WorkerGateway
    from jupyter_stream.server.pool import WorkerPool
    from jupyter_stream.server.transports import ChannelTransport, transport_class

    gateway = WorkerGateway(url="http://b:2")
    pool = WorkerPool(min_workers=0, worker_messages=mode, gateway=gateway)
    assert pool.worker_messages == "channels"
    assert transport_class(GatewayWorkerClient(gateway, "k"), pool.worker_messages) is ChannelTransport
    assert WorkerPool(min_workers=0, worker_messages=mode).worker_messages == mode
