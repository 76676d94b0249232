"""Tiny, deterministic models for tests, smoke runs and the ``tiny`` name (no downloads).

* :func:`tiny_tokenizer`: a real byte-level BPE tokenizer (``tokenizers``), trained in-process on a
  small bundled corpus, with a ChatML-style chat template like the bundled SmolLM2 teacher's.
* :func:`tiny_teacher` / :func:`tiny_student`: GPT-2-architecture models built from a config with a
  fixed seed, sharing that tokenizer (vocabulary 512, well under 1M parameters).
* :class:`MarkovTeacher`: a teacher whose next-token distribution depends only on the last token
  (a fixed random table), so exact values of the token MDP can be computed by brute force.
"""

from __future__ import annotations

import functools
from importlib import resources
from types import SimpleNamespace

import torch
from torch import Tensor

from tdrl.models.teacher import Teacher

__all__ = ["tiny_tokenizer", "tiny_teacher", "tiny_student_model", "MarkovLM", "MarkovTeacher", "TINY_VOCAB"]

TINY_VOCAB = 512
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    text = resources.files("tdrl.models").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh byte-level BPE ``PreTrainedTokenizerFast`` (vocabulary :data:`TINY_VOCAB`).

    EOS is ``<|im_end|>`` (the end of an assistant turn, as for SmolLM2); padding is ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _tiny_gpt2(n_embd: int, n_layer: int, n_head: int, seed: int, logit_scale: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # a larger output layer makes the next-token distributions peaked (like a trained LM's),
        # so top-p sets are small and informative
        model.lm_head.weight.mul_(logit_scale)
    return model, tokenizer


def tiny_teacher(seed: int = 0) -> Teacher:
    """A ~0.2M-parameter GPT-2 teacher (2 layers, width 64) with peaked next-token distributions."""
    model, tokenizer = _tiny_gpt2(n_embd=64, n_layer=2, n_head=4, seed=seed, logit_scale=20.0)
    return Teacher(model, tokenizer, name=f"tiny-teacher-{seed}")


def tiny_student_model(seed: int = 1):
    """A ~0.05M-parameter GPT-2 student model (2 layers, width 32) and its tokenizer, which is the
    tiny teacher's tokenizer (same vocabulary)."""
    return _tiny_gpt2(n_embd=32, n_layer=2, n_head=2, seed=seed, logit_scale=1.0)


class MarkovLM(torch.nn.Module):
    """A causal "LM" whose next-token logits depend only on the last token: ``logits = table[x_t]``.

    It honours the HF causal-LM ``forward`` contract that :class:`~tdrl.models.teacher.Teacher` uses and
    needs no KV cache (the returned ``cache`` is always ``None``).
    """

    def __init__(self, table: Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.shape[-1], _name_or_path="markov")

    def forward(self, input_ids: Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=False, **_):
        return SimpleNamespace(logits=self.table[input_ids], cache=None)


class MarkovTeacher(Teacher):
    """A teacher over a tiny vocabulary whose next-token distribution depends only on the last token.

    Tokens are ``t0 .. t{V-2}`` plus EOS ``</s>`` (id ``V - 1``). ``table[i, j]`` are the logits of
    token j after token i, drawn once from ``N(0, scale^2)`` with ``seed``. Exact quantities of the
    token MDP (soft values, entropies, returns) follow from :attr:`logprobs` by enumeration.
    ``eos_bias`` is added to every EOS logit (negative values make episodes longer).
    """

    def __init__(self, vocab_size: int = 4, seed: int = 0, scale: float = 2.0, eos_bias: float = 0.0):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        if vocab_size < 2:
            raise ValueError("MarkovTeacher needs vocab_size >= 2 (at least one token and EOS)")
        vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="</s>")
        generator = torch.Generator().manual_seed(seed)
        table = scale * torch.randn(vocab_size, vocab_size, generator=generator)
        table[:, -1] += eos_bias  # shift every state's EOS logit (negative: longer episodes)
        super().__init__(MarkovLM(table), tokenizer, name=f"markov-{vocab_size}-{seed}")

    @property
    def logprobs(self) -> Tensor:
        """``[V, V]``: ``logprobs[i, j] = log pi_T(j | last token i)``."""
        return torch.log_softmax(self.model.table.detach().double(), dim=-1)
