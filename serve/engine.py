"""The serving engine: one model, many LoRA adapters, one continuously batched decode loop on its own thread.

    request -> submit() -> waiting queue --(between two decode steps)--> DecodeBatch.add (prefill, left-padded)
                                                     decode loop: step every row, hand out new text, retire rows
    finished / cancelled rows <- DecodeBatch.retire <-------------------------------------------

Continuous batching (Yu et al. 2022, "Orca", section 3.2): requests join the running batch between any two decode
steps, up to ``max_batch`` rows, and leave as soon as they finish, so a long request never holds a short one
back (``models/batching.py`` keeps each row's own cache length). Every row names its adapter (or none); before a
forward whose rows changed, ``lora.mixed.set_row_adapters`` gives each row its own (S-LoRA, Sheng et al. 2023:
one base, many adapters, one batch). Adapters load and unload at run time between steps, under the same lock
as the forward passes, so a request never sees a half-loaded adapter.

The loop runs on a plain thread (PyTorch releases the GIL in its kernels); the web server's event loop gets each
request's events through ``loop.call_soon_threadsafe``. An exception in a step fails the rows of that batch with
the message and the loop goes on: one bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import torch

from finetune_ref.lora import adapter_names, delete_adapter, load_adapter
from finetune_ref.lora.mixed import clear_row_adapters, set_row_adapters
from finetune_ref.lora.peft_format import check_adapter_weights, read_adapter_config, read_adapter_weights
from finetune_ref.models.batching import DecodeBatch, Row


class RequestError(Exception):
    """A request the engine refuses: ``status`` is the HTTP status (400 bad input, 404 unknown adapter)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One row in flight and the way back to its caller: events ("text", delta) and ("done", row | exception)."""

    def __init__(self, row: Row, loop: asyncio.AbstractEventLoop):
        self.row = row
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """The model, its tokenizer, its adapters and the decode loop.

    Args:
        model: a causal LM (dense or NF4 base), with adapters already loaded or not.
        tokenizer: ``models.tokenizer.Tokenizer`` (encode, decode, apply_chat_template, eos_token_id).
        model_name: the id of the base model in ``/v1/models`` and in requests' ``model`` field.
        max_batch: rows decoded together at most; more requests wait.
        bgmv: the gathered LoRA matmul (None: ``lora.mixed.lora_bgmv``; the Triton kernel on CUDA).
    """

    def __init__(self, model, tokenizer, model_name: str, max_batch: int = 8, bgmv=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = max_batch
        self.bgmv = bgmv
        self.context = model.config.max_position_embeddings
        self.created = int(time.time())
        self.lock = threading.Lock()  # the model: a forward pass, or an adapter being loaded / unloaded
        self.wake = threading.Condition()
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}  # id(row) -> request
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self.batch = DecodeBatch(model, decode=tokenizer.decode, on_rows=self._set_rows)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)

    # ---- adapters ----

    def adapters(self) -> list[str]:
        return adapter_names(self.model)

    def resolve_adapter(self, model_field: str | None) -> str | None:
        """The request's ``model`` field -> adapter name (None: the base). RequestError 404 when unknown."""
        if model_field in (None, "", self.model_name):
            return None
        if model_field in self.adapters():
            return model_field
        raise RequestError(404, f"The model `{model_field}` does not exist: this server has "
                                f"{[self.model_name, *self.adapters()]}")

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter directory as ``name``; checked in full before the model is touched."""
        from finetune_ref.lora.layer import check_adapter_name

        try:
            check_adapter_name(name)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        if name == self.model_name or name in self.adapters():
            raise RequestError(400, f"The lora adapter '{name}' has already been loaded; unload it first")
        if not Path(path).is_dir():
            raise RequestError(400, f"lora_path {path!r} is not a directory (expected adapter_config.json and "
                                    "adapter_model.safetensors)")
        try:
            config, tensors = read_adapter_config(path), read_adapter_weights(path)
            check_adapter_weights(self.model, config, tensors)  # another base's adapter fails here, unchanged
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise RequestError(400, f"cannot load adapter {name!r} from {path}: {e}") from None
        dtype = self.model.model.embed_tokens.weight.dtype
        with self.lock:
            load_adapter(self.model, path, adapter_name=name,
                         adapter_dtype=dtype if dtype.is_floating_point else torch.float32)
            self._adapters_changed()

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters():
            raise RequestError(404, f"The lora adapter '{name}' cannot be found: loaded are {self.adapters()}")
        with self.wake:
            busy = [r for r in [*self.waiting, *self.running.values()] if r.row.adapter == name]
        if busy:
            raise RequestError(400, f"adapter '{name}' is in use by {len(busy)} request(s); unload it when they end")
        with self.lock:
            delete_adapter(self.model, name)
            self._adapters_changed()

    def _adapters_changed(self) -> None:
        clear_row_adapters(self.model)  # stacks are rebuilt; new LoRA layers get their rows' adapters too
        self.batch.refresh_rows()

    def _set_rows(self, rows: list[Row]) -> None:
        set_row_adapters(self.model, [r.adapter for r in rows], bgmv=self.bgmv)

    # ---- requests ----

    def check_prompt(self, ids: list[int], max_tokens: int | None) -> int:
        """The number of tokens a request may generate; RequestError 400 for a prompt that does not fit."""
        if not ids:
            raise RequestError(400, "the prompt is empty")
        if len(ids) >= self.context:
            raise RequestError(400, f"This model's maximum context length is {self.context} tokens. However, "
                                    f"your prompt has {len(ids)} tokens. Please reduce the length of the prompt.")
        room = self.context - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise RequestError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                    f"{max_tokens} for the completion). Please reduce the length of the prompt "
                                    "or max_tokens.")
        return room if max_tokens is None else max_tokens

    def submit(self, row: Row) -> Request:
        request = Request(row, asyncio.get_running_loop())
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The client went away: its row is retired at the next step (its slot and cache freed)."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def stats(self) -> dict:
        with self.wake:
            return {"running": len(self.running), "waiting": len(self.waiting), **self.counts}

    # ---- the decode loop ----

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        self.thread.join(timeout=5)

    def _admit(self) -> list[Request]:
        with self.wake:
            while not self._stop and not self.waiting and not self.running:
                self.wake.wait()
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self.counts["cancelled"] += 1
                r.send("done", r.row)
            free = self.max_batch - len(self.running)
            new, self.waiting = self.waiting[:free], self.waiting[free:]
            for r in new:
                self.running[id(r.row)] = r
        return new

    def _loop(self) -> None:
        while not self._stop:
            new = self._admit()
            if self._stop:
                break
            try:
                with self.lock:
                    if new:
                        self.batch.add([r.row for r in new])  # prefill: their first token
                    if len(self.batch) > len(new):
                        self.batch.step()  # everybody else's next token (the new rows' second)
                self._hand_out()
            except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving
                self._fail_all(e)

    def _hand_out(self) -> None:
        for row in self.batch.rows:
            request = self.running[id(row)]
            delta = row.take_text()
            if delta and not request.cancelled:
                request.send("text", delta)
        gone = self.batch.retire(also=lambda row: self.running[id(row)].cancelled)
        with self.wake:
            for row in gone:
                request = self.running.pop(id(row))
                if request.cancelled and not row.finished:
                    row.finish_reason = "cancelled"
                    self.counts["cancelled"] += 1
                else:
                    self.counts["finished"] += 1
                request.send("done", row)

    def _fail_all(self, error: Exception) -> None:
        with self.wake:
            requests = list(self.running.values())
            self.running.clear()
            self.counts["failed"] += len(requests)
        self.batch = DecodeBatch(self.model, decode=self.tokenizer.decode, on_rows=self._set_rows)
        for request in requests:
            request.send("done", RuntimeError(f"generation failed: {type(error).__name__}: {error}"))
