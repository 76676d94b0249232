"""The models: a KV-cached LM session, the teacher (oracle of rewards and action sets), the student
(sparse head and exact full-vocabulary normaliser), name resolution and the bundled teacher, and the
tiny in-process models."""

from tdrl.models.hub import (
    bundled_teacher,
    bundled_teacher_dir,
    load_teacher,
    parse_dtype,
    resolve_name,
    tdrl_cache_dir,
    teacher_from_pretrained,
)
from tdrl.models.lm import LM, LMState, model_fingerprint, sample_tokens, tokenizer_fingerprint
from tdrl.models.student import (
    VOCAB_CHUNK,
    Student,
    gather_logits,
    load_student,
    support_summary,
    vocab_logsumexp,
    vocab_summary,
)
from tdrl.models.teacher import Annotation, Reward, Teacher, reward_value, sparsity_statistics

__all__ = [
    "LM",
    "LMState",
    "Teacher",
    "Reward",
    "reward_value",
    "Annotation",
    "sparsity_statistics",
    "Student",
    "load_student",
    "load_teacher",
    "teacher_from_pretrained",
    "bundled_teacher",
    "bundled_teacher_dir",
    "resolve_name",
    "tdrl_cache_dir",
    "parse_dtype",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "sample_tokens",
    "gather_logits",
    "vocab_logsumexp",
    "vocab_summary",
    "support_summary",
    "VOCAB_CHUNK",
]
