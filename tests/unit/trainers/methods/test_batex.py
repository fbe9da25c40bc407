import pytest
import torch
from concept_forge.trainers.files import read_concept, save_concept
from concept_forge.trainers.loop import LoopOptions, TrainingSet, train
from concept_forge.trainers.methods.batex import (
    BasisTextualInversion,
    Options,
    basis_rank,
    build,
    rank_rows,
    select_basis,
)
from concept_forge.trainers.templates import OBJECT_TEMPLATES
from tiny_host import TinyHost, tiny_images

# Row 2 is u = e1. Worked by hand (d = 2):
#   row        dot    cosine   l2 distance
#   0 [3, 3]   3      0.707    3.606
#   1 [.9,.1]  0.9    0.994    0.141
#   3 [-1, 0]  -1     -1       2
#   4 [2,-.5]  2      0.970    1.118
#   5 [0, .4]  0      0        1.077
TABLE = torch.tensor([[3.0, 3.0], [0.9, 0.1], [1.0, 0.0], [-1.0, 0.0], [2.0, -0.5], [0.0, 0.4]])
U_ID = 2


def span_residual(v, basis):
    """‖v − proj_rowspace(B) v‖ / ‖v‖ per row of v, in float64."""
    v, basis = v.detach().double(), basis.detach().double()
    _, s, vh = torch.linalg.svd(basis, full_matrices=False)
    q = vh[: int((s > s[0] * 1e-10).sum())]                                        # [rank, d], orthonormal rows
    return ((v - v @ q.T @ q).norm(dim=-1) / v.norm(dim=-1)).max().item()


def batex_run(arch="sd1", init_word="dog", steps=30, learning_rate=0.01, seed=0, **options):
    host = TinyHost(arch)
    method = build(host, init_word, 0, Options(**options))
    result = train(method, host, TrainingSet(tiny_images(), list(OBJECT_TEMPLATES)),
                   LoopOptions(steps=steps, learning_rate=learning_rate, batch_size=2, seed=seed, heldout_draws=16))
    return host, method, result


# -- (d) rankings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranking, expected", [("dot", [2, 0, 4, 1, 5, 3]), ("cosine", [2, 1, 4, 0, 5, 3]),
                                               ("l2", [2, 1, 5, 4, 3, 0])])
def test_each_ranking_orders_the_rows_as_computed_by_hand(ranking, expected):
    assert rank_rows(TABLE, U_ID, ranking).tolist() == expected
    ids = select_basis(TABLE, U_ID, Options(basis_size=3, ranking=ranking))
    assert ids.tolist() == expected[:3]


def test_the_init_row_comes_first_even_when_dot_ranks_a_longer_row_above_it():
    scores = TABLE @ TABLE[U_ID]
    assert int(scores.argmax()) == 0  # upstream's top-ranked row would be [3, 3], not u
    assert select_basis(TABLE, U_ID, Options(basis_size=1)).tolist() == [U_ID]


def test_cosine_ranks_by_angle_not_length():
    table = torch.tensor([[1.0, 0.0], [100.0, 50.0], [0.1, 0.0]])  # a long row at 26.6°, a short one at 0°
    assert rank_rows(table, 0, "cosine").tolist() == [0, 2, 1]
    assert rank_rows(table, 0, "dot").tolist() == [0, 1, 2]


def test_random_basis_holds_u_and_distinct_rows_and_follows_the_seed():
    table = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        return select_basis(table, 17, Options(basis_size=20, ranking="random"), torch.Generator().manual_seed(seed))

    ids = draw(0)
    assert ids[0] == 17 and len(set(ids.tolist())) == 20
    assert torch.equal(ids, draw(0)) and not torch.equal(ids, draw(1))


def test_basis_size_and_options_errors_name_the_fix():
    with pytest.raises(ValueError, match="basis_size 7 exceeds the vocabulary's 6 rows; lower it to at most 6"):
        select_basis(TABLE, U_ID, Options(basis_size=7))
    with pytest.raises(ValueError, match="ranking must be one of dot, cosine, l2, random, got 'manhattan'"):
        Options(ranking="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="basis_size must be at least 1"):
        Options(basis_size=0)
    with pytest.raises(ValueError, match="sum_to_one must be 0 \\(off\\) or positive"):
        Options(sum_to_one=-1.0)


# -- (e) second token and target rank ------------------------------------------------------------------------------
def test_second_token_is_the_last_basis_row_after_the_top_m_minus_1():
    host = TinyHost()
    (dog,), (cat,) = host.token_ids("l", "dog"), host.token_ids("l", "cat")
    method = build(host, "dog", 0, Options(basis_size=6, second_token=" cat "))
    ids = method.ids["l"][0].tolist()
    order = [i for i in rank_rows(host.vocabulary("l"), dog, "dot").tolist() if i != cat]
    assert ids == order[:5] + [cat] and ids[0] == dog
    assert torch.equal(method.bases["l"][0][-1], host.vocabulary("l")[cat])


def test_second_token_must_be_one_token_other_than_the_init_token():
    with pytest.raises(ValueError, match="second_token 'teddy bear' splits into 2 tokens; give a single-token word."):
        build(TinyHost(), "dog", 0, Options(basis_size=6, second_token="teddy bear"))
    with pytest.raises(ValueError, match="the second token is the init token itself"):
        build(TinyHost(), "dog", 0, Options(basis_size=6, second_token="dog"))


# u = e1; the rows ranked after it by dot are collinear with u before a second, then a third direction appears:
# prefix ranks by M = 1..7 are 1, 1, 1, 2, 3, 3, 3.
COLLINEAR = torch.tensor([[1.0, 0, 0], [4, 0, 0], [3, 0, 0], [2, 1, 0], [1.5, 0, 1], [0, 1, 1], [-1, 0, 0]])


@pytest.mark.parametrize("target_rank, size", [(0, 2), (1, 2), (2, 4), (3, 5)])
def test_target_rank_grows_m_to_the_smallest_basis_that_reaches_it(target_rank, size):
    ids = select_basis(COLLINEAR, 0, Options(basis_size=2, target_rank=target_rank))
    assert ids.tolist() == list(range(size))
    assert basis_rank(COLLINEAR[ids]) == max(target_rank, 1)


def test_target_rank_on_a_real_sized_search_reaches_full_width():
    host = TinyHost()
    method = build(host, "dog", 0, Options(basis_size=4, target_rank=16))
    ids = method.ids["l"][0]
    assert method.ranks["l"] == [16] and len(ids) >= 16
    assert basis_rank(host.vocabulary("l")[ids[:-1]]) < 16  # one row fewer would not do
    assert method.report() == [f"Basis: M = {len(ids)} rows ranked by dot, rank(B) = 16 (clip_l)"]


def test_target_rank_beyond_the_width_or_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="target_rank 4 exceeds the embedding width d = 3, the largest rank B can "
                                         "have; lower it to at most 3, or set it to 0 \\(off\\)"):
        select_basis(COLLINEAR, 0, Options(basis_size=2, target_rank=4))
    flat = COLLINEAR.clone()
    flat[:, 2] = 0  # rank 2 in d = 3
    with pytest.raises(ValueError, match="target_rank 3 is out of reach: all 7 vocabulary rows together have rank 2"):
        select_basis(flat, 0, Options(basis_size=2, target_rank=3))


# -- (a) step 0, (f) regularizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ranking", ["dot", "cosine", "l2", "random"])
def test_step_zero_is_the_init_tokens_row_exactly(ranking):
    host = TinyHost()
    method = build(host, "dog", 0, Options(basis_size=20, ranking=ranking))
    assert torch.equal(method.vectors()["l"], host.vocabulary("l")[host.token_ids("l", "dog")])
    (w,) = method.parameters()
    assert w.shape == (20,) and w[0] == 1 and w[1:].abs().sum() == 0
    assert method.optimizer(1e-3).defaults["weight_decay"] == 1e-2  # AdamW's decay acts on w (§4b)


def test_sum_to_one_regularizer_is_lambda_times_the_distance_of_sum_w_from_one():
    host = TinyHost("sdxl")
    assert build(host, "dog", 0, Options(basis_size=5)).regularizer() is None  # λ = 0: off, as upstream
    method = build(host, "dog", 0, Options(basis_size=5, sum_to_one=0.3))
    assert float(method.regularizer().detach()) == 0.0  # one-hot w sums to 1
    w_l, w_g = method.parameters()
    with torch.no_grad():
        w_l.copy_(torch.tensor([0.5, 0.25, -0.5, 0.0, 0.0]))   # Σw = 0.25 → |1 − Σw| = 0.75
        w_g.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0, 0.5]))     # Σw = 2    → |1 − Σw| = 1
    assert float(method.regularizer().detach()) == pytest.approx(0.3 * (0.75 + 1.0))


# -- (b, c) the subspace, (g) the loss ------------------------------------------------------------------------------
def test_the_learned_vector_stays_in_the_row_space_of_b():
    host, method, _ = batex_run(basis_size=12, steps=30)
    v, basis = method.vectors()["l"], method.bases["l"][0]
    assert not torch.equal(v, host.vocabulary("l")[host.token_ids("l", "dog")])  # it trained
    assert span_residual(v, basis) < 1e-5


def test_a_basis_narrower_than_d_confines_the_concept_to_its_subspace():
    host, method, _ = batex_run(basis_size=4, steps=100, learning_rate=0.05)
    init = host.vocabulary("l")[host.token_ids("l", "dog")]
    v, basis = method.vectors()["l"], method.bases["l"][0]
    assert method.ranks["l"] == [4]  # a 4-dimensional subspace of the 16-wide embedding
    assert ((v - init).norm() / init.norm()).item() > 0.05  # it moved well away from u...
    assert span_residual(v, basis) < 1e-5                    # ...but only inside span(B)
    random = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert span_residual(random, basis) > 0.3                # which is a real restriction


def test_batex_lowers_the_heldout_loss():
    # TinyHost, seed 0: 1.1557 → 1.1502 (-0.48%) with M = 12, lr 0.01 effective, 30 steps
    _, _, result = batex_run(basis_size=12, steps=30, learning_rate=0.01)
    assert result.heldout_after < result.heldout_before - 2e-3


def test_only_w_trains_and_the_vocabulary_is_untouched():
    host = TinyHost()
    table = host.vocabulary("l").clone()
    _, method, _ = batex_run(basis_size=8, steps=3)
    assert [p.shape for p in method.parameters()] == [torch.Size([8])]
    assert torch.equal(host.vocabulary("l"), table) and not host.vocabulary("l").requires_grad


# -- (h) one basis per encoder and vector ----------------------------------------------------------------------------
def test_every_encoder_and_every_vector_gets_its_own_basis():
    host = TinyHost("sdxl")
    options = Options(basis_size=6)
    method = build(host, "teddy bear", 0, options)
    teddy, bear = host.token_ids("l", "teddy bear")
    for key, width in (("l", 16), ("g", 24)):
        table = host.vocabulary(key)
        assert [tuple(b.shape) for b in method.bases[key]] == [(6, width), (6, width)]
        for i, token in enumerate((teddy, bear)):
            assert torch.equal(method.ids[key][i], select_basis(table, token, options))  # ranked against its token
            assert torch.equal(method.bases[key][i], table[method.ids[key][i]])
        assert torch.equal(method.vectors()[key], table[[teddy, bear]])
    assert len(method.parameters()) == 4
    assert not torch.equal(method.ids["l"][0], method.ids["l"][1])
    assert method.report() == ["Basis: M = 6/6 rows ranked by dot, rank(B) = 6/6 (clip_l)",
                               "Basis: M = 6/6 rows ranked by dot, rank(B) = 6/6 (clip_g)"]


# -- (i) the saved file ---------------------------------------------------------------------------------------------
def test_the_saved_file_keeps_ids_and_w_and_they_rebuild_the_vector(tmp_path):
    host, method, _ = batex_run("sdxl", "teddy bear", steps=5, basis_size=10, ranking="cosine", sum_to_one=0.1)
    concept = method.to_concept("batex_bear", "sdxl", {"seed": 0})
    back = read_concept(save_concept(concept, tmp_path / "batex_bear.safetensors"))
    assert back.method == "batex" and set(back.vectors) == {"l", "g"}
    state = back.state
    assert (state["ranking"], state["basis_size"], state["sum_to_one"]) == ("cosine", 10, 0.1)
    assert (state["second_token"], state["target_rank"], state["rank"]) == ("", 0, {"l": [10, 10], "g": [10, 10]})
    for key in ("l", "g"):
        rebuilt = []
        for i, saved in enumerate(state["bases"][key]):
            assert saved["ids"] == method.ids[key][i].tolist()
            w = torch.tensor(saved["w"])
            assert torch.allclose(w, method.weights[key][i].detach(), rtol=1e-6, atol=1e-9)
            assert not torch.equal(w, torch.nn.functional.one_hot(torch.tensor(0), 10).float())  # it trained
            rebuilt.append(w @ host.vocabulary(key)[saved["ids"]])                   # B[ids]ᵀw from the vocabulary
        assert torch.allclose(torch.stack(rebuilt), back.vectors[key], rtol=1e-5, atol=1e-6)


def test_the_class_takes_prebuilt_bases():
    basis = TABLE[[2, 0, 4]]
    method = BasisTextualInversion({"l": [basis]}, {"l": [torch.tensor([2, 0, 4])]})
    assert torch.equal(method.vectors()["l"], TABLE[[2]]) and method.ranks == {"l": [2]}
