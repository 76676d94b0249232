"""Gymnasium environments. Importing :mod:`tdrl` registers ``tdrl/TokenGeneration-v0``:

>>> env = gymnasium.make("tdrl/TokenGeneration-v0", teacher=teacher, prompts=prompts)
>>> envs = gymnasium.make_vec("tdrl/TokenGeneration-v0", num_envs=8, vectorization_mode="vector_entry_point",
...                           teacher=teacher, prompts=prompts)
"""

from gymnasium.envs.registration import register, registry

from tdrl.envs.policies import RandomMaskedPolicy, StudentPolicy, TeacherPolicy
from tdrl.envs.rollout import rollout
from tdrl.envs.token_env import OFF_SUPPORT_MODES, TokenGenerationEnv, TokenGenerationVectorEnv

ENV_ID = "tdrl/TokenGeneration-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="tdrl.envs.token_env:TokenGenerationEnv",
        vector_entry_point="tdrl.envs.token_env:TokenGenerationVectorEnv",
    )

__all__ = [
    "ENV_ID",
    "OFF_SUPPORT_MODES",
    "TokenGenerationEnv",
    "TokenGenerationVectorEnv",
    "rollout",
    "TeacherPolicy",
    "RandomMaskedPolicy",
    "StudentPolicy",
]
