"""The student: sparse logits, layer-subset initialisation, loading and saving."""

import copy

import pytest
import torch

from tdrl.errors import ConfigError, ModelNotFoundError
from tdrl.models import Student, Teacher, load_student
from tdrl.models.student import VALUE_HEAD_FILE


def test_subset_logits_equal_gathered_full_logits():
    student = load_student("tiny")
    ids = torch.randint(0, 512, (2, 9))
    hidden = student.hidden_states(ids)
    cand = torch.randint(0, 512, (2, 9, 7))
    full = student.full_logits(hidden)
    assert torch.allclose(student.subset_logits(hidden, cand), full.gather(-1, cand), atol=1e-5)
    assert hidden.shape == (2, 9, student.hidden_size) and student.vocab_size == 512


@pytest.mark.parametrize("width", [2, 16])  # 2: more distinct ids than M * H, the per-row fallback
def test_gather_logits_both_branches_match_full_logits_and_gradients(width):
    from tdrl.models import gather_logits

    torch.manual_seed(0)
    weight = torch.randn(50, width, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    hidden = torch.randn(3, 4, width, requires_grad=True)
    ids = torch.randint(0, 50, (3, 4, 3))
    got = gather_logits(hidden, weight, bias, ids)
    want = (hidden @ weight.T + bias).gather(-1, ids)
    assert torch.allclose(got, want, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (weight, bias, hidden))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (weight, bias, hidden))):
        assert torch.allclose(g, w, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("chunk", [7, 64, 1000])  # 7 and 64 do not divide V = 101; 1000 > V: one chunk
@pytest.mark.parametrize("with_bias", [True, False])
def test_vocab_logsumexp_matches_torch_logsumexp_values_and_gradients(dtype, tol, chunk, with_bias):
    """The chunked full-vocabulary normaliser against torch.logsumexp over the full logits: values and
    gradients for hidden states, weight and bias, at a temperature, in float32 and bfloat16."""
    from tdrl.models import vocab_logsumexp

    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 5, 16, generator=gen) * 2).to(dtype).requires_grad_()
    weight = torch.randn(101, 16, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(101, generator=gen).to(dtype).requires_grad_() if with_bias else None
    upstream = torch.randn(2, 5, generator=gen)
    got = vocab_logsumexp(hidden, weight, bias, scale=0.8, chunk=chunk)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    logits = hidden.float() @ weight.float().T + (bias.float() if with_bias else 0.0)
    want = (0.8 * logits).logsumexp(-1)
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        assert torch.allclose(g.float(), w.float(), atol=tol, rtol=tol), (g.float() - w.float()).abs().max()


def test_vocab_logsumexp_keeps_no_full_vocabulary_tensor_for_backward():
    """What autograd saves for the backward pass is the inputs and the [N] result, never [N, V]."""
    from tdrl.models import vocab_logsumexp

    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(5000, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        out = vocab_logsumexp(hidden, weight, chunk=256)
    out.sum().backward()
    assert saved and max(saved) <= weight.numel() and 64 * 5000 not in saved
    assert weight.grad.shape == weight.shape


def test_vocab_logsumexp_under_bfloat16_autocast_with_float32_weights():
    from tdrl.models import vocab_logsumexp

    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vocab_logsumexp(hidden, weight, chunk=128)
    got.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.allclose(got, (hidden @ weight.T).logsumexp(-1), atol=0.1)


def test_vocab_summary_by_brute_force():
    """log-normaliser, max, argmax and entropy of the scaled softmax, chunked, against the full one."""
    from tdrl.models import vocab_summary

    gen = torch.Generator().manual_seed(1)
    hidden, weight, bias = torch.randn(9, 12, generator=gen), torch.randn(77, 12, generator=gen), torch.randn(77)
    got = vocab_summary(hidden, weight, bias, scale=1.7, chunk=10)
    z = 1.7 * (hidden @ weight.T + bias)
    p = z.softmax(-1)
    assert torch.allclose(got.log_z, z.logsumexp(-1), atol=1e-5)
    assert torch.allclose(got.max, z.max(-1).values) and torch.equal(got.argmax, z.argmax(-1))
    assert torch.allclose(got.entropy, -(p * p.log()).sum(-1), atol=1e-5)


def test_support_summary_by_brute_force():
    """Entropy, mass outside A_p(s) and mode outside A_p(s), against the full softmax and a Python loop
    over the set; a row with an empty set has all its mass outside."""
    from tdrl.models import support_summary

    gen = torch.Generator().manual_seed(2)
    hidden, weight, bias = torch.randn(7, 12, generator=gen), torch.randn(50, 12, generator=gen), torch.randn(50)
    z = 0.8 * (hidden @ weight.T + bias)
    p = z.softmax(-1)
    # distinct ids per row (a top-K list), the mode first in rows 0 and 1: in the set at row 0, masked out at row 1
    cand = torch.stack([torch.cat([z[r].argmax().view(1), torch.randperm(50, generator=gen)]) for r in range(7)])
    cand = torch.stack([torch.cat([row[:1], row[1:][row[1:] != row[0]][:4]]) for row in cand])
    mask = torch.rand(7, 5, generator=gen) > 0.3
    mask[0, 0], mask[1, 0], mask[2] = True, False, False
    got = support_summary(hidden, weight, bias, cand, mask, scale=0.8, chunk=16)
    for row in range(7):
        members = {int(c) for c, m in zip(cand[row], mask[row]) if m}
        inside = sum(float(p[row, c]) for c in members)
        assert abs(float(got.outside_mass[row]) - (1.0 - inside)) < 1e-5
        assert bool(got.mode_outside[row]) == (int(z[row].argmax()) not in members)
    assert not got.mode_outside[0] and got.mode_outside[1] and abs(float(got.outside_mass[2]) - 1.0) < 1e-6
    assert torch.allclose(got.entropy, -(p * p.log()).sum(-1), atol=1e-5)
    # a bf16 head without bias: the set and the normaliser see the same rounded logits, so a set that
    # holds the whole vocabulary has outside mass 0 to float32 precision
    half = weight.bfloat16()
    everything = torch.arange(50).expand(7, 50)
    full = support_summary(hidden, half, None, everything, torch.ones(7, 50, dtype=torch.bool), chunk=16)
    assert full.outside_mass.abs().max() < 1e-6 and not full.mode_outside.any()
    z = hidden @ half.float().T
    some = support_summary(hidden, half, None, cand, mask, chunk=16)
    inside = (z.softmax(-1).gather(-1, cand) * mask).sum(-1)
    assert torch.allclose(some.outside_mass, 1.0 - inside, atol=1e-5)


def test_layers_student_copies_teacher_layers(tiny_teacher):
    student = load_student("layers:1", teacher=tiny_teacher)
    assert student.model.config.num_hidden_layers == 1
    t_state, s_state = tiny_teacher.model.state_dict(), student.model.state_dict()
    assert torch.equal(s_state["transformer.h.0.attn.c_attn.weight"], t_state["transformer.h.1.attn.c_attn.weight"])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])
    assert all(p.requires_grad for p in student.model.parameters())
    assert not any(p.requires_grad for p in tiny_teacher.model.parameters())  # the teacher stays frozen
    # the renumbered layer works with a KV cache: stepping agrees with a full forward
    as_teacher = Teacher(student.model, tiny_teacher.tokenizer)
    state = as_teacher.start(["hi there"])
    for token in (40, 41, 42):
        as_teacher.step(state, [token])
    full = as_teacher.logits(state.input_ids)[0, -1]
    assert torch.allclose(torch.log_softmax(full, -1), torch.log_softmax(state.logits[0], -1), atol=1e-4)


def test_layers_student_errors(tiny_teacher):
    with pytest.raises(ConfigError, match="pass the teacher"):
        load_student("layers:0,1")
    with pytest.raises(ConfigError, match="indices in 0..1"):
        load_student("layers:0,5", teacher=tiny_teacher)
    with pytest.raises(ModelNotFoundError):
        load_student("./no/such/student")


def test_save_pretrained_is_an_ordinary_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    student = load_student("tiny", value_head=True)
    with torch.no_grad():
        student.value_head.weight.normal_()
        student.value_head.bias.fill_(0.25)
    student.save_pretrained(tmp_path / "s")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 512, (1, 6))
    assert torch.equal(plain(ids).logits, student.model(ids).logits)
    again = load_student(str(tmp_path / "s"), value_head=True)
    hidden = student.hidden_states(ids)
    assert torch.equal(again.hidden_states(ids), hidden) and torch.equal(again.value(hidden), student.value(hidden))
    assert again.value_head.bias.item() == 0.25
    assert isinstance(again, Student) and again.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    assert (tmp_path / "s" / VALUE_HEAD_FILE).is_file()


def test_save_pretrained_writes_the_state_dict_it_is_given(tmp_path):
    """What export_model does with the weights accelerate gathered: those are written, not the live ones."""
    student = load_student("tiny")
    perturbed = copy.deepcopy(student.model)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.1 * torch.randn_like(param))
    weights = perturbed.state_dict()
    student.save_pretrained(tmp_path / "s", state_dict=weights)
    written = load_student(str(tmp_path / "s")).model.state_dict()
    assert written.keys() == weights.keys() and all(torch.equal(written[k], weights[k]) for k in weights)
    live = student.model.state_dict()
    assert not torch.equal(written["transformer.wte.weight"], live["transformer.wte.weight"])


@pytest.mark.slow
def test_layers_student_from_bundled_teacher(bundled_teacher):
    student = load_student("layers:0,10,20,29", teacher=bundled_teacher)
    assert student.model.config.num_hidden_layers == 4
    n = sum(p.numel() for p in student.model.parameters())
    assert 3.5e7 < n < 4.5e7  # embeddings/head (28M) + 4 of 30 layers
    ids = torch.tensor([bundled_teacher.encode_prompt("What is the capital of France?")])
    hidden = student.hidden_states(ids)
    assert torch.isfinite(student.full_logits(hidden)).all()


def test_a_layer_cut_copies_only_its_layers_and_leaves_the_teacher_whole(tiny_teacher, monkeypatch):
    """The cut deep-copies the chosen layers only (a device-mapped teacher must not be copied whole first),
    and the teacher keeps every layer, unshared with the student."""
    import copy

    layers_before = list(tiny_teacher.model.transformer.h)
    copied = []
    deepcopy = copy.deepcopy

    def counting(obj, *args, **kwargs):
        copied.append(sum(1 for m in obj.modules() if m in layers_before))
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting)
    student = load_student("layers:1", teacher=tiny_teacher)
    assert copied == [1]  # one copy, holding one of the teacher's layers
    assert list(tiny_teacher.model.transformer.h) == layers_before and len(layers_before) > 1
    s, t = student.model.transformer.h[0].attn.c_attn.weight, tiny_teacher.model.transformer.h[1].attn.c_attn.weight
    assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
