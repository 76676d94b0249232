"""Bigger students: LoRA adapters (peft) and gradient checkpointing, on the tiny models.

Every check compares against a computation that does not go through the code under test: the model's
own forward (through peft's layers) for the logits tdrl reads from the LM head, peft's own
``merge_and_unload`` for the merged export, ``from_pretrained`` of what was written, a run without
gradient checkpointing for one with it, and an uninterrupted run for a resumed one."""

import copy
import importlib.util
import json
import sys

import pytest
import torch

from tdrl.agents import list_agents
from tdrl.errors import ConfigError, MissingDependencyError
from tdrl.models import Student, load_student, vocab_logsumexp
from tdrl.models.lora import apply_lora, merged_state_dict, require_peft

#: every test but the one of a missing peft needs it (the dev extra installs it)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (pip install tdrl[lora])")

UNTIED_HEAD = "c_attn,c_proj,c_fc,lm_head"  # the tiny GPT-2 student: every linear layer and its untied head


def tiny_llama(tied: bool = True, vocab: int = 512) -> Student:
    """The bundled teacher's architecture (Llama, tied embeddings) at toy size, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Student(LlamaForCausalLM(config).train())


def perturb_adapters(student: Student, seed: int = 0) -> None:
    """B starts at zero (the adapted model equals the base): give every adapter a non-zero B."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def lora_tiny(targets: str = UNTIED_HEAD, **kw) -> Student:
    torch.manual_seed(0)
    student = apply_lora(load_student("tiny"), rank=4, alpha=8.0, target_modules=targets, base="tiny", **kw)
    perturb_adapters(student)
    return student


CASES = {
    "gpt2-untied-head": lambda: lora_tiny(UNTIED_HEAD),
    "gpt2-head-frozen": lambda: lora_tiny("all-linear"),
    "llama-tied-head": lambda: _adapted(tiny_llama(tied=True), "q_proj,v_proj,lm_head"),
    "llama-untied-head": lambda: _adapted(tiny_llama(tied=False), "q_proj,v_proj,lm_head"),
    "llama-tied-head-frozen": lambda: _adapted(tiny_llama(tied=True), "all-linear"),
}


def _adapted(student: Student, targets: str) -> Student:
    torch.manual_seed(1)
    apply_lora(student, rank=4, alpha=8.0, target_modules=targets, base="toy")
    perturb_adapters(student)
    return student


@needs_peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_logits_tdrl_reads_equal_the_adapted_models_own(case):
    """The sparse logits, the full logits and the chunked normaliser (values and gradients in A and B)
    read the head's effective weight: they equal the logits of the model's own forward through peft."""
    student = CASES[case]()
    ids = torch.randint(0, student.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    own = student.model(input_ids=ids).logits  # peft's layers, the LM head's included
    hidden = student.hidden_states(ids)
    assert torch.allclose(student.full_logits(hidden), own, atol=1e-5)
    cand = torch.randint(0, student.vocab_size, (2, 7, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(student.subset_logits(hidden, cand), own.gather(-1, cand), atol=1e-5)
    head = student.model.get_output_embeddings()
    adapted = hasattr(head, "lora_A")
    assert adapted == case.endswith("head")
    # the normaliser, in chunks that do not divide V, and its gradient in every trainable weight
    lse = vocab_logsumexp(hidden, student.output_weight(), student.output_bias(), chunk=97)
    trainable = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(lse.sum(), trainable)
    want = torch.autograd.grad(own.logsumexp(-1).sum(), trainable)
    assert torch.allclose(lse, own.logsumexp(-1), atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    if adapted:
        assert not torch.equal(student.output_weight(), head.base_layer.weight)  # the adapter counts
        assert got[[i for i, p in enumerate(trainable) if p is head.lora_B["default"].weight][0]].abs().sum() > 0
    # a Student wrapped around the same model (the evaluator does this) reads the same head
    assert torch.equal(Student(student.model).output_weight(), student.output_weight())


@needs_peft
def test_only_the_adapters_and_the_heads_are_trainable():
    from tdrl.testing.problems import kit_agent

    student = lora_tiny()
    agent = kit_agent("iql", student=student)  # a value head and Q heads beside the student
    names = {id(p): n for n, p in agent.named_parameters()}
    in_optimizer = {names[id(p)] for group in agent.param_groups(1e-3) for p in group["params"]}
    assert in_optimizer == {n for n, p in agent.named_parameters() if p.requires_grad}
    assert all("lora_" in n or not n.startswith("student.model.") for n in in_optimizer)
    assert any("lora_A" in n for n in in_optimizer) and any("lora_B" in n for n in in_optimizer)
    assert any(n.startswith("student.value_head") for n in in_optimizer)  # the heads train
    base = [p for n, p in student.model.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    lora = sum(p.numel() for n, p in student.model.named_parameters() if "lora_" in n)
    assert lora < sum(p.numel() for p in base) / 5


@needs_peft
@pytest.mark.parametrize("case", ["gpt2-untied-head", "llama-tied-head", "llama-tied-head-frozen"])
def test_the_merged_export_is_a_plain_hf_model_with_the_adapted_logits(case, tmp_path):
    from transformers import AutoModelForCausalLM

    student = CASES[case]()
    student.lora.export = "merged"
    embed = student.model.get_input_embeddings().weight.detach().clone()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    ids = torch.randint(0, student.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, student.model(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(reloaded.get_input_embeddings().weight, embed)  # the input side keeps the base weights
    saved = json.loads((tmp_path / "config.json").read_text())
    if case == "llama-tied-head":  # the adapted head is no longer the input embedding
        assert saved["tie_word_embeddings"] is False
    assert student.model.config.tie_word_embeddings is (case.startswith("llama-tied"))  # the live model's config


@needs_peft
@pytest.mark.parametrize("case", ["gpt2-untied-head", "llama-tied-head"])
def test_merged_weights_equal_peft_merge_and_unload(case):
    student = CASES[case]()
    theirs = copy.deepcopy(student.lora.peft_model).merge_and_unload().state_dict()
    ours = merged_state_dict(student.model, student.model.state_dict())
    for key, value in theirs.items():
        if case == "llama-tied-head" and key in ("model.embed_tokens.weight",):
            continue  # peft merges a tied head into the shared weight (the input side too); tdrl unties it
        assert torch.allclose(ours[key], value, atol=1e-6), key


@needs_peft
def test_the_adapter_export_reloads_with_peft_on_the_base(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    student = lora_tiny()
    student.lora.export = "adapter"
    student.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert all("lora_" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))  # no base weights
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student.model(input_ids=ids).logits
        on_base = PeftModel.from_pretrained(load_student("tiny").model, str(tmp_path))
        assert torch.allclose(on_base(input_ids=ids).logits, want, atol=1e-5)
        merged = load_student(str(tmp_path))  # tdrl builds the recorded base and merges
        assert torch.allclose(merged.model(input_ids=ids).logits, want, atol=1e-5)
    assert merged.lora is None and all(p.requires_grad for p in merged.model.parameters())


def _hook_count(layer):
    calls = []
    return calls, layer.register_forward_hook(lambda *_: calls.append(1))


@needs_peft
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora):
    """iql (value head, Q heads, a target network) with and without checkpointing, dropout off (the
    tiny models have none): the same loss and gradients, while each decoder layer runs twice per step
    (forward, then the recompute in backward) instead of once."""
    from tdrl.testing.problems import contract_batch, kit_agent

    runs = []
    for checkpointing in (False, True):
        student = lora_tiny() if lora else load_student("tiny")
        if checkpointing:
            student.enable_gradient_checkpointing()
        torch.manual_seed(0)
        agent = kit_agent("iql", student=student)
        agent.train()
        calls, hook = _hook_count(student.model.transformer.h[0].attn)  # inside the checkpointed block
        loss, _ = agent(contract_batch())
        loss.backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, len(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = runs
    assert (calls_a, calls_b) == (1, 2)  # checkpointing is on, and recomputes
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("student.model" in n for n in grads_a)
    assert any("lora_" in n for n in grads_a) == lora
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


@needs_peft
@pytest.mark.parametrize("name", list_agents())
def test_every_agent_trains_through_the_adapters(name):
    """Two AdamW steps of every registered agent on a LoRA student whose head is adapted: the loss stays
    finite, the adapters move, and no frozen weight of the base does."""
    from tdrl.testing.problems import contract_batch, kit_agent

    student = lora_tiny()
    agent = kit_agent(name, student=student)
    base = {n: p.detach().clone() for n, p in student.model.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in student.model.named_parameters() if "lora_" in n}
    optimiser = torch.optim.AdamW(agent.param_groups(1e-2), lr=1e-2)
    for _ in range(2):
        loss, _ = agent(contract_batch(), diagnostics=True)
        assert torch.isfinite(loss), name
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        agent.after_update()
    after = dict(student.model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in base.items()), name
    assert any(not torch.equal(after[n], w) for n, w in before.items()), name


@needs_peft
def test_lora_settings_are_checked():
    from tdrl.training import TrainConfig

    for bad in (
        {"lora_rank": -1},
        {"lora_alpha": 0.0},
        {"lora_dropout": 1.0},
        {"lora_export": "both"},
        {"lora_target_modules": "all-linear,lm_head"},
        {"lora_target_modules": " , "},
    ):
        with pytest.raises(ConfigError, match="--lora-"):
            TrainConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="--lora-dropout"):  # the head's dropout cannot enter the normaliser
        apply_lora(load_student("tiny"), rank=2, dropout=0.1, target_modules="c_attn,lm_head")
    apply_lora(load_student("tiny"), rank=2, dropout=0.1, target_modules="c_attn")  # elsewhere it can
    with pytest.raises(ConfigError, match="c_attn"):  # names the linear layers there are
        apply_lora(load_student("tiny"), rank=2, target_modules="q_proj")
    with pytest.raises(ConfigError, match="not linear"):
        apply_lora(load_student("tiny"), rank=2, target_modules="wte")


def test_without_peft_a_lora_run_says_what_to_install(monkeypatch, tmp_path):
    from tdrl.training import TrainConfig, build_trainer

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install tdrl\[lora\]"):
        require_peft()
    config = TrainConfig.from_dict({"teacher": "tiny", "student": "tiny", "lora_rank": 4, "out": str(tmp_path)})
    with pytest.raises(MissingDependencyError, match=r"pip install tdrl\[lora\]"):
        build_trainer(config, progress=False)


def test_the_warm_start_fingerprint_holds_the_lora_settings(tiny_teacher):
    from tdrl.training import TrainConfig
    from tdrl.training.warmstart import shaping_settings, warm_start_fingerprint

    plain = TrainConfig(teacher="tiny", student="tiny")
    lora = plain.replace(lora_rank=4)
    assert not any(k.startswith("lora_") for k in shaping_settings(plain))  # the fingerprints of before
    assert {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_export"} <= set(
        shaping_settings(lora)
    )
    prints = {warm_start_fingerprint(c, tiny_teacher)[0] for c in (plain, lora, lora.replace(lora_alpha=4.0))}
    assert len(prints) == 3
    assert (
        warm_start_fingerprint(plain.replace(lora_alpha=4.0), tiny_teacher)[0]
        == warm_start_fingerprint(plain, tiny_teacher)[0]
    )  # without adapters their settings shape nothing
    assert "gradient_checkpointing" not in shaping_settings(plain.replace(gradient_checkpointing=True))


# ---------------------------------------------------------------------------- end to end
TINY = [
    *("--teacher", "tiny", "--student", "tiny", "--data", "bundled", "--train-prompts", "24"),
    *("--response-tokens", "8", "--batch-size", "4", "--eval-prompts", "2", "--eval-max-new-tokens", "4"),
]


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TDRL_CACHE", str(tmp_path_factory.getbasetemp() / "tdrl-cache"))


def trained_student(checkpoint, **lora) -> Student:
    """The adapted student a checkpoint holds, rebuilt independently of the export: the tiny base, the
    same adapters, and the agent's weights from accelerate's model.safetensors."""
    from safetensors.torch import load_file

    student = apply_lora(load_student("tiny"), **lora)
    prefix = "student.model."
    weights = {
        k[len(prefix) :]: v for k, v in load_file(str(checkpoint / "model.safetensors")).items() if k.startswith(prefix)
    }
    student.model.load_state_dict(weights)
    return student.eval()


IDS = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))


@needs_peft
def test_a_lora_run_from_the_cli_exports_a_merged_model_that_reloads(cache, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tdrl.cli import main
    from tdrl.training.checkpoints import find_checkpoint

    out = tmp_path / "run"
    argv = ["train", "--agent", "iql", "--steps", "2", "--eval-every", "0", "--lora-rank", "4", "--out", str(out)]
    argv += ["--lora-target-modules", UNTIED_HEAD, "--gradient-checkpointing", "--test-prompts", "0"]
    assert main([*argv, *TINY]) == 0
    checkpoint = find_checkpoint(out)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["lora"]["target_modules"] == UNTIED_HEAD
    assert config["gradient_checkpointing"] is True
    adapted = trained_student(checkpoint, rank=4, alpha=16.0, target_modules=UNTIED_HEAD)
    assert any(float(p.abs().sum()) > 0 for n, p in adapted.model.named_parameters() if "lora_B" in n)  # it trained
    for export in (out / "best", checkpoint / "student"):  # eval_every 0: best is the last step
        assert not (export / "adapter_config.json").exists()
        plain = AutoModelForCausalLM.from_pretrained(export)
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=IDS).logits, adapted.model(input_ids=IDS).logits, atol=1e-5)
    assert (out / "best" / "value_head.safetensors").is_file()
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(out / "best"), "--prompts", "2", "--max-new-tokens", "4", "--seeds", "0"])
        == 0
    )
    assert "eval/rougeL" in capsys.readouterr().out


@needs_peft
def test_a_lora_run_can_export_the_adapter_and_eval_reads_it(cache, tmp_path, capsys):
    from peft import PeftModel

    from tdrl.cli import main
    from tdrl.training.checkpoints import find_checkpoint

    out = tmp_path / "run"
    argv = ["train", "--agent", "sql", "--steps", "2", "--eval-every", "1", "--lora-rank", "4", "--out", str(out)]
    assert main([*argv, "--lora-export", "adapter", "--lora-alpha", "8", "--test-prompts", "1", *TINY]) == 0
    # every step scores Rouge-L 0 on the tiny models: best/ is the starting student, which the run's test
    # scored apart from the last one (loading the adapter export on its base)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["best_step"] == 0 and summary["steps"] == 2
    checkpoint = find_checkpoint(out)
    trained = trained_student(checkpoint, rank=4, alpha=8.0)
    start = load_student("tiny")  # step 0: B = 0, the base itself
    for export, model in ((checkpoint / "student", trained.model), (out / "best", start.model)):
        assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
        on_base = PeftModel.from_pretrained(load_student("tiny").model, str(export)).eval()
        with torch.no_grad():
            assert torch.allclose(on_base(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits, atol=1e-5)
    assert not torch.allclose(trained.model(input_ids=IDS).logits, start.model(input_ids=IDS).logits)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--prompts", "2", "--max-new-tokens", "4", "--seeds", "0"]) == 0
    assert "eval/rougeL" in capsys.readouterr().out


def tiny_config(out, **kw):
    from tdrl.training import TrainConfig

    base = dict(teacher="tiny", student="tiny", data="bundled", train_prompts=24, response_tokens=8, batch_size=4)
    base.update(eval_prompts=1, eval_max_new_tokens=4, test_prompts=0, eval_every=0, log_every=1, lr=1e-3)
    base.update(steps=6, checkpoint_every=3, out=str(out), agent="iql")
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_gradient_checkpointing_trains_to_the_same_weights(cache, tmp_path):
    from tdrl.training import build_trainer

    runs = []
    for checkpointing in (False, True):
        config = tiny_config(tmp_path / str(checkpointing), steps=2, gradient_checkpointing=checkpointing)
        trainer = build_trainer(config, progress=False)
        trainer.train()
        runs.append(trainer.agent.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.allclose(runs[0][key], runs[1][key], atol=1e-6), key


@needs_peft
def test_a_lora_run_with_checkpointing_resumes_bit_for_bit(cache, tmp_path):
    """iql (Polyak target network, value and Q heads) on a LoRA student with gradient checkpointing,
    interrupted at step 3 and resumed: the weights of the uninterrupted run, bit for bit."""
    import os
    import signal

    from tdrl.training import TrainerCallback, build_trainer, resume_trainer
    from tdrl.training.checkpoints import find_checkpoint

    class InterruptAt(TrainerCallback):
        def on_step_end(self, args, state) -> None:
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    settings = dict(lora_rank=4, lora_target_modules=UNTIED_HEAD, gradient_checkpointing=True)
    full = build_trainer(tiny_config(tmp_path / "full", **settings), progress=False)
    trainable = {id(p) for p in full.agent.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in full.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable and len(trainable) < len(list(full.agent.parameters())) / 2
    full.train()
    broken = build_trainer(tiny_config(tmp_path / "broken", **settings), callbacks=[InterruptAt()], progress=False)
    with pytest.raises(KeyboardInterrupt, match="resume"):
        broken.train()
    assert find_checkpoint(tmp_path / "broken").name == "step-0000003"
    resumed = resume_trainer(tmp_path / "broken", progress=False)
    assert resumed.step == 3 and resumed.student.lora is not None and resumed.args.gradient_checkpointing
    resumed.train()
    a, b = full.agent.state_dict(), resumed.agent.state_dict()
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@needs_peft
def test_a_lora_warm_start_exports_its_adapter_and_a_run_starts_from_it(cache, tmp_path, capsys):
    """tdrl warm-start with LoRA and --lora-export adapter: the directory holds the adapter (its record the
    lora settings), --student reads it (the tiny base with the adapter merged), and tdrl eval scores it."""
    from tdrl.cli import main

    warm = tmp_path / "warm"
    lora = ["--lora-rank", "4", "--lora-export", "adapter"]
    assert main(["warm-start", *TINY, "--steps", "2", "--lr", "1e-2", *lora, "--out", str(warm)]) == 0
    record = json.loads((warm / "tdrl-warm-start.json").read_text())
    assert record["settings"]["lora_rank"] == 4 and record["settings"]["lora_export"] == "adapter"
    assert (warm / "adapter_model.safetensors").is_file() and not (warm / "model.safetensors").exists()
    started = load_student(str(warm))
    with torch.no_grad():  # the adapter moved the base
        assert not torch.allclose(started.model(input_ids=IDS).logits, load_student("tiny").model(input_ids=IDS).logits)
    student = [str(warm) if a == "tiny" and TINY[i - 1] == "--student" else a for i, a in enumerate(TINY)]
    run = tmp_path / "from-warm"
    assert main(["train", "--agent", "bc", "--steps", "1", "--eval-every", "0", "--out", str(run), *student]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(warm), "--prompts", "2", "--max-new-tokens", "4", "--seeds", "0"]) == 0
    assert "eval/rougeL" in capsys.readouterr().out
