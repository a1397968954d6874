"""`jaxpaged serve`: a real server process on a free port, driven by OpenAI's client and plain HTTP.

SmolLM2 (the embedded model) serves the client tests; the `tiny` preset (random weights, token-id
prompts) serves the API key, the full queue and the shutdown, where text does not matter.
"""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn raises the signal again once it has shut down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, cache_dir, api_key: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        command = [sys.executable, "-m", "jaxpaged.models", "serve", "--port", str(self.port),
                   "--log-level", "warning", *args] + (["--api-key", api_key] if api_key else [])
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "JAXPAGED_CACHE_DIR": str(cache_dir)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the server did not come up in 300 s")

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json",
                                                                     **self.headers, **kwargs.pop("headers", {})},
                          timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#") and "{" not in line}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> int:
        """SIGTERM, then the exit status (the process killed if it hangs)."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.log.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The servers' weight and compilation caches: the tests' own, not the user's."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2_server(cache_dir):
    server = Server("--max-num-seqs", "32", "--num-blocks", "1024", "--max-model-len", "2048", "--no-warm-up",
                    cache_dir=cache_dir)
    yield server
    assert server.stop() in CLEAN_EXIT


@pytest.fixture(scope="module")
def client(smollm2_server):
    import openai

    return openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0)


def test_completions_chat_streaming_n_stop_and_logprobs_through_the_openai_client(client):
    free = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert text and free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 16
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = [chunk for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices]) > 1, "the text came in several chunks"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 16
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      stream=True)
    assert all(chunk.choices for chunk in plain), "usage comes only when asked for"

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a river."}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.id.startswith("chatcmpl-")
    parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                            {"type": "text", "text": "river."}]}],
        max_tokens=12, temperature=0)
    assert parts.choices[0].message.content == chat.choices[0].message.content, "text parts are joined"

    stop = text[4:8]
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"

    two = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2,
                                    seed=7)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 16
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices], "a seed gives the same samples"

    scored = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                       logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == scored.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 2 and chosen <= 0 and abs(chosen - max(top.values())) < 1e-5, "greedy takes the best"


@pytest.mark.slow
def test_32_concurrent_clients_get_what_each_gets_alone(client):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    alone = [ask(prompt) for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_a_client_that_goes_away_mid_stream_gives_its_blocks_back(smollm2_server):
    before = smollm2_server.metrics()
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", smollm2_server.url + "/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert len(received) >= 3
        assert smollm2_server.metrics()["jaxpaged_requests_running"] == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = smollm2_server.metrics()
        if now["jaxpaged_requests_running"] == 0 and now["jaxpaged_pool_used_blocks"] == before[
                "jaxpaged_pool_used_blocks"]:
            break
        time.sleep(0.2)
    assert now["jaxpaged_requests_running"] == 0, "the request was not aborted"
    assert now["jaxpaged_pool_used_blocks"] == before["jaxpaged_pool_used_blocks"]


@pytest.mark.parametrize("body, param, says", [
    ("{not json", None, "malformed JSON"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens", "valid integer"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, "max_tokens", "past the context"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n", "n must be"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "top_p must be"),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": [1, 10**9]}, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": "x", "logprobs": 100000}, "logprobs", "at most 20"),
    ({"model": MODEL, "prompt": "x", "n": 10**8}, "n", "at most 32"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop", "non-empty strings"),
    ({"model": "another-model", "prompt": "x"}, "model", "not served here"),
    ({"prompt": "x"}, "model", "Field required"),
])
def test_bad_input_is_a_400_naming_the_field_and_the_server_goes_on(smollm2_server, body, param, says):
    response = smollm2_server.post("/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"
    fine = smollm2_server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_goes_away_before_a_whole_answer_is_aborted_too(smollm2_server):
    before = smollm2_server.metrics()
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(smollm2_server.url + "/v1/completions", json=body, timeout=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = smollm2_server.metrics()
        if now["jaxpaged_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert now["jaxpaged_requests_running"] == 0, "the request was not aborted"
    assert now["jaxpaged_pool_used_blocks"] == before["jaxpaged_pool_used_blocks"]


def test_models_health_and_metrics(smollm2_server):
    assert httpx.get(smollm2_server.url + "/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(smollm2_server.url + "/health").json() == {"status": "ok"}
    metrics = smollm2_server.metrics()
    assert metrics["jaxpaged_pool_blocks"] == 1024
    assert metrics["jaxpaged_time_to_first_token_seconds_count"] >= 1


@pytest.mark.slow
def test_api_key_full_queue_and_shutdown_on_a_tiny_model(cache_dir):
    server = Server("--model", "tiny", "--max-num-seqs", "1", "--max-waiting", "1", "--num-blocks", "128",
                    "--max-num-batched-tokens", "32", "--shutdown-grace", "0", cache_dir=cache_dir, api_key="secret")
    try:
        warmed = server.metrics()["jaxpaged_device_programs"]
        assert "compiled 6 programs" in server.output() and warmed == 6, (
            "tiles of 32: prefill with and without the decode row, decode; greedy and sampled")
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
        assert server.post("/v1/completions", body, headers={"Authorization": ""}).status_code == 401
        assert server.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200, "health needs no key"
        lower = server.post("/v1/completions", body, headers={"Authorization": "bearer secret"})
        assert lower.status_code == 200, "the scheme's case does not matter"
        missing = httpx.get(server.url + "/v1/nothing", headers=server.headers)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
        ok = server.post("/v1/completions", body)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
        # (on the reference attention a request past 256 positions reads a longer bound: the long ones may compile)
        assert server.metrics()["jaxpaged_device_programs"] == warmed, "a short greedy request compiled nothing new"

        long = dict(body, max_tokens=1000, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # one row, one waiting place: the rest 503
            answers = list(pool.map(lambda _: server.post("/v1/completions", long), range(8)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 2 and codes[-1] == 503, codes  # at least the running one and the waiting one
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["Retry-After"] == "1" and answer.json()["error"]["type"] == "server_error"
            else:
                assert answer.json()["usage"]["completion_tokens"] == 1000

        long = dict(long, stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=long,
                          headers=server.headers, timeout=120) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]  # it ends: aborted after the grace
            assert time.monotonic() - start < 30
        assert server.stop() in CLEAN_EXIT
        assert rest[-1] == "data: [DONE]"
        last = [json.loads(line[5:]) for line in rest[:-1] if json.loads(line[5:])["choices"]][-1]
        assert last["choices"][0]["finish_reason"] == "abort"
    finally:
        server.stop()
