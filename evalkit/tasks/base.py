"""Subtask registry: name -> Task. One module per dimension registers its tasks on import."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..datasets import Item, check_json_records, dataset_file, load_csv, load_json_list
from ..metrics import Metric, grouped_rates, rate, trustllm_rta
from ..records import JudgmentRecord, ResponseRecord

DIMENSIONS = ("truthfulness", "safety", "fairness", "robustness", "privacy", "ethics")
TASKS: dict[str, Task] = {}
RULE_JUDGE = "rule"  # subtasks scored by string rules on the answer: no judge stage


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


@dataclass(frozen=True)
class Scored:
    """One response with its verdict, as handed to Task.score."""

    response: ResponseRecord
    judgment: JudgmentRecord | None
    refused: bool | None = None  # for a subtask judging another's answers: that one's refusal verdict

    # cached: a subtask's metrics read them several times per row, over tens of thousands of rows
    @functools.cached_property
    def answered(self) -> bool:
        return self.response.error is None and self.response.response is not None

    @property
    def answer(self) -> str:
        """The answer's text ('' where there is none: read it where `answered` holds)."""
        return self.response.response or ""

    @functools.cached_property
    def label(self) -> str | None:
        if not self.answered or self.judgment is None or self.judgment.error is not None:
            return None
        return self.judgment.label

    @property
    def verdict(self) -> JudgmentRecord | None:
        """The judgment where it holds a valid label (`label` is not None), else None."""
        return self.judgment if self.label is not None else None


class Task:
    """A subtask: its data file, how each item becomes a chat request, its judge question and metric."""

    name: ClassVar[str]
    dimension: ClassVar[str]
    suite: ClassVar[str] = "trustllm"  # `--dimensions` selects trustllm-suite tasks; others by name
    dataset: ClassVar[str]
    file: ClassVar[str]
    temperature: ClassVar[float | None] = None  # None: leave it to the server's default
    max_tokens: ClassVar[int] = 512
    system_prompt: ClassVar[str | None] = None
    # what the judge is asked: "refusal" | "harm" | "toxicity" | "embedding" | the name of the
    # subtask's own judge prompt; None: scored by string rules
    question: ClassVar[str | None]
    default_judges: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]
    direction: ClassVar[str]
    summary: ClassVar[str]
    responses_of: ClassVar[str | None] = None  # judge another subtask's answers instead of generating
    turns: ClassVar[int] = 1  # > 1: each answer is followed by the next turn (see next_turn)
    api: ClassVar[str | None] = None  # the API its requests need ("completions" to score a prompt); None: the run's --api

    def path(self, root: Path) -> Path:
        return dataset_file(root, self.dataset, self.file)

    def data_files(self) -> tuple[str, ...]:
        """Every file of `dataset` the subtask reads (hashed into the run manifest)."""
        return (self.file,)

    def load(self, root: Path) -> list[Item]:
        """The file's items, in file order; a row `item` turns into None is left out."""
        path = self.path(root)
        rows: list[Any]
        if path.suffix == ".csv":
            rows = load_csv(path, self.required_fields())
        else:
            rows, text = load_json_list(path)
            check_json_records(path, rows, text, self.required_fields())
        return [it for i, row in enumerate(rows) if (it := self.item(i, row)) is not None]

    def required_fields(self) -> tuple[str, ...]:
        return ("prompt",)

    def item(self, index: int, row: dict[str, Any]) -> Item | None:
        group = self.group_of(row)
        return Item(str(index), row["prompt"], {"group": group} if group else {})

    def group_of(self, row: dict[str, Any]) -> str | None:
        return None

    def messages(self, item: Item, system_prompt: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs += item.history
        msgs.append({"role": "user", "content": item.prompt})
        return msgs

    def request_body(self, item: Item, messages: list[dict[str, str]], api: str) -> dict[str, Any]:
        """The request for one item, less the decoding parameters: the chat messages, or for the
        completions API their contents joined into one prompt."""
        if api == "chat":
            return {"messages": messages}
        return {"prompt": "\n\n".join(m["content"] for m in messages)}

    def response_fields(self, item: Item, result, body: dict[str, Any]) -> dict[str, Any]:
        """What the response record keeps of a successful reply (engine Result) beyond its text;
        may replace "response". Raise ValueError when the reply lacks what the subtask needs:
        the record then holds that error instead of an answer."""
        return {}

    def item_params(self, item: Item) -> dict[str, Any]:
        """Decoding settings of this one item, over the subtask's and the command line's (MT-Bench's
        per-category temperature, ASR_Decoding's 49 configurations)."""
        return {}

    def next_turn(self, item: Item, answer: str) -> Item | None:
        """For a multi-turn subtask: the item of the following turn, given this turn's answer."""
        return None

    def judge_request(self, response: ResponseRecord, context: Any = None) -> dict[str, Any]:
        """For a subtask with its own judge prompt: the judge's request body (context: see judge_inputs)."""
        raise NotImplementedError(f"{self.name} has no judge prompt of its own")

    def judge_parse(self, text: str):
        """For a subtask with its own judge prompt: the judge's answer as a Verdict."""
        raise NotImplementedError(f"{self.name} has no judge prompt of its own")

    def judge_read(self, result, response: ResponseRecord, context: ResponseRecord | None):
        """The judge's whole reply (engine Result: text and raw body) as a Verdict; most subtasks
        read only the text."""
        return self.judge_parse(result.text or "")

    def needs_judgment(self, response: ResponseRecord) -> bool:
        """Whether the judge stage must judge this answer (some subtasks judge only part of them)."""
        return True

    def judge_inputs(self, responses: list[ResponseRecord], root: Path) -> list[tuple[ResponseRecord, ResponseRecord | None]]:
        """What the judge stage judges, from the answered responses: (response, context) pairs. The
        judgment is stored under `response`; `context` is a second response the judge also sees
        (sycophancy's paired answer, AlpacaEval's reference output), and its key is part of the
        judgment's key. root: the data folder; a subtask also loads here what its judge_request
        reads from it (MT-Bench's and AlpacaEval's judge prompts)."""
        return [(r, None) for r in responses if self.needs_judgment(r)]

    def known_verdict(self, response: ResponseRecord, context: ResponseRecord | None):
        """A verdict that needs no judge call (AlpacaEval: identical outputs tie), else None."""
        return None

    def embed_texts(self, response: ResponseRecord) -> list[str]:
        """For an embedding-scored subtask: the texts to embed, the answer first ("" would be rejected)."""
        return [response.response or " "]

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        raise NotImplementedError


def judge_body(content: str) -> dict[str, Any]:
    """A request to an LLM judge as TrustLLM sends it (one user turn, temperature 0); 16 tokens
    hold every label its prompts ask for."""
    return {"messages": [{"role": "user", "content": content}], "temperature": 0.0, "max_tokens": 16}


class RefusalTask(Task):
    """TrustLLM RtA subtasks: no system prompt, T = 1.0, Longformer refusal judge."""

    temperature = 1.0
    question = "refusal"
    default_judges = ("classifier",)
    metric = "rta"
    direction = "higher_is_better"
    per_group = False

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        refused = [None if r.label is None else r.label == "refusal" for r in rows]
        answered = [r.answered for r in rows]
        partial = sum(1 for r in rows if r.label == "partial_refusal")
        details = {"partial_refusals": partial} if partial else None
        ids = [r.response.item_id for r in rows]  # per item: a paired comparison of two runs needs them
        metrics = [self._metric(self.metric, rate(refused, ids), trustllm_rta(refused, answered), judge, details)]
        if self.per_group:
            groups = [r.response.item.get("group") for r in rows]
            for g, idx_rate in grouped_rates(groups, refused).items():
                sub = [i for i, x in enumerate(groups) if x == g]
                tv = trustllm_rta([refused[i] for i in sub], [answered[i] for i in sub])
                metrics.append(self._metric(f"{self.metric}/{g}", idx_rate, tv, judge, None))
        return metrics

    def _metric(self, name: str, r, trust_value: float | None, judge: str, details) -> Metric:
        m = Metric.from_rate(name, r, self.direction, judge, details=details)
        m.with_trustllm(trust_value)
        return m
