"""top_p_subset against a brute-force reference (sort everything, accumulate in a Python loop)."""

import math

import pytest
import torch

from tdrl.actions import ActionSubset, top_p_subset


def brute_force(row: torch.Tensor, top_k: int, top_p: float):
    """Reference for one row: probabilities in float64, full sort, Python cumulative loop."""
    probs = torch.softmax(row.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    values, mask, before = [], [], 0.0
    for i in order:
        p = probs[i]
        values.append(p)
        mask.append(p > 0 and (top_p >= 1.0 or before < top_p))
        before += p
    return order, values, mask


def check_against_brute_force(logits: torch.Tensor, top_k: int, top_p: float) -> ActionSubset:
    subset = top_p_subset(logits, top_k=top_k, top_p=top_p)
    k = min(top_k, logits.shape[-1])
    assert subset.ids.shape == subset.logprobs.shape == subset.mask.shape == (*logits.shape[:-1], k)
    flat = logits.reshape(-1, logits.shape[-1])
    ids, lps, mask = (t.reshape(-1, k) for t in (subset.ids, subset.logprobs, subset.mask))
    for r in range(flat.shape[0]):
        order, values, ref_mask = brute_force(flat[r], top_k, top_p)
        # ties may be ordered differently: compare the probability sequence, then each id's own value
        got = lps[r].double().exp().tolist()
        assert got == pytest.approx(values, rel=1e-5, abs=1e-12)
        assert mask[r].tolist() == ref_mask
        assert len(set(ids[r].tolist())) == k
        own = torch.softmax(flat[r].double(), -1)[ids[r]]
        assert own.tolist() == pytest.approx(got, rel=1e-5, abs=1e-12)
    return subset


@pytest.mark.parametrize("shape", [(40,), (5, 33), (2, 3, 17), (1, 1, 300)])
@pytest.mark.parametrize("top_k", [1, 5, 64])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95, 1.0])
def test_random_logits_match_brute_force(shape, top_k, top_p):
    gen = torch.Generator().manual_seed(hash((shape, top_k, top_p)) % 2**31)
    logits = 3.0 * torch.randn(*shape, generator=gen)
    check_against_brute_force(logits, top_k, top_p)


def test_k_larger_than_vocabulary_keeps_every_token_at_p_one():
    logits = torch.randn(4, 10)
    subset = check_against_brute_force(logits, 64, 1.0)
    assert subset.k == 10
    assert subset.mask.all()
    assert torch.allclose(subset.mass(), torch.ones(4))


def test_ties_hand_computed():
    # probabilities e^2/Z (x3), e^1/Z (x2), 1/Z with Z = 3e^2 + 2e + 1
    logits = torch.tensor([2.0, 1.0, 2.0, 0.0, 2.0, 1.0])
    z = 3 * math.e**2 + 2 * math.e + 1
    top = math.e**2 / z  # 0.2583
    subset = check_against_brute_force(logits, 6, 0.5)
    # mass before: 0, 0.258, 0.517 -> the first two are in, the third (0.517 >= 0.5) is out
    assert subset.mask.tolist() == [True, True, False, False, False, False]
    assert set(subset.ids[:3].tolist()) == {0, 2, 4}
    assert subset.mass().item() == pytest.approx(2 * top, rel=1e-6)
    assert set(subset.ids[:2].tolist()) <= {0, 2, 4}


def test_uniform_hand_computed():
    subset = check_against_brute_force(torch.zeros(10), 10, 0.75)
    # each token has 0.1: mass before the 8th is 0.7 < 0.75, before the 9th 0.8 >= 0.75
    assert subset.size().item() == 8
    assert subset.mass().item() == pytest.approx(0.8, rel=1e-6)


def test_very_peaked_distribution_has_one_token():
    logits = torch.tensor([[100.0, 0.0, 0.0, -5.0]])
    subset = check_against_brute_force(logits, 4, 0.999999)
    assert subset.size().tolist() == [1]
    assert subset.ids[0, 0].item() == 0


def test_neg_inf_logits_are_never_in_the_set():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")])
    subset = check_against_brute_force(logits, 4, 1.0)
    assert subset.ids[:2].tolist() == [2, 0]
    assert subset.mask.tolist() == [True, True, False, False]
    assert torch.isneginf(subset.logprobs[2:]).all()


def test_crossing_token_included_and_never_empty():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert top_p_subset(logits, 3, 0.6).mask.tolist() == [True, True, False]  # 0.5 < 0.6: take the 0.3
    assert top_p_subset(logits, 3, 0.49).mask.tolist() == [True, False, False]  # 0.5 reaches 0.49
    assert top_p_subset(logits, 3, 0.81).mask.tolist() == [True, True, True]  # 0.8 < 0.81: take the 0.2
    assert top_p_subset(logits, 3, 1e-9).mask.tolist() == [True, False, False]


def test_logprobs_are_normalised_over_full_vocabulary_not_the_top_k():
    logits = torch.randn(3, 100)
    subset = top_p_subset(logits, top_k=5, top_p=1.0)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(subset.logprobs, full.gather(-1, subset.ids), atol=1e-6)
    assert (subset.mass() < 1).all()


def test_helpers_dense_mask_contains_masked_logprobs():
    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(2, 4, 30, generator=gen)
    subset = top_p_subset(logits, top_k=8, top_p=0.7)
    dense = subset.dense_mask(30)
    assert dense.shape == (2, 4, 30)
    assert torch.equal(dense.sum(-1), subset.size())
    for b in range(2):
        for t in range(4):
            _, _, ref = brute_force(logits[b, t], 8, 0.7)
            members = {i for i, m in zip(subset.ids[b, t].tolist(), ref) if m}
            assert set(torch.nonzero(dense[b, t]).flatten().tolist()) == members
    tokens = torch.randint(0, 30, (2, 4), generator=gen)
    assert torch.equal(subset.contains(tokens), dense.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert subset.contains(subset.ids[..., 0]).all()
    masked = subset.masked_logprobs()
    assert torch.equal(torch.isfinite(masked), subset.mask)
    probs = torch.softmax(logits.double(), -1)
    assert torch.allclose(subset.mass().double(), (probs * dense).sum(-1), atol=1e-6)


def test_half_precision_logits_are_accepted():
    logits = torch.randn(3, 50)
    a = top_p_subset(logits.to(torch.bfloat16), 10, 0.8)
    assert a.logprobs.dtype == torch.float32
    assert a.mask[:, 0].all()


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan"), True, "0.8"])
def test_bad_top_p_raises(top_p):
    with pytest.raises(ValueError, match="top_p"):
        top_p_subset(torch.randn(5), top_k=3, top_p=top_p)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_bad_top_k_raises(top_k):
    with pytest.raises(ValueError, match="top_k"):
        top_p_subset(torch.randn(5), top_k=top_k, top_p=0.8)


def test_non_floating_logits_raise():
    with pytest.raises(ValueError, match="floating"):
        top_p_subset(torch.arange(5), top_k=3, top_p=0.8)


@pytest.mark.parametrize("row", [[float("-inf")] * 4, [0.0, float("nan"), 1.0, 2.0]])
def test_rows_without_a_distribution_raise(row):
    with pytest.raises(ValueError, match="NaN|-inf"):
        top_p_subset(torch.tensor(row), top_k=2, top_p=0.8)


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95, 0.999])
def test_exact_top_p_equals_the_sort_everything_nucleus(top_p):
    """No top-k cap, no full sort: doubling k until every row's top-k holds p gives the nucleus of a
    full sort (flat rows need far more than the first k = 4)."""
    from tdrl.actions import exact_top_p

    gen = torch.Generator().manual_seed(3)
    logits = torch.cat([0.2 * torch.randn(3, 500, generator=gen), 6.0 * torch.randn(3, 500, generator=gen)])
    subset = exact_top_p(logits, top_p, start_k=4)
    full = top_p_subset(logits, top_k=500, top_p=top_p)
    for r in range(logits.shape[0]):
        assert set(subset.ids[r][subset.mask[r]].tolist()) == set(full.ids[r][full.mask[r]].tolist())
    peaked = exact_top_p(logits[3:], top_p, start_k=4)  # peaked rows alone stop long before V
    assert peaked.ids.shape[-1] <= 128 < subset.ids.shape[-1]  # the flat rows made it grow
