"""notebooks/llm_streaming.ipynb: a character-level language model trained in the notebook,
served by a `%%stream_class` whose endpoints stream tokens as they are sampled; read with
curl (SSE) and with the `openai` package's client (an ``openai=True`` endpoint)."""

import json
import subprocess
import time

import openai
from test_notebook import serve


def sse_events(text):
    """(event, data) pairs of an SSE body."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append((fields.get("event", "message"), fields["data"]))
    return events


def test_serve_llm_streaming_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the notebook saves its model
    token = "servetoken"
    started = time.monotonic()
    with serve("llm_streaming.ipynb", tmp_path, token) as (out, base, headers):
        took = time.monotonic() - started
        assert "serving 2 endpoint(s)" in out and "Traceback" not in out, out
        assert took < 60, f"the notebook took {took:.0f} s to serve"
        for name in ("CharLM.stream", "CharLM.chat"):
            assert f"curl --no-buffer -H 'Authorization: token {token}' {base}{name}" in out, out
        assert (tmp_path / "jupyter-stream-llm" / "charlm.json").is_file()

        # curl: one SSE event per token, each arriving as it is sampled (40 tokens, 50 ms apart)
        url = base + "CharLM.stream?prompt=Shall%20I%20compare&max_tokens=40&temperature=0.7&delay=0.05"
        curl = subprocess.Popen(["curl", "--no-buffer", "-sS", "-H", f"Authorization: token {token}", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        body, arrivals = [], []
        for line in curl.stdout:
            body.append(line)
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
        assert curl.wait(30) == 0, curl.stderr.read()
        events = sse_events("".join(body))
        tokens = [json.loads(data)["token"] for kind, data in events if kind == "message"]
        assert len(tokens) == 40 and all(isinstance(t, str) and len(t) == 1 for t in tokens), events
        assert "".join(tokens).strip()
        assert events[-1][0] == "done" and json.loads(events[-1][1])["tokens"] == 40
        assert arrivals[-1] - arrivals[0] > 1, "the tokens arrived all at once, not as they were sampled"

        # curl, the way the README's users would paste it: defaults, no parameters
        done = subprocess.run(["curl", "--no-buffer", "-sS", "-H", f"Authorization: token {token}", base + "CharLM.stream"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert len([e for e in sse_events(done.stdout) if e[0] == "message"]) == 64

        # the openai client, streaming: one delta per token, then the end
        client = openai.OpenAI(base_url=base + "CharLM.chat/v1", api_key=token, max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["CharLM.chat"]
        messages = [{"role": "system", "content": "You are a sonneteer."}, {"role": "user", "content": "Devouring Time,"}]
        chunks = list(client.chat.completions.create(model="CharLM.chat", messages=messages, max_tokens=30, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert len(deltas) >= 5, deltas  # several pieces, not one block at the end
        assert len("".join(deltas)) == 30 and "".join(deltas).strip()
        assert chunks[-1].choices[0].finish_reason == "stop"

        # ... and one completion
        reply = client.chat.completions.create(model="CharLM.chat", messages=messages, max_tokens=25, temperature=0.5)
        assert reply.model == "CharLM.chat" and reply.choices[0].message.role == "assistant"
        assert len(reply.choices[0].message.content) == 25 and reply.choices[0].message.content.strip()

        # the plain endpoint of the same method: the text itself
        done = subprocess.run(["curl", "--no-buffer", "-sS", "-H", f"Authorization: token {token}",
                               "-H", "Content-Type: application/json", "-d", json.dumps({"messages": messages, "max_tokens": 12}),
                               base + "CharLM.chat"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and len(done.stdout) == 12, done
