"""What every method shares: the interface the loop uses and initialisation from the init word."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol

import torch
from torch import Tensor

from ..concept import Arch, Concept
from ..concept import Method as MethodName
from ..host import Host


class Method(Protocol):
    """What the shared loop needs from a method."""

    name: MethodName

    def vectors(self) -> dict[str, Tensor]:
        """What each text encoder sees in the concept's slot: `{key: [n, d]}`, differentiable."""

    def parameters(self) -> list[Tensor]:
        """The trainable tensors; nothing else receives a gradient."""

    def regularizer(self) -> Tensor | None:
        """An extra loss term, or None."""

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        """The method's update rule at the effective (already scaled) learning rate."""

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        """The learned concept, tensors on the CPU."""

    def report(self) -> list[str]:
        """Lines about the method's own state for the summary on Learn Concept (m*, rank(B), ...)."""


MAX_INIT_TOKENS = 16  # the most vectors Learn Concept's `vectors` input allows


def init_vectors(host: Host, init_word: str, num_vectors: int = 0) -> dict[str, Tensor]:
    """Initial token vectors from the init word's vocabulary rows, per text encoder.

    A word that tokenises into k tokens gives k vectors, each from its token (docs/METHODS.md §3a); `num_vectors`
    > k repeats them in order; encoders whose tokenizers split the word differently all get the longest count.
    The raw token rows are used, not the position-shifted embeddings (§2b quirk).

    Args:
        host (`Host`): the model.
        init_word (`str`): a word or short phrase close to the concept ("dog", "teddy bear").
        num_vectors (`int`, defaults to 0): vectors per encoder; 0 means one per token of `init_word`.
    """
    word = init_word.strip()
    if not word:
        raise ValueError("init_word is empty; give a word close to the concept, such as 'dog' or 'painting'.")
    ids = {key: host.token_ids(key, word) for key in host.encoders}
    longest = max(len(i) for i in ids.values())
    if not all(ids.values()):
        raise ValueError(f"init_word {word!r} produces no tokens; use an ordinary word.")
    if longest > MAX_INIT_TOKENS:
        raise ValueError(f"init_word {word[:40]!r}... splits into {longest} tokens, one vector each; use a word "
                         f"or short phrase of at most {MAX_INIT_TOKENS} tokens.")
    if num_vectors and num_vectors < longest:
        raise ValueError(f"init_word {word!r} splits into {longest} tokens but only {num_vectors} vectors "
                         f"were asked for; set vectors to 0 (one per token) or at least {longest}.")
    # every encoder gets the same count (a prompt's slot holds n tokens); a tokenizer that splits the word into
    # fewer tokens than another (T5 beside CLIP) repeats them in order
    n = num_vectors or longest
    out = {}
    for key, key_ids in ids.items():
        rows = torch.tensor([key_ids[i % len(key_ids)] for i in range(n)])
        table = host.vocabulary(key)
        out[key] = table[rows.to(table.device)].to(host.device, torch.float32)  # [n, d]
    return out


def freeze_encoders(method: Method, keys: Iterable[str]) -> None:
    """Keep the vectors of the text encoders `keys` at their initial values: the parameters those vectors are
    made of stop taking gradients, so their encoders run without autograd (no activations kept for T5 or an LLM)
    and the concept still carries a vector for every encoder.

    Which parameters make which encoder's vectors is read from the autograd graph, so every method is frozen the
    same way, whatever its parameterization.
    """
    keys = set(keys)
    if not keys:
        return
    vectors = method.vectors()
    if not keys < set(vectors):
        raise ValueError(f"cannot freeze {sorted(keys)}: the method has vectors for {sorted(vectors)} and at least "
                         "one encoder must train.")
    params = [p for p in method.parameters() if p.requires_grad]

    def reached(chosen: Iterable[str]) -> set[int]:
        total = torch.stack([vectors[k].sum() for k in chosen]).sum()
        grads = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
        return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}

    frozen, trained = reached(keys), reached(set(vectors) - keys)
    if frozen & trained:
        raise ValueError(f"the {method.name} method shares parameters between encoders; it cannot train only some.")
    for p in params:
        if id(p) in frozen:
            p.requires_grad_(False)
