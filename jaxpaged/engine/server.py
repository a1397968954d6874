"""An OpenAI-compatible HTTP server on the engine (`jaxpaged serve`).

FastAPI on uvicorn: request bodies are validated against typed models (a wrong type is a 400 that
names the field, in OpenAI's error shape), a streamed answer is a plain async generator, and
uvicorn handles SIGINT and SIGTERM with a bounded graceful shutdown.

One thread runs the engine (`EngineLoop`): the engine is not thread-safe and its steps wait on the
device, so the HTTP handlers, on asyncio, never touch it; they send it commands (add, abort) through
a queue, and each request's outputs come back on an asyncio queue of its own, one `RequestOutput`
(everything so far) per step that produced tokens for it. Requests join the running batch at the
next step (continuous batching). A client that goes away aborts its request: its blocks return to
the pool at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import itertools
import json
import queue
import re
import threading
import time
from typing import Literal

import prometheus_client
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpaged.engine.detokenize import TextStream
from jaxpaged.engine.engine import Engine
from jaxpaged.engine.request import RequestOutput
from jaxpaged.engine.sampling import SamplingParams


class QueueFull(Exception):
    """The engine takes no more requests now: its waiting queue is at --max-waiting, or it is closing."""


class EngineLoop:
    """Runs an `Engine` on a thread of its own; asyncio handlers add and abort requests.

    Args:
      engine: the engine (only this loop's thread touches it once started).
      max_waiting: requests that may wait for admission; past it `add` raises QueueFull.
      on_finished: called on the engine's thread with each finished RequestOutput (metrics).
    """

    def __init__(self, engine: Engine, *, max_waiting: int = 256, on_finished=None):
        self.engine, self.max_waiting, self.on_finished = engine, max_waiting, on_finished
        self.stats = engine.stats()  # refreshed after every step: what /metrics reads
        self.failure: BaseException | None = None
        self.closed = False
        self._closing = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def add(self, prompt: str | list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queues a request. Returns its id and the queue its outputs arrive on (an exception instead,
        if the engine fails). Raises ValueError (bad input, naming the field) or QueueFull."""
        if self.failure is not None:
            raise RuntimeError(f"the engine failed: {self.failure}")
        request_id = str(next(self._ids))
        outputs: asyncio.Queue = asyncio.Queue()
        added = concurrent.futures.Future()
        with self._closing:  # queued before the stop command or not at all: the thread answers every add
            if self.closed:
                raise QueueFull("the server is shutting down")
            self._send(("add", request_id, prompt, params, asyncio.get_running_loop(), outputs, added))
        await asyncio.wrap_future(added)
        return request_id, outputs

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def close(self) -> None:
        """Aborts whatever still runs (its streams get an output with finish_reason "abort") and ends
        the thread; later requests are refused."""
        with self._closing:
            self.closed = True
            self._send(("stop",))

    def stop(self, timeout: float = 10.0) -> None:
        """close(), and waits for the thread."""
        self.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()
            while not self._commands.empty():
                command = self._commands.get()
                if command[0] == "stop":
                    self._abort_all()
                    return
                self._apply(command)
            if self.failure is not None or not self.engine.has_unfinished_requests():
                self.stats = self.engine.stats()
                self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as failure:  # noqa: BLE001 - every waiting handler gets it; no step runs again
                self.failure = failure
                for loop, stream in self._streams.values():
                    loop.call_soon_threadsafe(stream.put_nowait, failure)
                self._streams.clear()
                continue
            for output in outputs:
                self._deliver(output)
            self.stats = self.engine.stats()

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if command[1] in self.engine.requests:
                self.engine.abort_request(command[1])
            self._streams.pop(command[1], None)
            return
        _, request_id, prompt, params, loop, stream, added = command
        try:
            if self.failure is not None:
                raise RuntimeError(f"the engine failed: {self.failure}")
            scheduler = self.engine.scheduler
            free_rows = scheduler.max_num_seqs - len(scheduler.running)  # admitted at the next step
            if len(scheduler.waiting) - free_rows >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already")
            self.engine.add_request(request_id, prompt, params)
        except Exception as error:  # noqa: BLE001 - handed back to the handler that asked
            added.set_exception(error)
            return
        self._streams[request_id] = (loop, stream)
        added.set_result(None)

    def _deliver(self, output: RequestOutput) -> None:
        target = self._streams.get(output.request_id)
        if output.finished:
            self._streams.pop(output.request_id, None)
            if self.on_finished:
                self.on_finished(output)
        if target:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, output)

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            self._deliver(self.engine.abort_request(request_id))  # its last state, finish_reason "abort"


# -- the HTTP side: request bodies as OpenAI's (unknown fields ignored, known ones typed)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]

    def text(self) -> dict:
        """{"role", "content"} with the content's text parts joined."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take: OpenAI's fields, then vLLM's (top_k, min_p, ignore_eos)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = 0
    min_p: float = 0.0
    ignore_eos: bool = False


class CompletionBody(Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def build_app(loop: EngineLoop, model_name: str, *, api_key: str | None = None):
    """The FastAPI application over an EngineLoop (started and stopped with the app)."""
    tokenizer = loop.engine.tokenizer
    metrics = _Metrics()
    loop.on_finished = metrics.finished

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loop.start()
        yield
        loop.stop()

    def authorise(request: Request) -> None:
        """With an API key, every endpoint but /health wants `Authorization: Bearer KEY` (compared in
        constant time). A dependency, not a middleware: Starlette's middleware would hide a client's
        disconnect from the endpoint."""
        if api_key is None or request.url.path == "/health":
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise StarletteHTTPException(401, "a valid API key is needed: Authorization: Bearer <key>")

    app = FastAPI(title="jaxpaged", lifespan=lifespan, dependencies=[Depends(authorise)])

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, f"body: malformed JSON ({first['ctx'].get('error', 'invalid')})", None)
        field = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return _error(400, f"{field or 'body'}: {first['msg']}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        return _error(error.status_code, str(error.detail), None, kind)

    @app.get("/health")
    async def health():
        if loop.failure is not None:
            return _error(503, f"the engine failed: {loop.failure}", None, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "jaxpaged"}]}

    @app.get("/metrics")
    async def prometheus():
        metrics.update(loop.stats)
        return PlainTextResponse(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def serve(request: Request, body, prompt, params: SamplingParams, chat: bool):
        if body.model != model_name:
            return _error(400, f"model: {body.model!r} is not served here; this server serves {model_name!r}",
                          "model", code="model_not_found")
        try:
            request_id, outputs = await loop.add(prompt, params)
        except QueueFull as full:
            return _error(503, f"the server takes no more requests now: {full}; retry later", None, "server_error",
                          headers={"Retry-After": "1"})
        except ValueError as bad:
            return _error(400, str(bad), _field(str(bad)))
        except RuntimeError as failure:
            return _error(500, str(failure), None, "server_error")
        usage = body.stream_options is not None and body.stream_options.include_usage
        answer = _Answer(("chatcmpl-" if chat else "cmpl-") + request_id, model_name, chat, params, tokenizer,
                         usage_chunk=usage)
        if body.stream:
            return StreamingResponse(_stream(loop, request_id, outputs, answer), media_type="text/event-stream")
        output = await _last(loop, request, request_id, outputs)
        if output is None:
            return JSONResponse({}, status_code=499)  # the client left: nobody reads this
        if isinstance(output, Exception):
            return _error(500, f"the engine failed: {output}", None, "server_error")
        return answer.whole(output)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                return _error(400, "prompt: one prompt a request (a list of one string, a string or token ids)",
                              "prompt")
            prompt = prompt[0]
        try:
            params = _params(body, body.max_tokens, body.logprobs)
        except ValueError as bad:
            return _error(400, str(bad), _field(str(bad)))
        return await serve(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatBody):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return _error(400, "messages: this model has no chat template", "messages")
        prompt = tokenizer.apply_chat_template([m.text() for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        try:
            params = _params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        except ValueError as bad:
            return _error(400, str(bad), _field(str(bad)))
        return await serve(request, body, prompt, params, chat=True)

    return app


def _params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams (ValueError naming the field for a value out of range)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          min_p=body.min_p, seed=body.seed, max_tokens=16 if max_tokens is None else max_tokens,
                          stop=tuple(stop), ignore_eos=body.ignore_eos, logprobs=logprobs)


def _field(message: str) -> str | None:
    """The field a ValueError names: 'SamplingParams.top_p must ...' or 'max_tokens: ...'."""
    found = re.match(r"SamplingParams\.(\w+)|(\w+):", message)
    return (found.group(1) or found.group(2)) if found else None


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error", code=None,
           headers=None):
    """OpenAI's error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def _last(loop: EngineLoop, request, request_id: str, outputs: asyncio.Queue):
    """The request's final output, or None if the client went away first (the request is aborted)."""
    while True:
        try:
            output = await asyncio.wait_for(outputs.get(), timeout=0.5)
        except asyncio.TimeoutError:
            output = None
        if isinstance(output, Exception) or (output is not None and output.finished):
            return output
        if await request.is_disconnected():  # looked at every step too: a running request's outputs keep coming
            loop.abort(request_id)
            return None


async def _stream(loop: EngineLoop, request_id: str, outputs: asyncio.Queue, answer: _Answer):
    """Server-sent events: a chunk per step that produced text, the last with finish_reason and usage,
    then [DONE]. A client that goes away cancels this generator: the request is aborted."""
    finished = False
    try:
        while not finished:
            output = await outputs.get()
            if isinstance(output, Exception):
                yield _event({"error": {"message": f"the engine failed: {output}", "type": "server_error"}})
                break
            finished = output.finished
            for chunk in answer.chunks(output):
                yield _event(chunk)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            loop.abort(request_id)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Answer:
    """A request's response body, whole or as stream chunks, in the shape of OpenAI's completions
    (`text_completion`) or chat completions (`chat.completion`)."""

    def __init__(self, request_id: str, model: str, chat: bool, params: SamplingParams, tokenizer, *,
                 usage_chunk: bool = False):
        self.id, self.model, self.chat, self.params, self.tokenizer = request_id, model, chat, params, tokenizer
        self.usage_chunk = usage_chunk  # a last chunk with no choices and the usage (stream_options.include_usage)
        self.created = int(time.time())
        self._streams: dict[int, TextStream] = {}
        self._sent_tokens: dict[int, int] = {}
        self._finished: set[int] = set()

    def whole(self, output: RequestOutput) -> dict:
        choices = []
        for completion in output.outputs:
            choice = {"index": completion.index, "finish_reason": completion.finish_reason,
                      "logprobs": self._logprobs(completion.token_ids, completion.logprobs)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
            else:
                choice["text"] = completion.text
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": _usage(output)}

    def chunks(self, output: RequestOutput):
        """The chunks that carry what this output adds to what was sent (and, once it has finished, one
        with the usage, where the request asked for it)."""
        for completion in output.outputs:
            index = completion.index
            if index in self._finished:
                continue
            stream = self._streams.setdefault(index, TextStream(self.params.stop))
            done = completion.finish_reason is not None
            text = stream.update(completion.text, finished=done)
            sent = self._sent_tokens.get(index, 0)
            new_tokens = completion.token_ids[sent:]
            if not text and not done and not new_tokens:
                continue
            self._sent_tokens[index] = len(completion.token_ids)
            logprobs = None
            if completion.logprobs is not None:
                logprobs = self._logprobs(new_tokens, completion.logprobs[sent:])
            choice = {"index": index, "finish_reason": completion.finish_reason, "logprobs": logprobs}
            if self.chat:
                choice["delta"] = {"content": text} | ({"role": "assistant"} if sent == 0 else {})
            else:
                choice["text"] = text
            if done:
                self._finished.add(index)
            yield {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": [choice]}
        if output.finished and self.usage_chunk:
            yield {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": [], "usage": _usage(output)}

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None):
        if logprobs is None:
            return None
        piece = (lambda t: self.tokenizer.decode([t])) if self.tokenizer else str  # noqa: E731
        chosen = [entry[token] for token, entry in zip(token_ids, logprobs)]
        top = [{piece(t): p for t, p in sorted(entry.items(), key=lambda kv: -kv[1])[: self.params.logprobs]}
               for entry in logprobs]
        if self.chat:
            return {"content": [{"token": piece(t), "logprob": p, "bytes": list(piece(t).encode()),
                                 "top_logprobs": [{"token": s, "logprob": q, "bytes": list(s.encode())}
                                                  for s, q in alternatives.items()]}
                                for t, p, alternatives in zip(token_ids, chosen, top)]}
        return {"tokens": [piece(t) for t in token_ids], "token_logprobs": chosen, "top_logprobs": top}


def _usage(output: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in output.outputs)
    prompt = len(output.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Metrics:
    """The engine's state in Prometheus' text format: gauges read from the stats at each scrape,
    histograms of time to first token and time per output token fed as requests finish."""

    def __init__(self):
        client = self.client = prometheus_client
        self.registry = client.CollectorRegistry()
        gauge = lambda name, text: client.Gauge(f"jaxpaged_{name}", text, registry=self.registry)  # noqa: E731
        self.gauges = {
            "running": gauge("requests_running", "requests running"),
            "waiting": gauge("requests_waiting", "requests waiting for admission"),
            "preemptions": gauge("preemptions", "preemptions so far"),
            "used_blocks": gauge("pool_used_blocks", "blocks of the pool in use"),
            "total_blocks": gauge("pool_blocks", "blocks in the pool"),
            "prefix_hit_rate": gauge("prefix_cache_hit_rate", "share of prompt blocks found in the prefix cache"),
            "tokens_per_second": gauge("generation_tokens_per_second", "generated tokens over the time in steps"),
            "programs": gauge("device_programs", "distinct device programs run so far (each compiled once)"),
        }
        self.pool_use = gauge("pool_use", "share of the pool's blocks in use")
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = client.Histogram("jaxpaged_time_to_first_token_seconds", "time to the first token",
                                     buckets=buckets, registry=self.registry)
        self.tpot = client.Histogram("jaxpaged_time_per_output_token_seconds", "time per output token after the first",
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                                     registry=self.registry)

    def update(self, stats) -> None:
        for name, gauge in self.gauges.items():
            gauge.set(getattr(stats, name))
        self.pool_use.set(stats.used_blocks / stats.total_blocks if stats.total_blocks else 0.0)

    def finished(self, output: RequestOutput) -> None:
        metrics = output.metrics
        if metrics.first_token_time is None:
            return
        self.ttft.observe(metrics.time_to_first_token)
        tokens = max(len(c.token_ids) for c in output.outputs)
        if tokens > 1 and metrics.finish_time is not None:
            self.tpot.observe((metrics.finish_time - metrics.first_token_time) / (tokens - 1))

    def render(self) -> str:
        return self.client.generate_latest(self.registry).decode()


def run(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        max_waiting: int = 256, shutdown_grace: float = 30.0, log_level: str = "info") -> None:
    """Serves until SIGINT or SIGTERM: then running requests get `shutdown_grace` seconds to finish,
    and whatever still runs is aborted (a stream ends with finish_reason "abort", then [DONE])."""
    import uvicorn

    loop = EngineLoop(engine, max_waiting=max_waiting)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:  # the first signal: a deadline for what runs
                timer = threading.Timer(shutdown_grace, loop.close)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(build_app(loop, model_name, api_key=api_key), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_grace + 5)
    Server(config).run()
