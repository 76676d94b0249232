"""An 8K-vocabulary teacher with SmolLM2-135M's architecture, for the vocabulary-size comparison.

The bundled teacher has a 49,152-token vocabulary. To measure the sparse path at a second vocabulary
size with everything else equal, this builds the same Llama architecture (30 layers, width 576, 9
heads, 3 KV heads) with an 8,192-token byte-level BPE vocabulary trained in-process on the bundled
prompts and the standard library's pydoc text, random weights from a fixed seed. Its next-token
distributions are nearly flat, so A_p(s) always hits the candidate cap K: a worst case for the sparse
path's set size, which is what a speed/memory measurement wants. Built once under
``$TDRL_CACHE/benchmarks`` (no download), then loaded like any local teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tdrl.integrity import atomic_dir
from tdrl.models import Teacher, tdrl_cache_dir, teacher_from_pretrained

VOCAB = 8192
_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    from tdrl.data import load_source

    prompts = load_source("bundled", split="train")["prompt"]
    return list(prompts) + [topics[k] for k in sorted(topics)]


def teacher_dir() -> Path:
    target = tdrl_cache_dir() / "benchmarks" / f"llama-vocab{VOCAB}"
    if (target / "done.json").is_file():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = _TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps({"vocab": len(tokenizer)}))
    return target


def load(dtype: str = "float32") -> Teacher:
    return teacher_from_pretrained(str(teacher_dir()), dtype=dtype)
