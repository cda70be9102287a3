"""Stage 2, judge: responses -> each subtask's judges (local in chunks, remote through the
Engine) -> judgments/<subtask>.jsonl, resumed by record key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .config import RunConfig
from .cost import Spending
from .datasets import resolve_data_root
from .deployment import hosts
from .endpoints import redact_url, resolve_api_key
from .engine import Engine, Request, RequestFailure, Result
from .judges import HARM_ONLY_JUDGES, QUESTIONS, TOXICITY_JUDGES, Judge, JudgeError, RemoteJudge, Verdict, build_judge, check_judge_names
from .manifest import RunContext, check_prices, save_manifest
from .records import JsonlWriter, JudgmentRecord, ResponseRecord, judgment_dict, load_for_resume, record_key
from .tasks import Task
from .wire import KINDS

LOCAL_JUDGE_CHUNK = 256


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
    judges: dict[str, Judge] = {}
    for task in tasks:
        for name in judges_for(cfg, task):
            judges.setdefault(name, build_judge(cfg, name))
    for name, j in judges.items():
        if not isinstance(j, RemoteJudge):
            continue
        check_prices(cfg, [j.model])
        key = _key(j)  # a named key that is unset stops here
        if not KINDS[j.api].openai:  # no /models to ask
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


def identity(j: Judge, task: Task) -> str:
    """What the judgment records of `task` by `j` are named by."""
    assert task.question is not None, "a rule-scored subtask has no judges (judges_for gives none)"
    return j.identity(task.question)


def _key(j: RemoteJudge) -> str | None:
    """The judge's API key; the OpenAI-key fallbacks apply to OpenAI-compatible endpoints only."""
    return resolve_api_key(j.key_env, j.key_option, fallback=KINDS[j.api].openai)


async def judge(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    started = time.time()
    judges: dict[str, Judge] = {}
    # judge name -> task, identity, response, context (another answer the judge compares with), key
    remote_work: dict[str, list[tuple[Task, str, ResponseRecord, ResponseRecord | None, str]]] = {}
    writers: dict[str, JsonlWriter] = {}
    counts: dict[str, int] = {}
    summaries: dict[str, Any] = {}
    root = resolve_data_root(cfg.data_path)
    try:
        for task in ctx.tasks:
            inputs = task.judge_inputs([r for r in ctx.responses(task) if r.error is None], root)
            done, _ = load_for_resume(ctx.judgments_path(task), JudgmentRecord, cfg.restart)
            writer = writers[task.name] = JsonlWriter(ctx.judgments_path(task), cfg.engine.flush_every, cfg.engine.flush_interval)
            for name in judges_for(cfg, task):
                j = judges.get(name) or judges.setdefault(name, build_judge(cfg, name))
                ident = identity(j, task)
                if isinstance(j, RemoteJudge):
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
    """The judgment record of a verdict; a missing verdict carries the judge's reason as its error."""
    if error is None and v.label is None:
        error = {"kind": "judge_unparseable", "message": v.error or "no verdict"}
    return judgment_dict(key, r, ident, v.label, v.raw, v.score, v.extra, attempts, error)


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

    key = _key(j)
    async with Engine(cfg.engine, j.endpoint, key, j.api, j.key_hint) as eng:
        eng.model = j.model
        eng.price, eng.spending = cfg.prices.get(j.model), spending
        try:
            await eng.run(requests(), on_result, total=len(work), desc=f"judge ({j.api})")
        finally:
            summary = eng.stats.summary()
    return summary
