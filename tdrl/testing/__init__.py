"""Test utilities: the tiny in-process models (:mod:`tdrl.models.tiny`) and the agent conformance kit
(:mod:`tdrl.testing.agent_contract`)."""

from tdrl.models.tiny import TINY_VOCAB, MarkovLM, MarkovTeacher, tiny_student_model, tiny_teacher, tiny_tokenizer

__all__ = ["tiny_tokenizer", "tiny_teacher", "tiny_student_model", "MarkovLM", "MarkovTeacher", "TINY_VOCAB"]
