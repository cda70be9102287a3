"""An embeddings judge: any /v1/embeddings endpoint (vLLM pooling runner, our HF server with
--task embed, a hosted API) through the same engine. Each answer's vector is stored in its
judgment record; subtasks compare vectors (e.g. adversarial_instruction's cosine similarity)."""

from __future__ import annotations

from ..config import key_source
from . import Verdict


class EmbeddingJudge:
    api = "embeddings"

    def __init__(self, model: str, endpoint: list[str], key_env: str | None = None):
        self.model = model
        self.endpoint = endpoint
        self.key_env = key_env
        self.key_hint = key_source(key_env).replace("--api-key-env", "--embed-api-key-env")

    def identity(self, question: str) -> str:
        return f"embedding:{self.model}"

    def request(self, task, response, prompt: str) -> dict:
        return {"input": [response.response or " "], "encoding_format": "float"}

    def read(self, task, result) -> tuple[Verdict, dict]:
        (vector,) = result.raw["embeddings"]
        return Verdict("embedded"), {"embedding": vector}
