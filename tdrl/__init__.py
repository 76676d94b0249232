"""tdrl: language-model distillation as offline reinforcement learning.

The teacher is a reward oracle and an action-mask oracle over its top-k / top-p token subset; agents
train a student LM on the resulting token MDP. See README.md.
"""

from tdrl import envs  # registers tdrl/TokenGeneration-v0 with Gymnasium
from tdrl.actions import ActionSubset, top_p_subset
from tdrl.models import Reward, Teacher, load_teacher

__version__ = "0.1.0"
__all__ = ["envs", "ActionSubset", "top_p_subset", "Teacher", "Reward", "load_teacher", "__version__"]
