"""Serving: one base model and many LoRA adapters behind an OpenAI-compatible HTTP API (``finetune serve``).

    serve.engine    the continuously batched decode loop, per-row adapters, runtime adapter loading
    serve.protocol  the OpenAI request/response bodies (pydantic), error objects
    serve.app       the FastAPI application: /v1/completions, /v1/chat/completions, /v1/models, LoRA loading

Needs the ``[serve]`` extra (fastapi, uvicorn). ``docs/serving.md`` explains the pieces.
"""
