"""BaTex: textual inversion in a subspace spanned by vocabulary rows (Du et al., arXiv 2407.00608; docs/METHODS.md §4).

Every vocabulary row is ranked against the init token's row u; the top M rows form a basis B [M, d], and only the
weights w ∈ R^M of the concept vector e = Bᵀw are learned (AdamW, weight decay on w). The vector can therefore
never leave the row space of B, whose rank d1 = rank(B) bounds what it can express. Follows the official
studying910/BaTex `batex/textual_inversion_regression.py` (`WeightVector`, `dist_type`, `--second_token`,
`--lambda_weight`); no code is copied (that repository has no licence).

Decisions of this pack, where upstream differs or is silent:
- The init token's own row is always the first basis row, followed by the ranked rows without it. With w
  one-hot on index 0, the step-0 vector is then exactly the init token's row, as TI starts. Upstream takes the
  top-ranked row, which under the default dot ranking is often a longer row than u itself.
- `cosine` ranks by the true cosine of each row with u; upstream's branch compares along the wrong axis.
- A multi-token init word gives one vector per token, each with its own basis ranked against its own token's
  row; SDXL keeps one basis per encoder (`l`, `g`) and SD 2.x one for `h`.
- `target_rank` (docs/METHODS.md §4e) grows M until rank(B) reaches it, the "change M to get a satisfying rank"
  step of upstream's select-strategy notebook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, get_args

import torch
from torch import Tensor

from ..concept import ENCODER_NAMES, Arch, Concept, Method, cpu_float
from ..host import Host
from .base import init_vectors

Ranking = Literal["dot", "cosine", "l2", "random"]
RANKINGS: tuple[Ranking, ...] = get_args(Ranking)
_CHUNK = 8192  # vocabulary rows scored at a time, so an fp16 table is never copied whole to fp32


@dataclass(frozen=True)
class Options:
    """BaTex settings; the defaults are the official `regression.sh` recipe (docs/METHODS.md §4b).

    Args:
        learning_rate (`float`, defaults to 5e-4): per sample; the loop scales it by batch × accumulation
            (5e-4 × 4 = 2e-3 effective, as upstream's `--scale_lr`).
        steps (`int`, defaults to 1000): optimizer steps.
        flip_p (`float`, defaults to 0.5): horizontal flips, as the diffusers dataset upstream uses.
        weight_decay (`float`, defaults to 1e-2): AdamW's decoupled decay, applied to w.
        basis_size (`int`, defaults to 720): M, the rows of B.
        ranking (`Ranking`, defaults to `"dot"`): how rows are ranked against u: `dot` (largest ⟨E_j, u⟩),
            `cosine` (largest cosine), `l2` (smallest distance) or `random` (u plus M − 1 random rows, the
            paper's ablation).
        second_token (`str`, defaults to `""`): a single-token word forced into the basis (top M − 1 rows plus
            its row); empty for none.
        target_rank (`int`, defaults to 0): grow M until rank(B) ≥ this; 0 turns it off.
        sum_to_one (`float`, defaults to 0.0): λ of the regulariser λ·|1 − Σw|; 0 turns it off (upstream's
            `--lambda_weight` default).
        seed (`int`, defaults to 0): seeds the `random` ranking.
    """

    learning_rate: float = 5e-4  # per sample; × batch 4 = 2e-3 effective (§4b)
    steps: int = 1000            # upstream's BaTex default (its TI baseline uses 3000)
    flip_p: float = 0.5          # the diffusers dataset's flips, kept by upstream
    weight_decay: float = 1e-2   # AdamW's default, acting on w
    basis_size: int = 720        # M
    ranking: Ranking = "dot"     # upstream's `Vector_dot`
    second_token: str = ""       # none
    target_rank: int = 0         # off
    sum_to_one: float = 0.0      # λ; upstream's `--lambda_weight` is 0
    seed: int = 0                # only the random ranking draws

    def __post_init__(self) -> None:
        if self.basis_size < 1:
            raise ValueError(f"basis_size must be at least 1, got {self.basis_size}.")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}.")
        if self.target_rank < 0:
            raise ValueError(f"target_rank must be 0 (off) or positive, got {self.target_rank}.")
        for name in ("sum_to_one", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be 0 (off) or positive, got {value}.")


# -- the basis ---------------------------------------------------------------------------------------------------
def _scores(table: Tensor, u: Tensor, ranking: Ranking) -> Tensor:
    """One score per vocabulary row [V], in float32; a higher score ranks first (l2 is negated)."""
    u = u.float()
    parts = []
    for start in range(0, table.shape[0], _CHUNK):
        rows = table[start:start + _CHUNK].detach().float()                         # [c, d]
        if ranking == "dot":
            parts.append(rows @ u)
        elif ranking == "cosine":
            # true cosine of each row with u (upstream's `dim=0` compares the wrong axis); zero rows score 0
            parts.append(rows @ u / (rows.norm(dim=-1) * u.norm()).clamp_min(1e-12))
        elif ranking == "l2":
            parts.append(-(rows - u).norm(dim=-1))
        else:
            raise ValueError(f"ranking {ranking!r} has no score; choose one of {', '.join(RANKINGS)}.")
    return torch.cat(parts)


def rank_rows(table: Tensor, init_id: int, ranking: Ranking, generator: torch.Generator | None = None) -> Tensor:
    """Every vocabulary id in basis order: the init token first, then the others as `ranking` orders them.

    Args:
        table (`Tensor`): the frozen vocabulary [V, d], any dtype or device.
        init_id (`int`): the init token's id; u = table[init_id].
        ranking (`Ranking`): `dot`, `cosine`, `l2` or `random` (see `Options`).
        generator (`torch.Generator`, *optional*): a CPU generator for the `random` ranking.

    Returns:
        A CPU LongTensor [V], a permutation of 0..V−1 that starts with `init_id`. Ties keep the lower id first.
    """
    num_rows = table.shape[0]
    if not 0 <= init_id < num_rows:
        raise ValueError(f"init_id {init_id} is outside the vocabulary of {num_rows} rows.")
    if ranking == "random":
        order = torch.randperm(num_rows, generator=generator)
    else:
        order = torch.argsort(_scores(table, table[init_id], ranking).cpu(), descending=True, stable=True)
    order = order[order != init_id]
    return torch.cat([torch.tensor([init_id]), order])


def basis_ids(order: Tensor, size: int, second_id: int | None = None) -> Tensor:
    """The first `size` ids of `order`; with `second_id`, the first `size` − 1 others plus `second_id` last."""
    if second_id is None:
        return order[:size]
    rest = order[order != second_id]
    return torch.cat([rest[: size - 1], torch.tensor([second_id])])


def basis_rank(basis: Tensor) -> int:
    """rank(B), computed in float64 on the CPU (the basis is small; MPS has no float64)."""
    return int(torch.linalg.matrix_rank(basis.detach().to("cpu", torch.float64)))


def grow_to_rank(table: Tensor, order: Tensor, size: int, target_rank: int, second_id: int | None = None) -> Tensor:
    """The smallest basis of at least `size` rows, taken along `order`, whose rank reaches `target_rank`.

    rank(B) never falls as rows are added, so the search doubles M until the rank is reached, then bisects.

    Raises:
        ValueError: `target_rank` exceeds the width d, or the whole vocabulary cannot reach it.
    """
    width = table.shape[1]
    if target_rank > width:
        raise ValueError(f"target_rank {target_rank} exceeds the embedding width d = {width}, the largest rank "
                         f"B can have; lower it to at most {width}, or set it to 0 (off).")

    def reaches(m: int) -> bool:
        return basis_rank(table[basis_ids(order, m, second_id).to(table.device)]) >= target_rank

    total = len(order)
    if reaches(size):
        return basis_ids(order, size, second_id)
    low, high = size, min(max(2 * size, target_rank), total)  # reaches(low) is False
    while not reaches(high):
        if high == total:
            raise ValueError(f"target_rank {target_rank} is out of reach: all {total} vocabulary rows together "
                             f"have rank {basis_rank(table)}; lower it, or set it to 0 (off).")
        low, high = high, min(2 * high, total)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return basis_ids(order, high, second_id)


def select_basis(table: Tensor, init_id: int, options: Options, generator: torch.Generator | None = None,
                 second_id: int | None = None) -> Tensor:
    """The vocabulary ids of one basis B (docs/METHODS.md §4a), the init token's row first.

    Args:
        table (`Tensor`): the frozen vocabulary [V, d].
        init_id (`int`): the id of the init token whose row u the rows are ranked against.
        options (`Options`): `basis_size` (M), `ranking` and `target_rank` are used.
        generator (`torch.Generator`, *optional*): a CPU generator for the `random` ranking.
        second_id (`int`, *optional*): a token forced into the basis, as its last row.

    Returns:
        A CPU LongTensor [M] of distinct ids; M > `basis_size` only when `target_rank` had to grow it.
    """
    num_rows = table.shape[0]
    if options.basis_size > num_rows:
        raise ValueError(f"basis_size {options.basis_size} exceeds the vocabulary's {num_rows} rows; lower it to "
                         f"at most {num_rows}.")
    if second_id is not None:
        if options.basis_size < 2:
            raise ValueError("basis_size must be at least 2 with a second_token (the init token's row and its row).")
        if second_id == init_id:
            raise ValueError("the second token is the init token itself; choose another word or leave it empty.")
    order = rank_rows(table, init_id, options.ranking, generator)
    if options.target_rank:
        return grow_to_rank(table, order, options.basis_size, options.target_rank, second_id)
    return basis_ids(order, options.basis_size, second_id)


# -- the parameterization ----------------------------------------------------------------------------------------
def _digits(x: float) -> float:
    return float(f"{x:.7g}")  # ~float32 precision; 7 significant digits keep small weights exact enough


class BasisTextualInversion:
    """e = Bᵀw per encoder and per vector; only w trains, starting one-hot on the init token's row.

    Args:
        bases (`Mapping[str, Sequence[Tensor]]`): per encoder, per vector, the basis rows B [M, d] (float32,
            on the host's device); row 0 must be the init token's row.
        ids (`Mapping[str, Sequence[Tensor]]`): the vocabulary ids of those rows, for the saved state.
        options (`Options`): the settings.
    """

    name: Method = "batex"

    def __init__(self, bases: Mapping[str, Sequence[Tensor]], ids: Mapping[str, Sequence[Tensor]],
                 options: Options = Options()):
        self.options = options
        self.bases = {k: [b.detach().float() for b in rows] for k, rows in bases.items()}      # [M, d] each
        self.ids = {k: [i.detach().cpu().long() for i in rows] for k, rows in ids.items()}
        self.ranks = {k: [basis_rank(b) for b in rows] for k, rows in self.bases.items()}
        self.weights = {k: [torch.nn.Parameter(self._one_hot(b)) for b in rows] for k, rows in self.bases.items()}

    @staticmethod
    def _one_hot(basis: Tensor) -> Tensor:
        w = torch.zeros(basis.shape[0], device=basis.device)
        w[0] = 1.0  # e0 = B[0], the init token's row exactly: every other term is an exact 0
        return w

    def vectors(self) -> dict[str, Tensor]:
        return {k: torch.stack([w @ b for w, b in zip(self.weights[k], rows, strict=True)])     # [n, d]
                for k, rows in self.bases.items()}

    def parameters(self) -> list[Tensor]:
        return [w for rows in self.weights.values() for w in rows]

    def regularizer(self) -> Tensor | None:
        """λ·|1 − Σw|, summed over every weight vector (upstream's `--lambda_weight` term); None when λ = 0."""
        if not self.options.sum_to_one:
            return None
        return self.options.sum_to_one * torch.stack([(1 - w.sum()).abs() for w in self.parameters()]).sum()

    def optimizer(self, learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=self.options.weight_decay)

    def report(self) -> list[str]:
        o = self.options
        return [f"Basis: M = {'/'.join(str(len(i)) for i in self.ids[k])} rows ranked by {o.ranking}, rank(B) = "
                f"{'/'.join(str(r) for r in ranks)} ({ENCODER_NAMES[k]})" for k, ranks in self.ranks.items()]

    def to_concept(self, name: str, arch: Arch, provenance: Mapping[str, Any]) -> Concept:
        o = self.options
        bases = {k: [{"ids": ids.tolist(), "w": [_digits(float(x)) for x in w.detach().cpu()]}
                     for ids, w in zip(self.ids[k], self.weights[k], strict=True)] for k in self.bases}
        state = {"ranking": o.ranking, "basis_size": o.basis_size, "second_token": o.second_token,
                 "target_rank": o.target_rank, "sum_to_one": o.sum_to_one, "seed": o.seed,
                 "rank": {k: list(r) for k, r in self.ranks.items()}, "bases": bases}
        return Concept(name=name, method="batex", arch=arch, state=state, provenance=dict(provenance),
                       vectors={k: cpu_float(v) for k, v in self.vectors().items()})


def _init_ids(host: Host, key: str, word: str, count: int) -> list[int]:
    """The token id each of `count` vectors starts from, in the order `init_vectors` uses (tokens in turn)."""
    ids = host.token_ids(key, word)
    return [ids[i % len(ids)] for i in range(count)]


def _second_id(host: Host, key: str, word: str) -> int | None:
    if not word:
        return None
    ids = host.token_ids(key, word)
    if len(ids) != 1:
        raise ValueError(f"second_token '{word}' splits into {len(ids)} tokens; give a single-token word.")
    return ids[0]


def build(host: Host, init_word: str, num_vectors: int, options: Options, seed: int = 0) -> BasisTextualInversion:
    """BaTex starts one-hot on the init word's row; only the `random` ranking draws, from `options.seed`."""
    # the init word's checks and messages, and the vector count, shared with TI and DTI
    count = next(iter(init_vectors(host, init_word, num_vectors).values())).shape[0]
    word, second = init_word.strip(), options.second_token.strip()
    generator = torch.Generator().manual_seed(options.seed)  # one stream across encoders and vectors, in order
    bases: dict[str, list[Tensor]] = {}
    ids: dict[str, list[Tensor]] = {}
    for key in host.encoders:
        table = host.vocabulary(key)
        second_id = _second_id(host, key, second)
        ids[key] = [select_basis(table, i, options, generator, second_id) for i in _init_ids(host, key, word, count)]
        # a detached copy: the table may be an inference tensor, which autograd cannot save for the backward pass
        bases[key] = [table[rows.to(table.device)].detach().to(host.device, torch.float32).clone()
                      for rows in ids[key]]
    return BasisTextualInversion(bases, ids, options)
