"""The three stages over one run directory (DESIGN.md "Data flow"):

    generate: dataset items -> Engine -> responses/<subtask>.jsonl
    judge:    responses -> judges (keyword | classifier | llm through the Engine) -> judgments/<subtask>.jsonl
    score:    responses + judgments -> Task.score -> results.json

Each stage reads only the previous stage's files, resumes by record key, and records what it
did in manifest.json.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .config import ConfigError, RunConfig, key_source, redact_url, resolve_api_key
from .cost import Spending
from .data import DataError, Item, dataset_file, resolve_data_root
from .datasets import sha256_file
from .deployment import hosts, identify, vetter
from .engine import Engine, FatalAuthError, Request, RequestFailure, Result
from .judges import HARM_ONLY_JUDGES, QUESTIONS, TOXICITY_JUDGES, JudgeError, Verdict, build_judge, check_judge_names
from .metrics import Metric, degenerate, rate
from .records import JsonlWriter, JudgmentRecord, ResponseRecord, load_for_resume, read_records, record_key
from .tasks import RULE_JUDGE, Scored, Task

log = logging.getLogger("evalkit")
LOCAL_JUDGE_CHUNK = 256


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model).strip("_") or "model"


@dataclass
class RunContext:
    cfg: RunConfig
    tasks: list[Task]
    model: str
    run_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    spending: Spending | None = None  # this invocation's, across stages (--max-cost)

    def __post_init__(self) -> None:
        if self.spending is None:
            self.spending = Spending(self.cfg.max_cost)

    def responses_path(self, task: Task) -> Path:
        return self.run_dir / "responses" / f"{task.responses_of or task.name}.jsonl"

    def judgments_path(self, task: Task) -> Path:
        return self.run_dir / "judgments" / f"{task.name}.jsonl"


# -- manifest --------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata  # not at import time: it slows the start of every command

    out = {"python": platform.python_version()}
    for pkg in ("evalkit", "aiohttp", "tenacity", "pydantic", "orjson", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if path.exists():
        return orjson.loads(path.read_bytes())
    return {}


def save_manifest(ctx: RunContext) -> None:
    m = ctx.manifest
    m.update(
        {
            "model": ctx.model,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": ctx.cfg.public_dump(),
            "versions": _versions(),
            "platform": platform.platform(),
            "argv": [redact_url(a) if "://" in a else a for a in sys.argv[1:]],
        }
    )
    m.setdefault("created", m["updated"])
    m["cost"] = spend_summary(m, ctx.cfg.max_cost)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.run_dir / "manifest.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(ctx.run_dir / "manifest.json")


def spend_summary(manifest: dict[str, Any], max_cost: float | None = None) -> dict[str, Any]:
    """Tokens and cost of the latest generation and judging (USD where the models have prices)."""
    stages = manifest.get("stages", {})
    judging = list((stages.get("judge") or {}).get("requests", {}).values())
    out: dict[str, Any] = {}
    for name, parts in (("generation", [stages["generate"]] if "generate" in stages else []), ("judging", judging)):
        if not parts:
            continue
        costs = [p["cost_usd"] for p in parts if "cost_usd" in p]
        out[name] = {k: sum(p.get("usage", {}).get(k, 0) for p in parts) for k in ("prompt_tokens", "completion_tokens")}
        if costs:
            out[name]["usd"] = round(sum(costs), 6)
    if any("usd" in v for v in out.values()):
        out["total_usd"] = round(sum(v.get("usd", 0.0) for v in out.values()), 6)
    if max_cost is not None:
        out["max_cost"] = max_cost
    return out


def check_prices(cfg: RunConfig, models: list[str | None]) -> None:
    """With --max-cost, every model the run will pay for has a price: checked before any request."""
    if cfg.max_cost is None:
        return
    for m in models:
        if m is not None and m not in cfg.prices:
            raise ConfigError(f"--max-cost needs the price of {m!r}: add [prices.\"{m}\"] with input = and output = "
                              f"(USD per million tokens; 0 for a local model) to the --config file")


def record_datasets(ctx: RunContext, root: Path) -> None:
    from .datasets import expected_sha256

    entries = ctx.manifest.setdefault("datasets", {})
    for t in ctx.tasks:
        for rel in t.data_files():
            path = dataset_file(root, t.dataset, rel)
            digest = sha256_file(path)
            expected = expected_sha256(t.dataset, rel)
            entries[f"{t.dataset}/{rel}"] = {
                "path": str(path),
                "sha256": digest,
                "matches_registry": None if expected is None else digest == expected,
            }
            if expected is not None and digest != expected and not ctx.cfg.accept_modified_data:
                raise DataError(
                    f"{path}: its sha256 ({digest[:12]}...) differs from the registry's ({expected[:12]}...): the file was "
                    f"changed or truncated. Fetch it again (`evalkit datasets fetch {t.dataset} --force`), or pass "
                    f"--accept-modified-data to evaluate it as it is (the manifest records that choice)")


# -- stage 1: generate -----------------------------------------------------------------------


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
class _GenPlan:
    """One subtask's generation: the keyed items of the current turn, and the finished answers."""

    task: Task
    system: str | None
    current: Keyed
    done: dict[str, ResponseRecord]
    n_resumed: int = 0


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
    plans: list[_GenPlan] = []
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
            plans.append(_GenPlan(task, system, keyed[: cfg.limit] if cfg.limit else keyed, done))
    except BaseException:
        await stack.aclose()
        raise

    answers: dict[str, str] = {}  # this run's answers of multi-turn subtasks, for their next turn

    def requests(todo: list[tuple[_GenPlan, str, Item, dict]]) -> Iterator[Request]:
        for plan, key, it, params in todo:
            msgs = plan.task.messages(it, plan.system)
            body = {**plan.task.request_body(it, msgs, plan.task.api or cfg.api), **params}
            yield Request(key, body, (plan.task, it, params, msgs))

    def on_result(req: Request, res: Result) -> None:
        # A plain dict in ResponseRecord's shape (every reader validates it with that schema):
        # building a pydantic object per answer would cost more than the request on a fast server.
        task, it, params, msgs = req.meta
        rec: dict[str, Any] = {"key": req.key, "subtask": task.name, "item_id": it.id, "model": ctx.model}
        if "prompt" in req.body:
            rec["prompt"] = req.body["prompt"]
        else:
            rec["messages"] = msgs
        rec["params"] = params
        extra: dict[str, Any] = {}
        if res.ok:
            try:
                extra = task.response_fields(it, res, req.body)
            except ValueError as e:  # the reply lacks what the subtask needs: an error, not an answer
                res.error_kind, res.error_message = "bad_response", str(e)
        if res.ok:
            rec["response"] = res.text
            if task.turns > 1 and res.text is not None:
                answers[req.key] = res.text
            if res.finish_reason is not None:
                rec["finish_reason"] = res.finish_reason
            rec["usage"] = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}
            rec.update(extra)
        else:
            rec["error"] = {"kind": res.error_kind, "status": res.error_status, "message": res.error_message or ""}
        rec["latency_s"] = round(res.latency_s or 0.0, 6)
        if res.ttft_s is not None:
            rec["ttft_s"] = round(res.ttft_s, 6)
        rec["attempts"] = res.attempts
        if res.endpoint:
            rec["endpoint"] = res.endpoint
        rec["created"] = time.time()
        rec.update(it.data)
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
                for key, it, params in plan.current:
                    if key in plan.done:
                        plan.n_resumed += 1
                    else:
                        todo.setdefault(plan.task.api or cfg.api, []).append((plan, key, it, params))
            for api, work in todo.items():
                eng = await engine_for(api)
                try:
                    desc = ("generate" if turn == 0 else f"generate (turn {turn + 1})") + ("" if api == cfg.api else f" ({api})")
                    await eng.run(requests(work), on_result, total=len(work), desc=desc, fresh_stats=turn == 0)
                finally:
                    summary = _merge_summaries({a: e.stats.summary() for a, e in engines.items()})
            turn += 1
            for plan in plans:  # a multi-turn subtask's next turn follows each answered item
                if turn >= plan.task.turns:
                    plan.current = []
                    continue
                nxt = []
                for key, it, _ in plan.current:
                    answer = answers.get(key, plan.done[key].response if key in plan.done else None)
                    if answer is not None and (n := plan.task.next_turn(it, answer)) is not None:
                        nxt.append(n)
                plan.current = _keyed(plan.task, plan.system, nxt, deployment, ctx.model, cfg)
            plans = [p for p in plans if p.current]
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


# -- stage 2: judge --------------------------------------------------------------------------


def judges_for(cfg: RunConfig, task: Task) -> list[str]:
    if task.question is None:  # scored by string rules, judged by nobody
        return []
    if task.question == "embedding":
        return ["embedding"]
    if task.question not in QUESTIONS:  # the subtask's own judge prompt: an LLM judge only
        return ["llm"]
    if task.question == "toxicity":
        names = cfg.toxicity_judges or list(task.default_judges)
        check_judge_names(names, TOXICITY_JUDGES, "--toxicity-judges")
        return names
    names = cfg.judges or list(task.default_judges)
    check_judge_names(names)
    harm_only = [n for n in names if n in HARM_ONLY_JUDGES]
    if task.question != "harm" and harm_only:  # they rate answers to harmful requests only
        names = [n for n in names if n not in HARM_ONLY_JUDGES]
        if not names:
            raise JudgeError(f"the {harm_only[0]} judge rates answers to harmful requests; {task.name} asks "
                             f"{task.question!r}: add another judge to --judges (e.g. keyword,{harm_only[0]})")
    return names


async def check_judges(cfg: RunConfig, tasks: list[Task]) -> None:
    """Before the first answer is asked for: every judge the run will use can be built (names,
    options), and each judge endpoint answers and serves the judge model (when it lists its
    models; one that does not is left to the requests)."""
    judges: dict[str, Any] = {}
    for task in tasks:
        for name in judges_for(cfg, task):
            judges.setdefault(name, make_judge(cfg, name))
    for name, j in judges.items():
        if not _is_remote(j):
            continue
        check_prices(cfg, [getattr(j, "model", None)])
        key = resolve_api_key(j.key_env, j.key_option, fallback=j.api != "perspective")  # a named key that is unset stops here
        if j.api not in ("chat", "completions", "embeddings"):
            continue
        async with Engine(cfg.engine, j.endpoint, key, j.api, j.key_hint) as eng:
            try:
                ids = [c["id"] for c in await eng.model_cards(timeout=10.0)]
            except RequestFailure as e:
                if e.kind == "transient":
                    raise JudgeError(f"the {name} judge's endpoint {redact_url(j.endpoint[0])} cannot be reached: start it "
                                     f"(./serve.sh start --role judge MODEL) or fix the endpoint option") from None
                continue
            except ValueError:  # /models is not JSON: the requests will say what is wrong
                continue
        if ids and j.model not in ids:
            raise JudgeError(f"the {name} judge's endpoint {redact_url(j.endpoint[0])} does not serve {j.model!r}; it serves "
                             f"{', '.join(map(repr, ids))}: fix the judge's model option")


def _is_remote(judge: Any) -> bool:
    """Remote judges (LLM, Perspective, embeddings endpoint) run through the engine."""
    return hasattr(judge, "request")


async def judge(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    started = time.time()
    judges: dict[str, Any] = {}
    # judge name -> task, identity, response, context (another answer the judge compares with), key
    remote_work: dict[str, list[tuple[Task, str, ResponseRecord, ResponseRecord | None, str]]] = {}
    writers: dict[str, JsonlWriter] = {}
    counts: dict[str, int] = {}
    summaries: dict[str, Any] = {}
    root = resolve_data_root(cfg.data_path)
    try:
        for task in ctx.tasks:
            inputs = task.judge_inputs([r for r in read_records(ctx.responses_path(task), ResponseRecord) if r.error is None], root)
            done, _ = load_for_resume(ctx.judgments_path(task), JudgmentRecord, cfg.restart)
            writer = writers[task.name] = JsonlWriter(ctx.judgments_path(task), cfg.engine.flush_every, cfg.engine.flush_interval)
            for name in judges_for(cfg, task):
                j = judges.get(name) or judges.setdefault(name, make_judge(cfg, name))
                ident = j.identity(task.question)
                if _is_remote(j):
                    jid = [ident, hosts(j.endpoint)]
                    work = remote_work.setdefault(name, [])
                    for r, c in inputs:
                        k = _judge_key(jid, r, c)
                        if k in done:
                            continue
                        if (v := task.known_verdict(r, c)) is not None:  # settled without asking the judge
                            writer.write(_judgment(k, r, ident, v, attempts=0))
                            counts[ident] = counts.get(ident, 0) + 1
                        else:
                            work.append((task, ident, r, c, k))
                    continue
                todo = [(r, k) for r, c in inputs if (k := _judge_key([ident], r, c)) not in done]
                if not todo:
                    continue
                for start in range(0, len(todo), LOCAL_JUDGE_CHUNK):  # written chunk by chunk: a crash loses little
                    chunk = todo[start : start + LOCAL_JUDGE_CHUNK]
                    verdicts = j.judge(task, [r for r, _ in chunk])
                    for (r, k), v in zip(chunk, verdicts):
                        writer.write(_judgment(k, r, ident, v, attempts=1))
                    writer.flush()
                counts[ident] = counts.get(ident, 0) + len(todo)
        for name, work in remote_work.items():
            if work:
                summaries[name] = await _run_remote_judge(cfg, judges[name], work, writers, ctx.spending)
                for _, ident, *_ in work:
                    counts[ident] = counts.get(ident, 0) + 1
    finally:
        for w in writers.values():
            w.close()
        ctx.manifest.setdefault("stages", {})["judge"] = {
            "started": started,
            "ended": time.time(),
            "judged": counts,
            **({"requests": summaries} if summaries else {}),
        }
        save_manifest(ctx)
    return counts


def _judge_key(judge_id: list, r: ResponseRecord, context: ResponseRecord | None) -> str:
    return record_key("judge", judge_id, r.key) if context is None else record_key("judge", judge_id, r.key, context.key)


def _judgment(key: str, r: ResponseRecord, ident: str, v: Verdict, attempts: int, error: dict | None = None) -> dict[str, Any]:
    """A dict in JudgmentRecord's shape; a missing verdict always carries an error."""
    if error is None and v.label is None:
        error = {"kind": "judge_unparseable", "message": v.error or "no verdict"}
    rec: dict[str, Any] = {"key": key, "response_key": r.key, "subtask": r.subtask, "item_id": r.item_id, "judge": ident}
    for name, value in (("label", v.label), ("raw", v.raw), ("score", v.score), ("error", error)):
        if value is not None:
            rec[name] = value
    if v.extra:
        rec.update(v.extra)
    rec["attempts"] = attempts
    rec["created"] = time.time()
    return rec


def make_judge(cfg: RunConfig, name: str):
    """A judge object by name (the registry in evalkit/judges); construction is cheap (models load on first use)."""
    return build_judge(cfg, name)


async def _run_remote_judge(cfg: RunConfig, j: Any, work: list, writers: dict[str, JsonlWriter],
                            spending: Spending | None) -> dict[str, Any]:
    """One engine run for every request of one remote judge (LLM or embeddings), all subtasks together."""

    def requests() -> Iterator[Request]:
        for task, ident, r, c, k in work:
            yield Request(k, j.request(task, r, c), (task, ident, r, c))

    def on_result(req: Request, res: Result) -> None:
        task, ident, r, c = req.meta
        if res.ok:
            rec = _judgment(req.key, r, ident, j.read(task, res, r, c), res.attempts)
        else:
            err = {"kind": res.error_kind, "status": res.error_status, "message": res.error_message or ""}
            rec = _judgment(req.key, r, ident, Verdict(None), res.attempts, err)
        writers[task.name].write(rec)

    key = resolve_api_key(j.key_env, j.key_option, fallback=j.api != "perspective")
    async with Engine(cfg.engine, j.endpoint, key, j.api, j.key_hint) as eng:
        eng.model = j.model
        eng.price, eng.spending = cfg.prices.get(j.model), spending
        try:
            await eng.run(requests(), on_result, total=len(work), desc=f"judge ({j.api})")
        finally:
            summary = eng.stats.summary()
    return summary


# -- stage 3: score --------------------------------------------------------------------------


def _refusals_of(ctx: RunContext, source_name: str) -> dict[str, bool]:
    """response key -> refused?, by the first refusal judge of the subtask that generated the
    answers (toxicity averages only the answers jailbreak's judge did not call refusals)."""
    source = next(t for t in ctx.tasks if t.name == source_name)
    ident = make_judge(ctx.cfg, judges_for(ctx.cfg, source)[0]).identity(source.question)
    return {j.response_key: j.label == "refusal" for j in read_records(ctx.judgments_path(source), JudgmentRecord)
            if j.judge == ident and j.error is None}


def score(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    root = resolve_data_root(cfg.data_path)
    results: dict[str, Any] = {
        "model": ctx.model,
        "run_name": ctx.run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "subtasks": {},
    }
    outcomes: dict[str, dict[str, int]] = {}  # "subtask|metric|judge" -> item id -> 0/1, for paired comparisons
    for task in ctx.tasks:
        responses = read_records(ctx.responses_path(task), ResponseRecord)
        if not responses:
            raise ConfigError(f"no responses for {task.name} in {ctx.responses_path(task)}: run `evalkit generate` first")
        judgments = read_records(ctx.judgments_path(task), JudgmentRecord)
        metrics: list[Metric] = []
        if task.question is None:
            metrics.extend(task.score([Scored(r, None) for r in responses], RULE_JUDGE))
        refused = _refusals_of(ctx, task.responses_of) if task.responses_of else {}
        expected = {r.key for r, _ in task.judge_inputs([r for r in responses if r.error is None], root)}
        for name in judges_for(cfg, task):
            ident = make_judge(cfg, name).identity(task.question)
            by_response = {j.response_key: j for j in judgments if j.judge == ident}
            rows = [Scored(r, by_response.get(r.key), refused.get(r.key)) for r in responses]
            missing = sum(1 for s in rows if s.answered and s.judgment is None and s.response.key in expected)
            if missing:
                raise ConfigError(f"{missing} {task.name} responses have no {ident} judgment: run `evalkit evaluate` to judge them")
            seen = {(m.name, m.judge) for m in metrics}
            # a rule-scored part of a judged subtask comes back once per judge: keep it once
            metrics.extend(m for m in task.score(rows, ident) if (m.name, m.judge) not in seen)
        if task.question in ("refusal", "harm"):  # read every ASR and refusal rate beside it
            verdicts = [degenerate(r.response) for r in responses if r.error is None and r.response is not None]
            metrics.append(Metric.from_rate("degenerate_rate", rate(verdicts), "lower_is_better", RULE_JUDGE))
        for m in metrics:
            if m.outcomes is not None:
                outcomes[f"{task.name}|{m.name}|{m.judge}"] = {k: int(v) for k, v in m.outcomes.items()}
        results["subtasks"][task.name] = {
            "dimension": task.dimension,
            "suite": task.suite,
            "metric": task.metric,
            "direction": task.direction,
            "n_responses": len(responses),
            "n_failed_requests": sum(1 for r in responses if r.error is not None),
            "metrics": [m.as_result() for m in metrics],
        }
    path = ctx.run_dir / "results.json"
    previous = orjson.loads(path.read_bytes()) if path.exists() else {}
    # keep subtasks scored earlier in the same run dir; this run's subtasks replace theirs
    merged = {**previous.get("subtasks", {}), **results["subtasks"]}
    results["subtasks"] = merged
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    opath = ctx.run_dir / "outcomes.json"
    kept = {k: v for k, v in (orjson.loads(opath.read_bytes()) if opath.exists() else {}).items()
            if k.split("|", 1)[0] not in {t.name for t in ctx.tasks}}  # this run's subtasks replace theirs
    tmp = opath.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps({**kept, **outcomes}))
    tmp.replace(opath)
    ctx.manifest.setdefault("stages", {})["score"] = {"ended": time.time(), "subtasks": [t.name for t in ctx.tasks]}
    save_manifest(ctx)
    return results


__all__ = ["RunContext", "generate", "judge", "score", "discover_model", "model_slug", "FatalAuthError", "RequestFailure"]
