"""What requests cost: per-model prices (config `[prices."MODEL"]`, USD per million tokens) and a
run's spending limit (`--max-cost`), shared by every engine of the run (generation and judging).

A request is let through only when the limit still holds its worst case: the prompt at 3
characters a token plus its max_tokens, at the model's prices. The hold becomes the cost the
endpoint's `usage` reports when the answer arrives (the hold itself where it reports none). So
the limit is never passed, and a stopped run has sent nothing it could not pay for.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .errors import CostLimitReached  # noqa: F401 - re-exported: the tree is drawn in errors.py


class Price(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="USD per million prompt tokens")
    output: float = Field(0.0, ge=0, description="USD per million completion tokens")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


class Spending:
    """One run's spending against its limit (None: no limit, only counted)."""

    def __init__(self, limit: float | None):
        self.limit = limit
        self.spent = 0.0
        self.held = 0.0  # worst cases of the requests in flight
        self.not_sent = 0
        self.refused: float | None = None  # the worst case of the first request refused

    def hold(self, amount: float) -> bool:
        """Reserve a request's worst case; False (and nothing held) when it would pass the limit."""
        if self.limit is not None and self.spent + self.held + amount > self.limit:
            if self.refused is None:
                self.refused = amount
            return False
        self.held += amount
        return True

    def settle(self, held: float, actual: float) -> None:
        """A request's hold released and its actual cost spent."""
        self.held -= held
        self.spent += actual

    def stop_message(self) -> str:
        return (f"the next request would pass --max-cost ${self.limit:g}: ${self.spent:.4f} spent, the next one may cost "
                f"${self.refused or 0:.4f} (its prompt and max_tokens), {self.not_sent} requests not sent. Everything "
                f"answered is kept; rerun with a larger --max-cost to resume")
