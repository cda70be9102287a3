"""Utility: MT-Bench (FastChat single-answer grading) and AlpacaEval 1.0 / 2.0 win rates, the
Q-resafe utility metrics, selected by name (suite "utility"); they need an LLM judge
(--judge-endpoint / --judge-model), and compare only under the same judge, prompt and references.
reference_nll needs no judge: the likelihood the model gives AlpacaEval's reference answers.
Prompts are read from the data files, never re-typed (../shared/reference/utility_data.md)."""

from __future__ import annotations

import ast
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..datasets import Item, check_json_records, dataset_file, load_json_list
from ..errors import DataError
from ..judges import Verdict, user_prompt
from ..metrics import Metric, continuation_nll, mean, mt_bench_rating, pooled_nll, win_rate
from ..records import ResponseRecord, record_key
from .base import Scored, Task, register

# FastChat gen_api_answer.py: temperature by category (others 0.7); judge decoding
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
MT_BENCH_NEED_REF = ("math", "reasoning", "coding")
MT_BENCH_REFERENCES = "reference_answer/gpt-4.jsonl"  # always GPT-4's, whatever the judge (FastChat keys them by judge)


@lru_cache(maxsize=8)
def _mt_bench_prompts(path: Path) -> dict[str, dict[str, Any]]:
    rows, _ = load_json_list(path)
    return {r["name"]: r for r in rows}


@lru_cache(maxsize=8)
def _mt_bench_references(path: Path) -> dict[int, list[str]]:
    rows, _ = load_json_list(path)
    return {r["question_id"]: r["choices"][0]["turns"] for r in rows}


@register
class MTBench(Task):
    """80 two-turn questions; turn 2 is asked after the model's own turn-1 answer. Each turn is
    graded 1-10 by the judge with FastChat's single-answer prompts (math, reasoning and coding
    against GPT-4's reference answers)."""

    name = "mt_bench"
    dimension = "utility"
    suite = "utility"
    dataset = "mt_bench"
    file = "question.jsonl"
    max_tokens = 1024
    turns = 2
    question = "mt_bench_single"
    default_judges = ("llm",)
    metric = "score"
    direction = "higher_is_better"
    summary = "MT-Bench: mean 1-10 judge score over 80 questions x 2 turns (FastChat single-answer grading)"

    def required_fields(self) -> tuple[str, ...]:
        return ("question_id", "category", "turns")

    def load(self, root: Path) -> list[Item]:
        rows, text = load_json_list(self.path(root))
        check_json_records(self.path(root), rows, text, self.required_fields())
        refs = _mt_bench_references(dataset_file(root, self.dataset, MT_BENCH_REFERENCES))
        items = []
        for row in rows:
            qid, cat = row["question_id"], row["category"]
            data: dict[str, Any] = {"question_id": qid, "category": cat, "turn": 1, "questions": list(row["turns"])}
            if cat in MT_BENCH_NEED_REF:
                if qid not in refs:
                    raise DataError(f"{MT_BENCH_REFERENCES} has no reference answer for {cat} question {qid}; fetch mt_bench again")
                data["references"] = refs[qid]
            items.append(Item(f"{qid}-1", row["turns"][0], data))
        return items

    def data_files(self) -> tuple[str, ...]:
        return (self.file, "judge_prompts.jsonl", MT_BENCH_REFERENCES)

    def item_params(self, item: Item) -> dict[str, Any]:
        return {"temperature": MT_BENCH_TEMPERATURE.get(item.data["category"], 0.7)}

    def next_turn(self, item: Item, answer: str) -> Item | None:
        if item.data["turn"] != 1:
            return None
        q1, q2 = item.data["questions"][:2]
        history = [*item.history, {"role": "user", "content": q1}, {"role": "assistant", "content": answer}]
        return Item(f"{item.data['question_id']}-2", q2, {**item.data, "turn": 2, "answer_1": answer}, history)

    def judge_inputs(self, responses, root):
        self._prompts = _mt_bench_prompts(dataset_file(root, self.dataset, "judge_prompts.jsonl"))
        return [(r, None) for r in responses]

    def prompt_name(self, response: ResponseRecord) -> str:
        name = "single-math-v1" if "references" in response.item else "single-v1"
        return name + ("-multi-turn" if response.item["turn"] == 2 else "")

    def judge_request(self, response: ResponseRecord, context: Any = None) -> dict[str, Any]:
        prompt = self._prompts[self.prompt_name(response)]
        q, ref = response.item["questions"], response.item.get("references")
        if response.item["turn"] == 1:
            fields = {"question": q[0], "answer": response.response}
            if ref:
                fields["ref_answer_1"] = ref[0]
        else:
            fields = {"question_1": q[0], "answer_1": response.item["answer_1"], "question_2": q[1], "answer_2": response.response}
            if ref:
                fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
        messages = [{"role": "system", "content": prompt["system_prompt"]},
                    {"role": "user", "content": prompt["prompt_template"].format(**fields)}]
        return {"messages": messages, "temperature": 0.0, "max_tokens": 2048}

    def judge_read(self, result, response, context) -> Verdict:
        text = result.text or ""
        rating = mt_bench_rating(text)
        extra = {"prompt_name": self.prompt_name(response), "turn": response.item["turn"]}
        if rating is None:  # FastChat's score -1: counted as invalid, never averaged in
            return Verdict(None, raw=text, error="judge answer holds no [[rating]]", extra=extra)
        return Verdict("rated", raw=text, score=float(rating), extra=extra)

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        by_turn: dict[int, list[Scored]] = {1: [], 2: []}
        for r in rows:
            by_turn[r.response.item["turn"]].append(r)
        second = {r.response.item["question_id"] for r in by_turn[2]}
        # a first turn that failed has no second turn to grade: FastChat would lack that row too
        missing_second = sum(1 for r in by_turn[1] if r.response.item["question_id"] not in second)
        per_category: dict[str, list[float]] = {}
        metrics = []
        for name, part, n_extra in (("score", rows, missing_second), ("score_turn1", by_turn[1], 0), ("score_turn2", by_turn[2], missing_second)):
            rated = [(r, j.score) for r in part if (j := r.verdict) is not None and j.score is not None]
            scores = [s for _, s in rated]
            questions = [r.response.item["question_id"] for r, _ in rated]  # a question's turns go together
            details = None
            if name == "score":
                for r, s in rated:
                    per_category.setdefault(r.response.item["category"], []).append(s)
                details = {"per_category": {c: mean(v) for c, v in sorted(per_category.items())},
                           "n_turn2_not_generated": missing_second}
            metrics.append(Metric.from_mean(name, scores, self.direction, judge, len(part) + n_extra,
                                            clusters=questions if name == "score" else None, details=details))
        return metrics


# -- AlpacaEval ------------------------------------------------------------------------------


def fill_chatml(template: str, fields: dict[str, str]) -> list[dict[str, str]]:
    """AlpacaEval's prompt: plain first-occurrence replacement of {name} (the templates hold
    literal braces, so never str.format), then ChatML blocks split into chat messages."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value, 1)
    messages = []
    for block in template.split("<|im_start|>")[1:]:
        role, _, rest = block.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>")[0].strip()})
    return messages


def is_switched(instruction: str, seed: int = 0) -> bool:
    """AlpacaEval's order randomisation: show the model's output first for this instruction?"""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True], k=1)[0]


def ranking_preference(text: str) -> float | None:
    """AE1 ranking parser: the rank of "model_1" in the judge's Python list; None unless 1 or 2."""
    try:
        ranks = [c["rank"] for c in ast.literal_eval(text.strip()) if c["model"] == "model_1"]
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
        return None
    return float(ranks[0]) if ranks and ranks[0] in (1, 2) else None


def logprob_preference(top_logprobs: list[dict[str, Any]]) -> float | None:
    """AE2 logprob parser: 2 - P(m) over the first token's top logprobs, with "m" and "M"
    matched exactly (a missing one has probability 0); None when neither is there."""
    lp = {t["token"]: t["logprob"] for t in top_logprobs if t.get("token") in ("m", "M")}
    if not lp:
        return None
    lm, lM = lp.get("m", -math.inf), lp.get("M", -math.inf)
    top = max(lm, lM)
    p_m = math.exp(lm - top) / (math.exp(lm - top) + math.exp(lM - top))
    return 2.0 - p_m


@lru_cache(maxsize=8)
def _references(path: Path) -> tuple[tuple[str, str, str], ...]:
    rows, _ = load_json_list(path)
    return tuple((r["instruction"], r["output"], r["generator"]) for r in rows)


@register
class AlpacaEval(Task):
    """AlpacaEval 1.0: 805 instructions, win rate over text-davinci-003's outputs, judged with
    the alpaca_eval_gpt4 ranking prompt (Q-resafe's setting)."""

    name = "alpaca_eval"
    dimension = "utility"
    suite = "utility"
    dataset = "alpaca_eval"
    file = "alpaca_eval.jsonl"
    max_tokens = 2048
    question = "alpaca_eval_gpt4"
    default_judges = ("llm",)
    metric = "win_rate"
    direction = "higher_is_better"
    summary = "AlpacaEval 1.0: win rate (%) over text-davinci-003 on 805 instructions, alpaca_eval_gpt4 judge prompt"
    reference_file = "alpaca_eval.jsonl"
    prompt_file = "judge_prompts/alpaca_eval_gpt4/alpaca_eval.txt"

    def required_fields(self) -> tuple[str, ...]:
        return ("instruction", "output", "generator")

    def data_files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.file, self.reference_file, self.prompt_file)))

    def item(self, index: int, row: dict[str, Any]) -> Item:
        return Item(str(index), row["instruction"], {"dataset": row.get("dataset")})

    def judge_inputs(self, responses, root):
        refs = _references(dataset_file(root, self.dataset, self.reference_file))
        self._template = dataset_file(root, self.dataset, self.prompt_file).read_text(encoding="utf-8")
        pairs = []
        for r in responses:
            i = int(r.item_id)
            instruction, output, generator = refs[i] if i < len(refs) else (None, None, None)
            if instruction != user_prompt(r):
                raise DataError(f"{self.reference_file} row {i} is not the instruction answered as item {i}: "
                                f"its eval set and {self.file} must list the same instructions in the same order")
            ref = ResponseRecord(key=record_key("reference", generator, output), subtask=self.name, item_id=r.item_id,
                                 model=generator, params={}, response=output, created=0.0)
            pairs.append((r, ref))
        return pairs

    def known_verdict(self, response, context):
        if response.response == context.response:  # AlpacaEval calls no judge on identical outputs
            return Verdict("tie", score=1.5, extra={"switched": False})
        return None

    def judge_request(self, response: ResponseRecord, context: Any = None) -> dict[str, Any]:
        outputs = [context.response, response.response]  # output_1 is the reference, output_2 the model
        if is_switched(user_prompt(response)):
            outputs.reverse()
        messages = fill_chatml(self._template, {"instruction": user_prompt(response), "output_1": outputs[0], "output_2": outputs[1]})
        return {"messages": messages, **self.judge_decoding()}

    def judge_decoding(self) -> dict[str, Any]:
        return {"temperature": 0.0, "max_tokens": 100}

    def slot_preference(self, result) -> float | None:
        return ranking_preference(result.text or "")

    def judge_read(self, result, response, context) -> Verdict:
        switched = is_switched(user_prompt(response))
        pref = self.slot_preference(result)
        extra = {"switched": switched}
        if pref is None:
            return Verdict(None, raw=result.text, error="judge answer holds no valid preference", extra=extra)
        # slot 1 won = 1; with the outputs switched, slot 1 held the model's output
        return Verdict("preference", raw=result.text, score=3.0 - pref if switched else pref, extra=extra)

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        prefs = [j.score if (j := r.verdict) is not None else None for r in rows]
        wr = win_rate(prefs)
        answered = [len(r.answer) for r in rows if r.answered]
        details: dict[str, Any] = dict(wr or {})
        details.pop("win_rate", None)
        details["avg_length"] = round(sum(answered) / len(answered)) if answered else None
        details["reference"] = self.reference_file
        n_invalid = len(rows) - (wr["n_total"] if wr else 0)
        m = Metric(name="win_rate", value=wr["win_rate"] if wr else None, direction=self.direction, judge=judge,
                   n=len(rows), n_invalid=n_invalid, details=details)
        valid = [p for p in prefs if p is not None and p == p]
        return [m.with_bootstrap(lambda idx: (win_rate([valid[i] for i in idx]) or {}).get("win_rate"), len(valid))]


@register
class AlpacaEval2(AlpacaEval):
    """AlpacaEval 2.0: the same instructions and answers (it judges alpaca_eval's), win rate over
    GPT-4-turbo's outputs with the weighted_alpaca_eval_gpt4_turbo logprob judge. The judge
    endpoint must return top_logprobs. Raw (not length-controlled) win rate: LC needs two
    HF-only files (see the README)."""

    name = "alpaca_eval2"
    responses_of = "alpaca_eval"
    question = "weighted_alpaca_eval_gpt4_turbo"
    summary = "AlpacaEval 2.0: win rate (%) over GPT-4-turbo, weighted logprob judge (judges alpaca_eval's answers)"
    reference_file = "alpaca_eval_gpt4_baseline.json"
    prompt_file = "judge_prompts/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"

    def judge_decoding(self) -> dict[str, Any]:
        return {"temperature": 1.0, "max_tokens": 1, "logprobs": True, "top_logprobs": 5, "stream": False}

    def slot_preference(self, result) -> float | None:
        try:
            first = (result.raw or {})["choices"][0]["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError):
            return None
        return logprob_preference(first.get("top_logprobs") or [])

    def judge_read(self, result, response, context) -> Verdict:
        v = super().judge_read(result, response, context)
        try:  # keep the raw top logprobs: re-parsing needs no new judge call
            if v.extra is not None:
                v.extra["top_logprobs"] = result.raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            if v.label is None:
                v.error = "judge reply has no top_logprobs: AlpacaEval 2.0 needs an endpoint that returns logprobs"
        return v


# -- judge-free utility ----------------------------------------------------------------------

# Alpaca's instruction format: it needs no chat template, so the completions API can score it
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Response:\n")


@register
class ReferenceNLL(Task):
    """Mean per-token negative log-likelihood of AlpacaEval 1.0's 805 reference answers given
    their instructions: a utility number that needs no judge, so a CPU study of a small model has
    one. Each item is one /v1/completions request with echo and logprobs (prompt-token logprobs,
    as the legacy OpenAI API and vLLM define them) over the instruction in Alpaca's format followed
    by the reference answer; only the answer's tokens are scored. max_tokens is 1 (vLLM does not
    take 0) and the generated token is left out."""

    name = "reference_nll"
    dimension = "utility"
    suite = "utility"
    dataset = "alpaca_eval"
    file = "alpaca_eval.jsonl"
    api = "completions"
    question = None
    default_judges = ()
    metric = "nll"
    direction = "lower_is_better"
    summary = "judge-free utility: per-token NLL (nats) of AlpacaEval 1.0's reference answers given the instructions (lower is better)"

    def required_fields(self) -> tuple[str, ...]:
        return ("instruction", "output")

    def item(self, index: int, row: dict[str, Any]) -> Item:
        return Item(str(index), row["instruction"], {"reference": row["output"], "dataset": row.get("dataset")})

    def item_params(self, item: Item) -> dict[str, Any]:
        # part of the measurement, over any --max-tokens or --temperature of the run
        return {"max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1, "stream": False}

    def request_body(self, item: Item, messages: list[dict[str, str]], api: str) -> dict[str, Any]:
        # the run's --system-prompt has no place in this format: the scored text is fixed by the data
        return {"prompt": ALPACA_PROMPT.format(instruction=item.prompt) + item.data["reference"]}

    def response_fields(self, item: Item, result, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        try:
            lp = result.raw["choices"][0]["logprobs"]
            token_logprobs, offsets = lp["token_logprobs"], lp["text_offset"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("the reply has no prompt logprobs: reference_nll needs /v1/completions with echo and "
                             "logprobs (vLLM, evalkit's HF server)") from None
        if not (result.text or "").startswith(prompt) or len(offsets) != len(token_logprobs):
            raise ValueError("the reply does not echo the prompt: reference_nll needs /v1/completions with echo")
        start = len(prompt) - len(item.data["reference"])
        nll, n = continuation_nll(token_logprobs, offsets, start, len(prompt))
        return {"response": prompt[start:], "nll": nll, "n_tokens": n}

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        parts = [(r.response.item["nll"], r.response.item["n_tokens"]) for r in rows if r.answered and r.response.item.get("n_tokens")]
        value = pooled_nll(parts)
        per_item = [s / n for s, n in parts]
        details = {"perplexity": math.exp(value) if value is not None else None, "tokens": sum(n for _, n in parts),
                   "mean_item_nll": mean(per_item), "prompt_format": "alpaca"}
        m = Metric(name="nll", value=value, direction=self.direction, judge=judge, n=len(rows),
                   n_invalid=len(rows) - len(parts), details=details)
        return [m.with_bootstrap(lambda idx: pooled_nll([parts[i] for i in idx]), len(parts))]


__all__ = ["ReferenceNLL", "MTBench", "AlpacaEval", "AlpacaEval2", "fill_chatml", "is_switched", "ranking_preference", "logprob_preference"]
