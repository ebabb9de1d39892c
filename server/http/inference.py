"""Inference routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and
loading and unloading LoRA adapters at run time (vLLM's ``/v1/load_lora_adapter``).

A request's ``model`` is the base model or one of the caller's adapters: loaded ones
and every fine-tuning job's (the job's ``fine_tuned_model``), while it trains and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from coserve_jax.sampling import MAX_SEED, SamplingParams

from .. import convert
from ..auth import internal_name
from ..proto import coserve_pb2 as pb
from .context import Ctx, HttpContext, Tenant, model_not_found
from .errors import HttpError, from_exception
from .generation import ChoiceSpec, Delta, Generation
from .schemas import (
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    SamplingBody,
    UnloadLoraRequest,
)
from .sse import stream_response

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


# ----- request -> engine requests ------------------------------------------------------------

def _unsupported(body: SamplingBody) -> None:
    for field in ("frequency_penalty", "presence_penalty"):
        if getattr(body, field):
            raise HttpError(400, f"{field}: only 0 is supported", field, "unsupported_value")
    if body.logit_bias:
        raise HttpError(400, "logit_bias is not supported", "logit_bias", "unsupported_value")


def _stops(body: SamplingBody) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise HttpError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", "stop")
    return tuple(s for s in stop if s)


def _specs(body: SamplingBody, prompts: list[list[int]], max_tokens: int | None,
           logprobs: int | None, ctx: HttpContext) -> list[ChoiceSpec]:
    """``n`` engine requests per prompt; seeds ``seed + i`` keep sampled choices apart."""
    stops = _stops(body)
    specs = []
    limit = ctx.max_model_len()
    for prompt in prompts:
        if not prompt:
            raise HttpError(400, "prompt: encodes to no tokens", "prompt")
        tokens = max_tokens
        if tokens is None:  # the rest of the context, as vLLM does for chat
            tokens = max(1, limit - len(prompt)) if limit else DEFAULT_MAX_TOKENS
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + i) % (MAX_SEED + 1)
            try:
                params = SamplingParams(
                    max_tokens=tokens,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_k=max(body.top_k or 0, 0),
                    top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
                    stop_token_ids=tuple(body.stop_token_ids or ()),
                    ignore_eos=body.ignore_eos, logprobs=logprobs)
            except ValueError as e:
                raise from_exception(e) from None
            specs.append(ChoiceSpec(prompt, params, stops))
    return specs


def _encode(ctx: HttpContext, text: str) -> list[int]:
    if len(text) > convert.MAX_PROMPT_CHARS:  # tokenizing runs on the event loop
        raise HttpError(400, f"prompt: more than {convert.MAX_PROMPT_CHARS} characters",
                        "prompt")
    return list(ctx.backend.tokenizer.encode(text))


def _completion_prompts(ctx: HttpContext, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [_encode(ctx, p)]
    if all(isinstance(x, str) for x in p):
        return [_encode(ctx, x) for x in p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return [list(x) for x in p]


def _chat_prompt(ctx: HttpContext, body: ChatCompletionRequest) -> list[int]:
    tokenizer = ctx.backend.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise HttpError(400, f"model {ctx.model_id!r} has no chat template; use "
                        "/v1/completions", "messages", "no_chat_template")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    if sum(len(m["content"]) for m in messages) > convert.MAX_PROMPT_CHARS:
        raise HttpError(400, f"messages: more than {convert.MAX_PROMPT_CHARS} characters",
                        "messages")
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
    except Exception as e:
        raise HttpError(400, f"messages: the chat template failed: {e}", "messages") from None
    return list(ids)


async def _generation(ctx: HttpContext, who: str, body: SamplingBody,
                      specs: list[ChoiceSpec]) -> Generation:
    slo = body.slo
    gen = Generation(ctx.service, specs, ctx.adapter_for(who, body.model), body.model,
                     slo.ttft_s if slo else 0.0, slo.tpot_s if slo else 0.0)
    try:
        await gen.start()
    except HttpError as e:
        if e.status == 404 and e.param == "model":
            raise model_not_found(body.model) from None
        raise
    return gen


async def _collect(request: Request, gen: Generation) -> list[list[Delta]]:
    """Every delta of a non-streamed request, per choice; a client that hangs up aborts it
    at once (its ``http.disconnect`` is awaited beside the generation, not polled)."""
    per_choice: list[list[Delta]] = [[] for _ in gen.specs]

    async def run() -> None:
        async for delta in gen.deltas():
            per_choice[delta.index].append(delta)

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(run()), asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client is gone
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # its finally aborted the engine requests
            raise HttpError(400, "the client disconnected", None, "client_disconnected")
        task.result()  # raises what the generation raised
        return per_choice
    finally:
        for t in (task, watcher):
            t.cancel()
        gen.close()


def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _token_text(ctx: HttpContext, token: int) -> str:
    return ctx.backend.tokenizer.decode([token])


# ----- /v1/completions -----------------------------------------------------------------------

def _completion_logprobs(ctx: HttpContext, deltas: list[Delta], offset: int) -> dict | None:
    if not deltas or deltas[0].logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for d in deltas:
        for token, value, top in zip(d.token_ids, d.logprobs or [], d.top_logprobs or [],
                                     strict=False):
            text = _token_text(ctx, token)
            tokens.append(text)
            values.append(value)
            # Keyed by text, as OpenAI's legacy format is: ids with the same text keep the
            # likeliest one's logprob.
            by_text: dict[str, float] = {}
            for t, v in top:
                by_text.setdefault(_token_text(ctx, t), v)
            tops.append(by_text)
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      ctx: Ctx, who: Tenant):
    _unsupported(body)
    if body.suffix:
        raise HttpError(400, "suffix is not supported", "suffix", "unsupported_value")
    if body.best_of is not None and body.best_of != body.n:
        raise HttpError(400, "best_of: only best_of = n is supported", "best_of",
                        "unsupported_value")
    if body.echo and body.logprobs is not None:
        raise HttpError(400, "echo with logprobs is not supported (no prompt logprobs)",
                        "echo", "unsupported_value")
    prompts = _completion_prompts(ctx, body)
    specs = _specs(body, prompts, body.max_tokens or DEFAULT_MAX_TOKENS, body.logprobs, ctx)
    echo = [ctx.backend.tokenizer.decode(s.prompt, skip_special_tokens=True)
            if body.echo else "" for s in specs]
    gen = await _generation(ctx, who, body, specs)
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

    if body.stream:
        async def chunks() -> AsyncIterator[dict]:
            started = [False] * len(specs)
            async for d in gen.deltas():
                text = d.text
                if not started[d.index]:
                    started[d.index], text = True, echo[d.index] + text
                yield {**base, "choices": [{
                    "index": d.index, "text": text, "finish_reason": d.finish_reason,
                    "logprobs": _completion_logprobs(ctx, [d], 0)}]}
            if body.stream_options and body.stream_options.include_usage:
                yield {**base, "choices": [], "usage": _usage(gen)}
        return stream_response(chunks(), gen.close)

    per_choice = await _collect(request, gen)
    choices = []
    for index, deltas in enumerate(per_choice):
        choices.append({"index": index, "text": echo[index] + "".join(d.text for d in deltas),
                        "finish_reason": deltas[-1].finish_reason if deltas else None,
                        "logprobs": _completion_logprobs(ctx, deltas, len(echo[index]))})
    return {**base, "choices": choices, "usage": _usage(gen)}


# ----- /v1/chat/completions ------------------------------------------------------------------

def _chat_logprobs(ctx: HttpContext, deltas: list[Delta]) -> dict | None:
    if not deltas or deltas[0].logprobs is None:
        return None

    def entry(token: int, value: float) -> dict:
        text = _token_text(ctx, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for d in deltas:
        for token, value, top in zip(d.token_ids, d.logprobs or [], d.top_logprobs or [],
                                     strict=False):
            content.append({**entry(token, value),
                            "top_logprobs": [entry(t, v) for t, v in top]})
    return {"content": content, "refusal": None}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: Ctx, who: Tenant):
    _unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise HttpError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prompt = _chat_prompt(ctx, body)
    specs = _specs(body, [prompt], body.max_completion_tokens or body.max_tokens, logprobs,
                   ctx)
    gen = await _generation(ctx, who, body, specs)
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    if body.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": body.model}

        async def chunks() -> AsyncIterator[dict]:
            for index in range(len(specs)):  # the role comes first, as OpenAI sends it
                yield {**base, "choices": [{"index": index, "delta": {"role": "assistant",
                                                                      "content": ""},
                                            "finish_reason": None, "logprobs": None}]}
            async for d in gen.deltas():
                yield {**base, "choices": [{
                    "index": d.index, "delta": {"content": d.text} if d.text else {},
                    "finish_reason": d.finish_reason, "logprobs": _chat_logprobs(ctx, [d])}]}
            if body.stream_options and body.stream_options.include_usage:
                yield {**base, "choices": [], "usage": _usage(gen)}
        return stream_response(chunks(), gen.close)

    per_choice = await _collect(request, gen)
    choices = [{"index": index,
                "message": {"role": "assistant", "content": "".join(d.text for d in deltas),
                            "refusal": None},
                "finish_reason": deltas[-1].finish_reason if deltas else None,
                "logprobs": _chat_logprobs(ctx, deltas)}
               for index, deltas in enumerate(per_choice)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices, "usage": _usage(gen)}


# ----- /v1/models and adapters ---------------------------------------------------------------

async def _models(ctx: HttpContext, who: str) -> list[dict]:
    base = {"id": ctx.model_id, "object": "model", "created": ctx.started,
            "owned_by": "coserve", "root": ctx.backend.model_name or ctx.model_id,
            "parent": None}
    adapters = [{"id": a.name, "object": "model", "created": ctx.started, "owned_by": who,
                 "root": a.path if a.kind == "loaded" else f"fine_tuning.job:{a.name}",
                 "parent": ctx.model_id}
                for a in await ctx.service.adapters_of(who)]
    return [base, *adapters]


@router.get("/v1/models")
async def list_models(ctx: Ctx, who: Tenant):
    return {"object": "list", "data": await _models(ctx, who)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: Ctx,
                    who: Tenant):
    for m in await _models(ctx, who):
        if m["id"] == model:
            return m
    raise model_not_found(model)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, ctx: Ctx,
                            who: Tenant):
    request = pb.LoadAdapterRequest(name=body.lora_name, path=body.lora_path,
                                    replace=body.load_inplace)
    try:
        await ctx.service.load_adapter(request, who)
    except Exception as e:
        raise from_exception(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, ctx: Ctx,
                              who: Tenant):
    service = ctx.service
    try:  # a job's adapter is refused in OpenAI's words before the service would
        if internal_name(who, body.lora_name, "lora_name") in service.jobs:
            raise HttpError(400, f"lora_name: {body.lora_name!r} is the adapter of a "
                            "fine-tuning job", "lora_name")
        await service.unload_adapter(who, body.lora_name, "lora_name")
    except Exception as e:
        raise from_exception(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/health")
async def health(ctx: Ctx):
    """Liveness for load balancers (no token): 200 while serving, 503 once draining."""
    if ctx.service.draining or ctx.service.bridge.failed is not None:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return {"status": "ok"}
