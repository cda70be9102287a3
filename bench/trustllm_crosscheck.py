"""Cross-check: evalkit's `trustllm_value` against TrustLLM's own metric code, on the real data files
with identical synthetic answers. Prints both numbers per metric; exits 1 on any disagreement.

    python bench/trustllm_crosscheck.py --trustllm DIR [--data-path ../shared/datasets] [--seed 0]

DIR holds TrustLLM's `trustllm` package: the unzipped PyPI wheel (`pip download --no-deps
trustllm==0.3.0`, then unzip) or a git checkout's `trustllm_pkg/`. TrustLLM's code is imported
as it is, not reimplemented. Its own dependencies must be importable (numpy, scipy, pandas,
scikit-learn, openai, tenacity); torch, transformers and the Google client are stubbed when absent,
as the offline import in ../shared/reference/trustllm.md §5 describes (no metric checked here uses them).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stub_heavy_modules() -> None:
    for name in ("torch", "transformers", "googleapiclient", "googleapiclient.discovery"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.Tensor = type("Tensor", (), {})  # scipy probes torch.Tensor
            mod.pipeline = mod.AutoModelForSequenceClassification = mod.AutoTokenizer = None
            mod.discovery = mod
            mod.cuda = types.SimpleNamespace(is_available=lambda: False)
            sys.modules[name] = mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trustllm", type=Path, required=True)
    ap.add_argument("--data-path", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    stub_heavy_modules()
    sys.path.insert(0, str(a.trustllm))
    os.chdir(tempfile.mkdtemp(prefix="trustllm-xcheck-"))  # TrustLLM writes log files into the working folder
    from trustllm.task.ethics import EthicsEval
    from trustllm.task.fairness import FairnessEval
    from trustllm.task.privacy import PrivacyEval
    from trustllm.task.robustness import RobustnessEval
    from trustllm.task.truthfulness import TruthfulnessEval
    from trustllm.utils import metrics as tl_metrics

    from evalkit.records import ResponseRecord
    from evalkit.tasks import RULE_JUDGE, Scored, all_tasks

    rng = random.Random(a.seed)
    tasks = all_tasks()

    def rows_and_records(task_name: str, answer):
        """Our Scored rows and TrustLLM's list-of-dicts (original record + res) for the same answers."""
        import json

        task = tasks[task_name]
        raw = json.loads(task.path(a.data_path).read_text())
        items = task.load(a.data_path)
        rows, records = [], []
        for it, rec in zip(items, raw):
            res = answer(rec)
            rows.append(Scored(ResponseRecord(key=it.id, subtask=task_name, item_id=it.id, model="m", params={}, created=0.0,
                                              response=res, **it.data), None))
            records.append({**rec, "res": res})
        return task, rows, records

    checks: list[tuple[str, float | None, float | None]] = []

    def ours(metrics, name):
        m = next(m for m in metrics if m.name == name)
        return m.trustllm_value if m.trustllm_value is not None else m.value

    glue_pool = ["Yes.", "No.", "yes and no", "Positive", "negative", "Maybe", "I do not know", "是", "maybe not"]
    task, rows, records = rows_and_records("adversarial_glue", lambda rec: rng.choice(glue_pool))
    theirs = RobustnessEval().advglue_eval(records)
    mine = task.score(rows, RULE_JUDGE)
    for name, key in (("rs", "RS"), ("avg_acc", "avg_acc"), ("avg_adv_acc", "avg_adv_acc"), ("avg_asr", "avg_asr")):
        checks.append((f"adversarial_glue {name}", ours(mine, name), theirs[key]))

    conf_pool = ["strongly agree", "Strongly agree", "Neutral", "0) Neutral", "somewhat disagree", "The answer is 50.",
                 "Rating: 75", "somewhat agree", "-50", "No idea.", "I'd say strongly disagree"]
    task, rows, records = rows_and_records("privacy_confidence", lambda rec: rng.choice(conf_pool))
    checks.append(("privacy_confidence pearson", ours(task.score(rows, RULE_JUDGE), "pearson"), PrivacyEval().ConfAIDe_eval(records)))

    def leak_answer(rec):
        return rng.choice([rec["gt-email"], f"It is {rec['gt-email']}.", "someone@enron.com", "no address here", "x@foo.org",
                           rec["gt-email"].replace(".com", ".org"), None])

    task, rows, records = rows_and_records("privacy_leakage", leak_answer)
    theirs = PrivacyEval().leakage_eval(records)
    mine = task.score(rows, RULE_JUDGE)
    for name, key in (("rta", "RtA"), ("td", "TD"), ("cd", "CD")):
        checks.append((f"privacy_leakage {name}", ours(mine, name), theirs[key]))

    social_pool = ["good", "It is bad.", "neutral", "Good and bad", "not good", "I cannot say", "NEUTRAL!", "bad, not good"]
    task, rows, records = rows_and_records("implicit_social", lambda rec: rng.choice(social_pool))
    checks.append(("implicit_social accuracy", ours(task.score(rows, RULE_JUDGE), "accuracy"),
                   EthicsEval().implicit_ethics_eval(records, "social_norm")["overall"]))

    moral_pool = ["A", "B", "A. I would do that.", "B) because", "A sentence about it", "A. one B. two", "Option B", "", None]
    task, rows, records = rows_and_records("explicit_moralchoice", lambda rec: rng.choice(moral_pool))
    low_records = [r for r in records if r["type"] == "low"]
    checks.append(("explicit_moralchoice accuracy_low", ours(task.score(rows, "judge"), "accuracy_low"),
                   EthicsEval().explicit_ethics_eval(low_records, "low")))

    # implicit_ethics: the judge's verdicts are attached as TrustLLM's `eval_res`, so its AutoEvaluator
    # skips those items and sends nothing anywhere
    from evalkit.records import ErrorInfo, JudgmentRecord

    ethics_pool = ["It is not wrong.", "It is wrong.", "Hmm.", "Wrong, not wrong, wrong", "Not sure.", "not wrong at all"]
    judge_pool = ["Wrong", "Not wrong", "Not sure", None, "It depends"]
    task, rows, records = rows_and_records("implicit_ethics", lambda rec: rng.choice(ethics_pool))
    for i, (row, rec) in enumerate(zip(rows, records)):
        if task.needs_judgment(row.response):
            v = rng.choice(judge_pool)
            rec["eval_res"] = v
            verdict = task.judge_parse(v) if v is not None else None
            err = (ErrorInfo(kind="transient", message="x") if v is None
                   else None if verdict.label else ErrorInfo(kind="judge_unparseable", message="x"))
            rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                          item_id=row.response.item_id, judge="J", raw=v,
                                                          label=verdict.label if verdict else None, error=err, created=0.0))
    theirs = EthicsEval().implicit_ethics_eval(records, "ETHICS")["overall"]
    checks.append(("implicit_ethics accuracy", ours(task.score(rows, "J"), "accuracy"), theirs))

    # ood_generalization: TrustLLM calls its GPT judge inline for unclear DDXPlus answers; that call is
    # replaced by a lookup of the same verdicts evalkit's rows carry
    import trustllm.task.robustness as tl_robustness

    ood_pool = ["positive", "Positive!", "negative", "neutral", "positive or neutral", "The diagnosis is gerd.",
                "It is most likely pericarditis, or anaphylaxis", "gerd", "I think it could be several things, hard to tell " * 2]
    task, rows, records = rows_and_records("ood_generalization", lambda rec: rng.choice(ood_pool))
    verdict_by_prompt = {}
    for i, row in enumerate(rows):
        if task.needs_judgment(row.response):
            prompt = task.judge_request(row.response)["messages"][0]["content"]
            # identical prompts (same answer, same label) must get the same verdict: the lookup is by prompt
            v = verdict_by_prompt.setdefault(prompt, rng.choice(["Correct", "Wrong", "correct.", "Hard to say"]))
            verdict = task.judge_parse(v)
            rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                          item_id=row.response.item_id, judge="J", raw=v, label=verdict.label,
                                                          error=None if verdict.label else ErrorInfo(kind="judge_unparseable", message="x"),
                                                          created=0.0))
    tl_robustness.gpt_auto_eval.get_res = lambda prompt, *a, **k: verdict_by_prompt[prompt]
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):  # extract_target prints every unclear answer
        theirs = RobustnessEval().ood_generalization(records)["overall"]
    checks.append(("ood_generalization (F1 bug)", ours(task.score(rows, "J"), "accuracy"), theirs))

    ext_pool = ["Answer: Supports.", "Answer: Refutes", "It does not support the claim", "Answer: SUPPORT. Refutes later",
                "supports and refutes", "I cannot tell", "Refute"]  # TrustLLM asserts on empty answers: none here
    task, rows, records = rows_and_records("use_external_knowledge", lambda rec: rng.choice(ext_pool))
    checks.append(("use_external_knowledge macro F1", ours(task.score(rows, RULE_JUDGE), "macro_f1"),
                   TruthfulnessEval().external_eval(records)["avg"]))

    halu_pool = ["Yes", "No", "I do not know", "yes and no", "A", "B.", "Answer: A", "C) maybe", "D", "#Your Judgement#: Yes"]
    task, rows, records = rows_and_records("hallucination", lambda rec: rng.choice(halu_pool))
    with redirect_stdout(io.StringIO()):
        theirs = TruthfulnessEval().hallucination_eval(records)["avg"]
    checks.append(("hallucination accuracy", ours(task.score(rows, RULE_JUDGE), "accuracy"), theirs))

    def attach_verdicts(task_name, answer, pool):
        """Rows and records with the same judge outputs: JudgmentRecords for evalkit, eval_res for TrustLLM."""
        task, rows, records = rows_and_records(task_name, answer)
        for i, (row, rec) in enumerate(zip(rows, records)):
            if task.needs_judgment(row.response):
                v = rng.choice(pool)
                rec["eval_res"] = v
                verdict = task.judge_parse(v)
                err = None if verdict.label else ErrorInfo(kind="judge_unparseable", message="x")
                rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                              item_id=row.response.item_id, judge="J", raw=v, label=verdict.label,
                                                              error=err, created=0.0))
        return task, rows, records

    task, rows, records = attach_verdicts("adversarial_factuality", lambda rec: "Actually, that premise is false.",
                                          ["[CORRECTED]", "[NOT_CORRECTED]", "[UNKNOWN]", "The answer: [CORRECTED]"])
    checks.append(("adversarial_factuality", ours(task.score(rows, "J"), "correction_rate"), TruthfulnessEval().advfact_eval(records)))

    internal_pool = ["Answer: 2", "1", "The answer is 0 because", "none", "Answer: Paris", "3 or 2"]
    task, rows, records = attach_verdicts("use_internal_knowledge", lambda rec: rng.choice(internal_pool),
                                          ["YES", "NO", "Yes.", "no", "yes and no", "I don't know"])
    with redirect_stdout(io.StringIO()):
        theirs = TruthfulnessEval().internal_eval(records)["avg"]
    checks.append(("use_internal_knowledge accuracy", ours(task.score(rows, "J"), "accuracy"), theirs))

    # fairness: stereotype agreement (judge verdicts as eval_res) and preference (Longformer labels as
    # eval_res; its evaluator, which would load the model, is replaced by one that returns the data)
    import trustllm.task.fairness as tl_fairness

    class _Labelled:
        def evaluate(self, data, *a, **k):
            return data

    tl_fairness.longformer.HuggingFaceEvaluator = _Labelled
    agree_pool = ["Yes.", "No, never.", "Yes, I agree with this because it is true for many people", "I don't know",
                  "No. That is a stereotype and I do not agree with it at all."]
    task, rows, records = rows_and_records("stereotype_agreement", lambda rec: rng.choice(agree_pool))
    for i, (row, rec) in enumerate(zip(rows, records)):
        if task.needs_judgment(row.response):
            v = rng.choice(["Yes", "No", "Not sure"])
            rec["eval_res"] = v
            rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                          item_id=row.response.item_id, judge="J", raw=v,
                                                          label=task.judge_parse(v).label, error=None if task.judge_parse(v).label
                                                          else ErrorInfo(kind="judge_unparseable", message="x"), created=0.0))
    checks.append(("stereotype_agreement", ours(task.score(rows, "J"), "agreement"), FairnessEval().stereotype_agreement_eval(records)))

    recog_pool = ["1", "2.", "3", "It's a stereotype.", "I think it's an anti-stereotype, not 1", "hmm", "1 or 2",
                  "This sentence reflects a stereotype about the group"]
    task, rows, records = attach_verdicts("stereotype_recognition", lambda rec: rng.choice(recog_pool),
                                          ["stereotype", "anti-stereotype", "unrelated", "unrelated stereotype", "unsure"])
    with redirect_stdout(io.StringIO()):
        theirs = FairnessEval().stereotype_recognition_eval(records)
    checks.append(("stereotype_recognition", ours(task.score(rows, "J"), "accuracy"), theirs))

    disp_pool = ["A", "B.", "C", "A person like this earns more than $70,000", "less than $50,000", "I cannot say", "B) maybe"]
    task, rows, records = rows_and_records("disparagement", lambda rec: rng.choice(disp_pool))
    with redirect_stdout(io.StringIO()):  # p_value prints its data frame
        theirs = FairnessEval().disparagement_eval(records)
    mine = task.score(rows, RULE_JUDGE)
    for attr in ("sex", "race"):
        checks.append((f"disparagement p_{attr}", ours(mine, f"p_{attr}"), float(theirs[attr])))

    pref_pool = ["A", "B.", "I cannot choose.", "Option A, because", "AB"]
    task, rows, records = rows_and_records("preference_bias", lambda rec: rng.choice(pref_pool))
    for i, (row, rec) in enumerate(zip(rows, records)):
        if task.needs_judgment(row.response):
            lab = rng.choice(["LABEL_0", "LABEL_1"])
            rec["eval_res"] = lab
            rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                          item_id=row.response.item_id, judge="J", raw=lab,
                                                          label="refusal" if lab == "LABEL_0" else "compliance", created=0.0))
    with redirect_stdout(io.StringIO()):
        theirs = FairnessEval().preference_eval(records)
    mine = task.score(rows, "J")
    for name, key in (("rta", "overall"), ("rta/plain", "plain"), ("rta/force", "force")):
        checks.append((f"preference_bias {name}", ours(mine, name), theirs[key]))

    # adversarial_instruction: evalkit's embeddings handed over as TrustLLM's `embedding` field, in file order
    task, rows, records = rows_and_records("adversarial_instruction", lambda rec: "an answer")
    embedded = []
    for i, row in enumerate(rows):
        vec = [rng.uniform(-1, 1) for _ in range(8)]
        rows[i] = Scored(row.response, JudgmentRecord(key=f"j{i}", response_key=row.response.key, subtask=task.name,
                                                      item_id=row.response.item_id, judge="E", label="embedded",
                                                      embedding=vec, created=0.0))
        embedded.append({**records[i], "embedding": vec})
    checks.append(("adversarial_instruction (pairing bug)", ours(task.score(rows, "E"), "similarity"),
                   float(tl_metrics.average_cosine_similarity(embedded))))

    # sycophancy persona: TrustLLM's embedder (an OpenAI client) replaced by a lookup of the same vectors
    import json

    import trustllm.task.truthfulness as tl_truth

    syco = json.loads(tasks["sycophancy_persona"].path(a.data_path).read_text())
    vectors: dict[str, list[float]] = {}

    def vec(text):
        return vectors.setdefault(text, [rng.uniform(-1, 1) for _ in range(8)])

    class _Embedder:
        def get_embeddings(self, string, *args, **kwargs):
            return vectors[string]

    tl_truth.embedder.DataEmbedder = _Embedder
    task = tasks["sycophancy_persona"]
    rows, persona = [], []
    for i, rec in enumerate(syco):
        if rec["source"] != "persona":
            continue
        res = rng.choice(["Yes, definitely.", "No, I don't think so.", "It depends.", f"answer {i}"])
        resp = ResponseRecord(key=str(i), subtask=task.name, item_id=str(i), model="m", params={}, created=0.0, response=res)
        rows.append(Scored(resp, JudgmentRecord(key=f"j{i}", response_key=str(i), subtask=task.name, item_id=str(i), judge="E",
                                                label="embedded", embedding=vec(res), created=0.0,
                                                reference_embeddings=[vec(rec["n_completion"]), vec(rec["s_completion"])])))
        persona.append({**rec, "res": res})
    checks.append(("sycophancy_persona", ours(task.score(rows, "E"), "similarity_gap"),
                   TruthfulnessEval().sycophancy_eval(persona + [r for r in syco if r["source"] != "persona"], "persona")))

    # sycophancy preference: TrustLLM's pairwise GPT judge replaced by the same judge outputs, in pair order
    task = tasks["sycophancy_preference"]
    outputs = [rng.choice(["YES", "NO", "Yes, no.", "maybe", "No."]) for _ in range(120)]

    class _PairJudge:
        def evaluate(self, data, task=None, concat=False, **kwargs):
            return [{**d, "eval_res": o} for d, o in zip(data, outputs)]

    tl_truth.gpt_auto_eval.AutoEvaluator = _PairJudge
    pref = [i for i, rec in enumerate(syco) if rec["source"] == "preference"]
    rows = []
    for pos, i in enumerate(pref):
        resp = ResponseRecord(key=str(i), subtask=task.name, item_id=str(i), model="m", params={}, created=0.0,
                              response="an answer", pair=pos // 2, pair_pos=pos % 2)
        j = None
        if pos % 2 == 0:
            v = task.judge_parse(outputs[pos // 2])
            j = JudgmentRecord(key=f"j{i}", response_key=str(i), subtask=task.name, item_id=str(i), judge="J", raw=outputs[pos // 2],
                               label=v.label, created=0.0, error=None if v.label else ErrorInfo(kind="judge_unparseable", message="x"))
        rows.append(Scored(resp, j))
    checks.append(("sycophancy_preference", ours(task.score(rows, "J"), "preference_change"),
                   TruthfulnessEval().sycophancy_eval([{**syco[i], "res": "an answer"} for i in pref], "preference")))

    # toxicity: jailbreak items with Longformer labels; TrustLLM's Perspective client replaced by the same
    # span scores (a failed call leaves no score, as TrustLLM's skip does)
    import trustllm.task.safety as tl_safety
    from trustllm.task.safety import SafetyEval

    task = tasks["toxicity"]
    rows, jb_records = [], []
    for i in range(300):
        refused = rng.random() < 0.3
        failed = rng.random() < 0.1
        summary, span = rng.random(), rng.random()
        resp = ResponseRecord(key=str(i), subtask="jailbreak", item_id=str(i), model="m", params={}, created=0.0, response=f"a{i}")
        j = JudgmentRecord(key=f"j{i}", response_key=str(i), subtask=task.name, item_id=str(i), judge="P", created=0.0,
                           **({"error": ErrorInfo(kind="transient", message="x")} if failed else
                              {"label": "scored", "score": summary, "span_score": span}))
        rows.append(Scored(resp, j, refused))
        jb_records.append({"res": f"a{i}", "eval_res": "LABEL_0" if refused else "LABEL_1", "_span": None if failed else span})

    class _Perspective:
        def evaluate(self, data, resume=False, progress_filename=None):
            return [{**d, "toxicity": d["_span"]} if d["_span"] is not None else d for d in data]

    tl_safety.perspective.PerspectiveEval = _Perspective
    theirs = SafetyEval().toxicity_eval(jb_records)
    mine = task.score(rows, "P")
    for name in ("average_toxicity", "max_toxicity"):
        checks.append((f"toxicity {name}", ours(mine, name), theirs[name]))

    # RtA on judged subtasks: evalkit's verdicts turned into TrustLLM's Longformer labels
    from evalkit.metrics import trustllm_rta

    refused = [rng.choice([True, False, None]) for _ in range(1400)]
    answered = [rng.random() > 0.05 for _ in refused]
    tl_data = [{"eval_res": "LABEL_0" if r else "LABEL_1" if r is False else None} for r, h in zip(refused, answered) if h]
    checks.append(("RtA (jailbreak, misuse, ...)", trustllm_rta(refused, answered), tl_metrics.RtA(tl_data)))

    # The PyPI 0.3.0 wheel still counts "not wrong" as right for gold "wrong" (`if flag_bad`, issue #23);
    # git fixed it (`flag_bad and not flag_good`), and trustllm_value follows git.
    import inspect


    # Likewise its CODAH reader falls back to "0" for a reply without a digit (git: "-1", commit 5d105b3).
    known_bugs = {
        "implicit_ethics": "flag_bad and not flag_good" not in inspect.getsource(EthicsEval.implicit_ethics_eval),
        "use_internal_knowledge": 'else "0"' in inspect.getsource(TruthfulnessEval.eval_internal_codah),
    }
    bad = agree = 0
    print(f"{'metric':36} {'evalkit trustllm_value':>24} {'TrustLLM code':>16}")
    for name, mine_v, their_v in checks:
        same = (mine_v is None and their_v is None) or (mine_v is not None and their_v is not None and abs(mine_v - their_v) < 1e-9)
        known = not same and any(name.startswith(k) and bug for k, bug in known_bugs.items())
        bad += not same and not known
        agree += same
        verdict = "agree" if same else "differs: this TrustLLM has a bug that git fixed (see above)" if known else "DIFFER"
        print(f"{name:36} {mine_v!s:>24} {their_v!s:>16}  {verdict}")
    print(f"{agree}/{len(checks)} agree" + (f"; {len(checks) - agree - bad} known TrustLLM-version difference" if agree + bad < len(checks) else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
