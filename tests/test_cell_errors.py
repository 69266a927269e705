"""What a notebook cell shows when the server refuses it: one readable line with the
server's message, not a traceback through our frames (issue 18.1). Against a real server
whose GPUs are simulated (two H100s and an A100), from a kernel it started."""

import textwrap

import pytest

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
MACHINE = f"this machine has 3: 0: {H100}, 1: {H100}, 2: {A100}"


@pytest.fixture(scope="module")
def kernel(jstream_start_server):
    server = jstream_start_server([
        *(f"--JupyterStream.simulated_gpus={name}" for name in (H100, H100, A100)),
        "--JupyterStream.min_workers=0", "--JupyterStream.worker_poll_interval=0.2",
    ])
    kernel = server.start_kernel()
    outputs, reply = kernel.execute("%load_ext jupyter_stream\nimport jupyter_stream")
    assert reply["status"] == "ok", kernel.text(outputs)
    yield kernel
    kernel.shutdown()


def error_lines(outputs):
    """The lines a person sees of a failed cell: stderr and the error's traceback."""
    lines = []
    for out in outputs:
        if out["type"] == "stream" and out["name"] == "stderr":
            lines += out["text"].splitlines()
        elif out["type"] == "error":
            lines += "\n".join(out["traceback"]).splitlines()
    return [line for line in lines if line.strip()]


def refused(kernel, cell):
    outputs, reply = kernel.execute(textwrap.dedent(cell).lstrip())
    assert reply["status"] == "error", outputs
    return error_lines(outputs)


CELLS = {
    "stream_function": "%%stream_function --gpu {spec}\ndef big():\n    return 1\n",
    "stream_endpoint": "%%stream_endpoint --gpu {spec}\ndef big():\n    yield 'x'\n",
    "stream_class": (
        "%%stream_class --gpu {spec}\nclass Big:\n    @jupyter_stream.method\n    def run(self):\n        return 1\n"
    ),
}


@pytest.mark.parametrize("magic", list(CELLS))
@pytest.mark.parametrize("spec", ["H100:3", "A10", "B200", "4"])
def test_a_gpu_spec_the_machine_cannot_meet_is_one_line(kernel, magic, spec):
    lines = refused(kernel, CELLS[magic].format(spec=spec))
    assert len(lines) <= 3, "\n".join(lines)
    text = "\n".join(lines)
    assert f"%%{magic}: " in text and f"no GPU here matches {spec.upper()}" in text and MACHINE in text, text
    assert "Traceback" not in text and "connection.py" not in text, text


def test_the_decorators_raise_a_registration_error_with_the_servers_message_first(kernel):
    outputs, reply = kernel.execute(textwrap.dedent(
        """
        from jupyter_stream.errors import RegistrationError

        def big():
            return 1

        for register in (jupyter_stream.function, jupyter_stream.endpoint):
            try:
                register(gpu="H100:3")(big)
            except RegistrationError as e:
                assert isinstance(e, ValueError) and e.status == 400, e
                print("refused:", e)
        """
    ))
    text = "".join(o.get("text", "") for o in outputs)
    assert reply["status"] == "ok", outputs
    refusals = text.splitlines()
    assert len(refusals) == 2, text
    for line in refusals:
        assert line.startswith("refused: bad registration: no GPU here matches H100:3; " + MACHINE), line


def test_other_refusals_in_a_cell_are_one_line(kernel):
    # an unknown endpoint
    lines = refused(kernel, "%stream_share nope\n")
    assert len(lines) == 1 and lines[0].startswith("UsageError: %stream_share: no endpoint named 'nope'"), lines
    # a share of an endpoint that was deleted since its handle was made
    outputs, reply = kernel.execute("%%stream_endpoint\ndef gone():\n    yield 'x'\n")
    assert reply["status"] == "ok", outputs
    kernel.execute("handle = gone\ngone.delete()")
    lines = refused(kernel, "%stream_share gone\n")
    assert len(lines) == 1 and "no endpoint named 'gone'" in lines[0], lines
    outputs, reply = kernel.execute(textwrap.dedent(
        """
        try:
            handle.share()
        except LookupError as e:
            print(type(e).__name__, "|", e)
        """
    ))
    assert "".join(o.get("text", "") for o in outputs).startswith("NotRegisteredError | no endpoint named 'gone'"), outputs
    # a kernelspec the server does not have, and options the server refuses
    lines = refused(kernel, "%%stream_function --kernel nope\ndef f():\n    return 1\n")
    assert len(lines) == 1 and "no kernelspec named 'nope'" in lines[0], lines
    lines = refused(kernel, "%%stream_endpoint --queue-timeout -1\ndef f():\n    yield 'x'\n")
    assert len(lines) == 1 and lines[0].startswith("UsageError: %%stream_endpoint: bad registration: ") and "queue" in lines[0], lines
