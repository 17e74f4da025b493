"""The HTTP side: an OpenAI-compatible API (as vLLM serves it) over ``serve.engine.Engine``, with FastAPI.

    GET  /v1/models                 the base model and every loaded adapter (``parent``: the base)
    POST /v1/completions            prompt -> text; ``"stream": true`` sends server-sent events
    POST /v1/chat/completions       messages -> the model's chat template -> text
    POST /v1/load_lora_adapter      {"lora_name": ..., "lora_path": ...}   (vLLM's runtime adapter loading)
    POST /v1/unload_lora_adapter    {"lora_name": ...}
    GET  /health                    {"status": "ok", running, waiting, finished, cancelled, failed}

A request's ``model`` field picks the adapter by name (the base model's id, or none, for no adapter), as vLLM
does. Bad input is answered, never raised into the server: unknown adapter 404; malformed JSON, a wrong field,
a prompt longer than the context, bad sampling values 400; each with OpenAI's ``{"error": {"message": ...}}``.
A client that disconnects (mid-stream or while waiting) has its row cancelled and its batch slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from finetune_ref.models.batching import Row
from finetune_ref.serve.engine import Engine, RequestError
from finetune_ref.serve.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest,
                                         UnloadLoRAAdapterRequest, completion_body, error_body, new_id, usage)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def build_app(engine: Engine) -> FastAPI:
    """The FastAPI application; it starts the engine's decode loop on startup and stops it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="finetune-ref serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return JSONResponse(error_body(400, _validation_message(exc)), status_code=400)

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):
        return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        def card(name, parent):
            return {"id": name, "object": "model", "created": engine.created, "owned_by": "finetune-ref",
                    "root": name, "parent": parent}
        return {"object": "list",
                "data": [card(engine.model_name, None), *(card(a, engine.model_name) for a in engine.adapters())]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        adapter = engine.resolve_adapter(body.model)
        if isinstance(body.prompt, str):
            ids = engine.tokenizer.encode(body.prompt, add_bos=False)
        else:
            vocab = engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise RequestError(400, f"prompt token ids must be in [0, {vocab})")
            ids = list(body.prompt)
        return await _generate(http, body, "text_completion", ids, adapter, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        adapter = engine.resolve_adapter(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ValueError, TypeError) as e:
            raise RequestError(400, f"cannot apply the chat template: {e}") from None
        ids = engine.tokenizer.encode(text)
        return await _generate(http, body, "chat.completion", ids, adapter, body.limit())

    async def _generate(http: Request, body, kind: str, ids: list[int], adapter, max_tokens):
        limit = engine.check_prompt(ids, max_tokens)
        eos = engine.tokenizer.eos_token_id
        try:
            row = Row(ids, max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                      stop_ids=frozenset(() if eos is None or body.ignore_eos else (eos,)),
                      stop_strings=tuple(body.stop or ()),
                      seed=body.seed, adapter=adapter)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        request_id = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        model = body.model or engine.model_name
        handle = engine.submit(row)
        if body.stream:
            return StreamingResponse(_stream(http, handle, kind, request_id, model, body.include_usage()),
                                     media_type="text/event-stream")
        done = None
        try:
            async for event, value in _events(http, handle):
                if event == "done":
                    done = value
        finally:
            if done is None:
                engine.cancel(handle)
        if isinstance(done, Exception):
            return JSONResponse(error_body(500, str(done)), status_code=500)
        result = completion_body(kind, request_id, model, done.text, done.finish_reason, chunk=False)
        result["usage"] = usage(len(ids), len(done.new_ids))
        return result

    async def _events(http: Request, handle):
        """The request's events until "done"; stops (the caller cancels) when the client has gone. The client is
        asked every DISCONNECT_POLL_S whether or not events keep coming: a fast decode never leaves the queue
        empty for that long, and must still notice a client that hung up."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        while True:
            try:
                event, value = await asyncio.wait_for(handle.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if loop.time() >= next_check:
                if await http.is_disconnected():
                    return
                next_check = loop.time() + DISCONNECT_POLL_S
            if event is None:
                continue
            yield event, value
            if event == "done":
                return

    async def _stream(http: Request, handle, kind: str, request_id: str, model: str, include_usage: bool):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        done = None
        try:
            if kind == "chat.completion":
                yield sse(completion_body(kind, request_id, model, None, None, chunk=True, role=True))
            async for event, value in _events(http, handle):
                if event == "text":
                    yield sse(completion_body(kind, request_id, model, value, None, chunk=True))
                else:
                    done = value
            if done is None:
                return
            if isinstance(done, Exception):
                yield sse(error_body(500, str(done)))
            else:
                yield sse(completion_body(kind, request_id, model, None, done.finish_reason, chunk=True))
                if include_usage:
                    yield sse({"id": request_id, "object": f"{kind}.chunk" if kind == "chat.completion" else kind,
                               "created": engine.created, "model": model, "choices": [],
                               "usage": usage(len(handle.row.prompt), len(done.new_ids))})
            yield "data: [DONE]\n\n"
        finally:
            if done is None:
                engine.cancel(handle)  # the client went away (or the stream was closed): free the slot

    return app
