"""Stage 1, generate: each subtask's items -> the model's Engine -> responses/<subtask>.jsonl,
resumed by record key; a multi-turn subtask's later turns follow each answered item."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .datasets import Item, resolve_data_root
from .deployment import identify, vetter
from .endpoints import key_source, redact_url, resolve_api_key
from .engine import Engine, Request, Result
from .errors import ConfigError
from .manifest import RunContext, record_datasets, save_manifest
from .records import JsonlWriter, ResponseRecord, load_for_resume, read_records, record_key, response_dict
from .tasks import Task

log = logging.getLogger("evalkit")


def generation_params(cfg: RunConfig, task: Task, item: Item) -> dict[str, Any]:
    """The subtask's defaults, then the command line's settings, then the item's own decoding
    settings, which are part of the subtask's definition (MT-Bench's category temperatures)."""
    params: dict[str, Any] = {"max_tokens": task.max_tokens}
    if task.temperature is not None:
        params["temperature"] = task.temperature
    for name, value in (("max_tokens", cfg.max_tokens), ("temperature", cfg.temperature), ("top_p", cfg.top_p), ("seed", cfg.seed)):
        if value is not None:
            params[name] = value
    params.update(task.item_params(item))
    return params


def model_engine(cfg: RunConfig, api: str) -> Engine:
    """An engine for the model under test (its replicas, its key)."""
    return Engine(cfg.engine, cfg.endpoint, resolve_api_key(cfg.api_key_env), api, key_source(cfg.api_key_env),
                  endpoints_file=cfg.endpoints_file)


async def discover_model(cfg: RunConfig) -> str:
    """--model, else the first id the endpoint lists under /v1/models."""
    if cfg.model:
        return cfg.model
    async with model_engine(cfg, cfg.api) as eng:
        models = await eng.list_models(cfg.wait)
    if not models:
        raise ConfigError(f"{redact_url(cfg.endpoint[0])}/models lists no model: pass --model NAME")
    return models[0]


Keyed = list[tuple[str, Item, dict[str, Any]]]  # (record key, item, generation params)


@dataclass
class TurnPlan:
    """One subtask's generation, turn by turn: the keyed items of the current turn, the answers
    already on disk, and (multi-turn subtasks) the next turn that follows each answered item."""

    task: Task
    system: str | None
    current: Keyed
    done: dict[str, ResponseRecord]
    keyed: Callable[[list[Item]], Keyed]  # items -> (record key, item, params) in this run
    n_resumed: int = 0
    turn: int = 0

    def todo(self) -> list[tuple[str, Item, dict[str, Any]]]:
        """This turn's items still to ask; the ones answered in an earlier run count as resumed."""
        out = []
        for key, it, params in self.current:
            if key in self.done:
                self.n_resumed += 1
            else:
                out.append((key, it, params))
        return out

    def advance(self, answers: dict[str, str]) -> bool:
        """Go to the next turn, each item answered in this turn (now or in an earlier run) followed
        by the subtask's next question; False when the subtask has no more turns to ask."""
        self.turn += 1
        nxt = []
        if self.turn < self.task.turns:
            for key, it, _ in self.current:
                answer = answers.get(key, self.done[key].response if key in self.done else None)
                if answer is not None and (n := self.task.next_turn(it, answer)) is not None:
                    nxt.append(n)
        self.current = self.keyed(nxt) if nxt else []
        return bool(self.current)


def _keyed(task: Task, system: str | None, items: list[Item], deployment: dict, model: str, cfg: RunConfig) -> Keyed:
    out = []
    for it in items:
        params = generation_params(cfg, task, it)
        out.append((_gen_key(deployment, model, params, system, task, it), it, params))
    return out


def _current_keys(task: Task, system: str | None, keyed: Keyed, path: Path, deployment: dict, model: str,
                  cfg: RunConfig) -> set[str]:
    """Keys of the records that still belong to this run. A later turn's key hashes the earlier
    turns, so the keys are followed turn by turn through the answers already in the file."""
    keys = {k for k, _, _ in keyed}
    if task.turns == 1 or cfg.restart or not path.exists():
        return keys
    answers = {r.key: r.response for r in read_records(path, ResponseRecord) if r.error is None and r.response is not None}
    for _ in range(task.turns - 1):
        nxt = [n for k, it, _ in keyed if k in answers and (n := task.next_turn(it, answers[k])) is not None]
        keyed = _keyed(task, system, nxt, deployment, model, cfg)
        keys |= {k for k, _, _ in keyed}
    return keys


async def generate(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    root = resolve_data_root(cfg.data_path)
    record_datasets(ctx, root)
    engines: dict[str, Engine] = {}  # one per API: a subtask may need another than the run's (prompt scoring)
    stack = contextlib.AsyncExitStack()
    deployment: dict[str, Any] = {}

    async def engine_for(api: str) -> Engine:
        if api not in engines:
            eng = engines[api] = await stack.enter_async_context(model_engine(cfg, api))
            eng.model = ctx.model
            eng.price, eng.spending = cfg.prices.get(ctx.model), ctx.spending
            eng.vet_card = vetter(deployment)  # a replica joining mid-run must serve what the keys say
        return engines[api]

    # the data first: a broken file stops the run before any connection is made
    loaded = [(task, cfg.system_prompt if cfg.system_prompt is not None else task.system_prompt, task.load(root))
              for task in ctx.tasks if not task.responses_of]  # responses_of: judges another subtask's answers
    plans: list[TurnPlan] = []
    writers: dict[str, JsonlWriter] = {}
    try:
        deployment, card = await identify(await engine_for(cfg.api), ctx.model, cfg.deployment, cfg.wait)
        ctx.manifest["deployment"] = deployment
        engines[cfg.api].vet_card = vetter(deployment)
        if card is not None:
            ctx.manifest["model_card"] = card
        for task, system, items in loaded:
            keyed = _keyed(task, system, items, deployment, ctx.model, cfg)
            path = ctx.responses_path(task)
            keep = _current_keys(task, system, keyed, path, deployment, ctx.model, cfg)
            done, n_stale = load_for_resume(path, ResponseRecord, cfg.restart, keep=keep)
            if n_stale:
                log.warning(
                    "%d records in %s came from another deployment, model or generation parameters: moved to %s",
                    n_stale, path, path.with_suffix(".stale.jsonl"),
                )
            plans.append(TurnPlan(task, system, keyed[: cfg.limit] if cfg.limit else keyed, done,
                                  functools.partial(_keyed, task, system, deployment=deployment, model=ctx.model, cfg=cfg)))
    except BaseException:
        await stack.aclose()
        raise

    answers: dict[str, str] = {}  # this run's answers of multi-turn subtasks, for their next turn

    def requests(todo: list[tuple[TurnPlan, str, Item, dict]]) -> Iterator[Request]:
        for plan, key, it, params in todo:
            msgs = plan.task.messages(it, plan.system)
            body = {**plan.task.request_body(it, msgs, plan.task.api or cfg.api), **params}
            yield Request(key, body, (plan.task, it, params, msgs))

    def on_result(req: Request, res: Result) -> None:
        task, it, params, msgs = req.meta
        extra: dict[str, Any] = {}
        if res.ok:
            try:
                extra = task.response_fields(it, res, req.body)
            except ValueError as e:  # the reply lacks what the subtask needs: an error, not an answer
                res.error_kind, res.error_message = "bad_response", str(e)
        if res.ok and task.turns > 1 and res.text is not None:
            answers[req.key] = res.text
        error = None if res.ok else {"kind": res.error_kind, "status": res.error_status, "message": res.error_message or ""}
        rec = response_dict(req.key, task.name, it.id, ctx.model, req.body.get("prompt"), msgs, params, text=res.text,
                            finish_reason=res.finish_reason, usage=(res.prompt_tokens, res.completion_tokens), answer_fields=extra,
                            error=error, latency_s=res.latency_s, ttft_s=res.ttft_s, attempts=res.attempts, endpoint=res.endpoint,
                            item_data=it.data)
        writers[task.name].write(rec)

    started = time.time()
    summary: dict[str, Any] = {"requests": 0}
    for plan in plans:
        writers[plan.task.name] = JsonlWriter(ctx.responses_path(plan.task), cfg.engine.flush_every, cfg.engine.flush_interval)
    all_plans = list(plans)
    try:
        turn = 0
        while plans:
            todo: dict[str, list] = {}
            for plan in plans:
                for key, it, params in plan.todo():
                    todo.setdefault(plan.task.api or cfg.api, []).append((plan, key, it, params))
            for api, work in todo.items():
                eng = await engine_for(api)
                try:
                    desc = ("generate" if turn == 0 else f"generate (turn {turn + 1})") + ("" if api == cfg.api else f" ({api})")
                    await eng.run(requests(work), on_result, total=len(work), desc=desc, fresh_stats=turn == 0)
                finally:
                    summary = _merge_summaries({a: e.stats.summary() for a, e in engines.items()})
            turn += 1
            plans = [p for p in plans if p.advance(answers)]
    finally:
        await stack.aclose()
        for w in writers.values():
            w.close()
        ctx.manifest.setdefault("stages", {})["generate"] = {
            "started": started,
            "ended": time.time(),
            "skipped_done": sum(p.n_resumed for p in all_plans),
            **summary,
        }
        save_manifest(ctx)
    return summary


def _merge_summaries(by_api: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One engine's summary as it is; several engines' counts added up, each one's own kept."""
    if len(by_api) == 1:
        return next(iter(by_api.values()))
    parts = list(by_api.values())
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in ("requests", "errors", "retries", "rate_limited")}
    out["usage"] = {k: sum(p["usage"][k] for p in parts) for k in ("prompt_tokens", "completion_tokens")}
    out["wall_s"] = round(sum(p["wall_s"] for p in parts), 3)  # the engines run one after the other
    out["requests_per_s"] = round(out["requests"] / out["wall_s"], 3) if out["wall_s"] > 0 else None
    out["by_api"] = by_api
    return out


def _gen_key(deployment: dict, model: str, params: dict, system: str | None, task: Task, item: Item) -> str:
    if item.history:  # a later turn: its key hashes the earlier turns, so a new first answer means a new turn 2
        return record_key("generate", deployment, model, params, system, task.name, item.id, item.history)
    return record_key("generate", deployment, model, params, system, task.name, item.id)
