"""scripts/vllm_lane.py's HTTP side, against a stand-in for ``vllm serve`` (the lane itself runs
the real one in CI): the request is a chat completion as users' clients send it, the answer's
ids and logprobs are read back, and the server and the engine process it started are stopped,
whether the block ends normally or by an error."""

import base64
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from vllm_lane import VLLMServer, chat_answer, chat_request  # noqa: E402

# Stands in for the venv's `vllm` command: answers /health once listening, records each chat
# request and answers it as vLLM 0.32 does (ids with return_token_ids / return_tokens_as_token_ids),
# and starts a child process that lingers, as vLLM's engine process would.
FAKE_VLLM = """#!{python}
import http.server, json, os, subprocess, sys

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
record = os.environ["FAKE_VLLM_RECORD"]
with open(record + ".pids", "w") as f:
    json.dump({{"server": os.getpid(), "engine": engine.pid, "args": args}}, f)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(record, "a") as f:
            f.write(json.dumps({{"path": self.path, "body": body}}) + "\\n")
        steps = [{{"token": f"token_id:{{t}}", "logprob": -0.5 * t, "top_logprobs": []}}
                 for t in (7, 3)]
        answer = {{"prompt_token_ids": [1, 2, 5],
                  "choices": [{{"token_ids": [7, 3], "logprobs": {{"content": steps}}}}]}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def fake_venv(tmp_path, monkeypatch):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    vllm = bin_dir / "vllm"
    vllm.write_text(FAKE_VLLM.format(python=sys.executable))
    vllm.chmod(0o755)
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return bin_dir / "python", record


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped by its new parent counts)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_a_chat_request_with_an_image_is_answered_with_ids_and_the_server_stopped(
    fake_venv, tmp_path
):
    python, record = fake_venv
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with VLLMServer(python, tmp_path / "ckpt", tmp_path / "serve.log", name="m") as server:
        assert server.wait_ready(timeout=60) > 0
        answer = chat_answer(server.chat(chat_request("What is red here?", image, 8)))
    assert answer == {"prompt_ids": [1, 2, 5], "tokens": [7, 3], "logprobs": [-3.5, -1.5]}
    (sent,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert sent["path"] == "/v1/chat/completions"
    body = sent["body"]
    (message,) = body["messages"]
    assert message["role"] == "user"
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    assert message["content"] == [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": "What is red here?"},
    ]
    assert body["model"] == "m" and body["temperature"] == 0 and body["max_tokens"] == 8
    assert body["logprobs"] and body["return_tokens_as_token_ids"] and body["return_token_ids"]
    started = json.loads(Path(f"{record}.pids").read_text())
    args = started["args"]
    assert args[:2] == ["serve", str(tmp_path / "ckpt")]
    assert args[args.index("--dtype") + 1] == "float32"
    assert gone(started["server"]) and gone(started["engine"])


def test_the_server_is_stopped_when_the_block_fails(fake_venv, tmp_path):
    python, record = fake_venv
    with (
        pytest.raises(RuntimeError),
        VLLMServer(python, tmp_path / "ckpt", tmp_path / "serve.log") as server,
    ):
        server.wait_ready(timeout=60)
        raise RuntimeError("a comparison failed")
    started = json.loads(Path(f"{record}.pids").read_text())
    assert gone(started["server"]) and gone(started["engine"])


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    vllm = bin_dir / "vllm"
    vllm.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('PackageNotFoundError: vllm')\n")
    vllm.chmod(0o755)
    with (
        pytest.raises(SystemExit, match="exited \\(1\\)(.|\\n)*PackageNotFoundError"),
        VLLMServer(bin_dir / "python", tmp_path, tmp_path / "serve.log") as server,
    ):
        server.wait_ready(timeout=60)
    assert os.path.exists(tmp_path / "serve.log")
