"""What one prediction is about, as one value: the model, the policy and schedule, the
hardware profile, the prompt and generation lengths, the element size, how many prompts (one
block by default) and, for a pipeline stage, which ends of the model it computes.

The traffic model (link_bytes, window_bytes), the cost model (predict), the memory model
(peak_bytes, peak_breakdown, memory_terms, placing_terms), the simulator (simulate), the
pipeline's closed form and simulation (predict_pipeline, simulate_pipeline, ...) and the
search's solve take one, instead of eight to eleven positional arguments in an order each
function chose. Functions that only count bytes ignore `profile` (it may be None there).

    >>> job = Job(spec, policy, "zigzag", profile, prompt_len=512, gen_len=32)
    >>> predict(job).generation_throughput, simulate(job.with_policy(other)).decode_s
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec

if TYPE_CHECKING:  # profile.py imports the operator tables, which need nothing of this
    from flexgen_lab.hardware.profile import HardwareProfile

Ends = tuple[bool, bool]  # (computes the embedding, computes the head): a pipeline stage's
WHOLE_MODEL: Ends = (True, True)


@dataclass(frozen=True)
class Job:
    """What one prediction is about (module docstring)."""

    spec: ModelSpec
    policy: Policy
    schedule: str
    profile: HardwareProfile | None
    prompt_len: int
    gen_len: int
    dtype_bytes: int = 2
    num_prompts: int | None = None  # None: one block (policy.block_size prompts)
    ends: Ends = WHOLE_MODEL
    compute_on_cpu: bool = False  # no GPU: the gpu tier is host memory, attention runs on a CPU

    @property
    def prompts(self) -> int:
        return self.num_prompts or self.policy.block_size

    @property
    def blocks(self) -> int:
        """Whole blocks of prompts (the engine runs them one after another)."""
        return self.prompts // self.policy.block_size

    def with_policy(self, policy: Policy) -> Job:
        return dataclasses.replace(self, policy=policy)

    def replace(self, **changes) -> Job:
        return dataclasses.replace(self, **changes)
