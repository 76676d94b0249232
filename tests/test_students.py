"""The student: sparse logits, layer-subset initialisation, loading and saving."""

import pytest
import torch

from tdrl.errors import ConfigError, ModelNotFoundError
from tdrl.students import Student, load_student
from tdrl.teachers import Teacher


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
    from tdrl.students import gather_logits

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
        student.value_head.bias.fill_(0.25)
    student.save_pretrained(tmp_path / "s")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 512, (1, 6))
    assert torch.allclose(plain(ids).logits, student.model(ids).logits, atol=1e-6)
    again = load_student(str(tmp_path / "s"), value_head=True)
    assert again.value_head.bias.item() == 0.25
    assert isinstance(again, Student) and again.tokenizer.get_vocab() == student.tokenizer.get_vocab()


@pytest.mark.slow
def test_layers_student_from_bundled_teacher(bundled_teacher):
    student = load_student("layers:0,10,20,29", teacher=bundled_teacher)
    assert student.model.config.num_hidden_layers == 4
    n = sum(p.numel() for p in student.model.parameters())
    assert 3.5e7 < n < 4.5e7  # embeddings/head (28M) + 4 of 30 layers
    ids = torch.tensor([bundled_teacher.encode_prompt("What is the capital of France?")])
    hidden = student.hidden_states(ids)
    assert torch.isfinite(student.full_logits(hidden)).all()
