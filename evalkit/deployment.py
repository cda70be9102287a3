"""Which deployment answers a run: what record keys hash instead of the replica URLs.

A deployment is the served model id plus one of, in this order:
1. the name given with `--deployment NAME` (the user's word that these URLs serve one model);
2. the checkpoint the servers report under GET /models (vLLM's `root` and `parent`, evalkit's
   HF server's GGUF `source` with its sha256 and its intervention `recipe`); every replica that
   answers must report the same one, else the run stops;
3. the host names of the endpoint URLs, ports left out (a hosted API reports no checkpoint;
   replicas on one machine share a host).
So adding or removing a replica of one deployment keeps every answer, and a different model,
checkpoint or provider sets the old answers aside.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .endpoints import redact_url
from .engine import FatalAuthError, RequestFailure
from .errors import ConfigError

CHECKPOINT_FIELDS = ("root", "parent", "source", "recipe")


def checkpoint(card: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of a /models card that name the weights behind it (none: the server doesn't say)."""
    if not card:
        return {}
    return {k: card[k] for k in CHECKPOINT_FIELDS if card.get(k) not in (None, "", {})}


def hosts(urls: list[str]) -> list[str]:
    return sorted({f"{urlsplit(u).scheme}://{urlsplit(u).hostname or ''}" for u in urls})


def identity(model: str, cards: dict[str, dict[str, Any] | None], name: str | None = None) -> dict[str, Any]:
    """The deployment of `model` from each replica's card for it (URL -> card, None where the replica
    did not answer or does not list the model)."""
    if name:
        return {"model": model, "deployment": name}
    seen = {url: checkpoint(card) for url, card in cards.items() if card is not None}
    distinct = {repr(sorted(c.items())) for c in seen.values()}
    if len(distinct) > 1:
        lines = "; ".join(f"{redact_url(u)} serves {c or 'an unnamed checkpoint'}" for u, c in seen.items())
        raise ConfigError(f"the endpoints serve different checkpoints of {model}: {lines}. Point --endpoint at replicas "
                          f"of one deployment, or pass --deployment NAME if they are the same model")
    ckpt = next(iter(seen.values()), {})
    if ckpt:
        return {"model": model, "checkpoint": ckpt}
    return {"model": model, "hosts": hosts(list(cards))}


def vetter(deployment: dict[str, Any]) -> Callable[[dict[str, Any] | None], str | None] | None:
    """For Engine.vet_card: why a replica joining mid-run is refused (it serves another checkpoint,
    or names none), or None to admit it. Only a deployment known by its checkpoint can tell."""
    ours = deployment.get("checkpoint")
    if not ours:
        return None

    def vet(card: dict[str, Any] | None) -> str | None:
        if card is None:
            return f"it does not list the model under GET /models, so it cannot show it serves this run's {ours}"
        theirs = checkpoint(card)
        return None if theirs == ours else f"it serves {theirs or 'no named checkpoint'}, not this run's {ours}"

    return vet


async def identify(engine: Any, model: str, name: str | None = None, wait: float = 0.0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(deployment identity, the model's card from the first replica that lists it) from every
    replica's GET /models (5 s each, after up to `wait` seconds for a server to come up). A replica
    that answers without a usable list has no say; when none can be reached the run cannot start."""
    urls = [r.base_url for r in engine.replicas]

    async def card(url: str) -> dict[str, Any] | None | RequestFailure:
        try:
            cards = await engine.model_cards(wait=wait, timeout=5.0, base=url)
        except RequestFailure as e:
            return e if e.kind == "transient" else None
        except (FatalAuthError, ValueError):  # /models closed to this key, or not JSON: the requests will say
            return None
        return next((c for c in cards if c.get("id") == model), None)

    found = dict(zip(urls, await asyncio.gather(*(card(u) for u in urls))))
    unreachable = [v for v in found.values() if isinstance(v, RequestFailure)]
    if len(unreachable) == len(urls):
        raise unreachable[0]
    cards = {u: (None if isinstance(c, RequestFailure) else c) for u, c in found.items()}
    first = next((c for c in cards.values() if c is not None), None)
    return identity(model, cards, name), first
