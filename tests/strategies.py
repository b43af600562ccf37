"""Hypothesis strategies for whole runs: a model, a policy the configuration accepts, a schedule
and prompts. Hand-picked grids divide evenly; these draw shares such as 0.37 of 5 sequences, odd
batch sizes, group sizes that do not divide an axis, and prompts of different lengths.

    >>> case = runs().example()
    >>> case.policy.cache, case.prompt_len
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from flexgen_lab.engine.policy import Placement, Policy

MODELS = ("opt-tiny", "llama-tiny")  # llama-tiny: grouped-query attention (4 heads, 2 kv)


@dataclass(frozen=True)
class Run:
    """One run to check: everything the engine, the reference and the models need."""

    model: str
    policy: Policy
    schedule: str = "zigzag"
    prompt_len: int = 8
    gen_len: int = 4
    num_blocks: int = 1
    prompt_seed: int = 0
    varied_lengths: bool = True
    weight_seed: int = field(default=0)

    @property
    def num_prompts(self) -> int:
        return self.num_blocks * self.policy.block_size


@st.composite
def shares(draw) -> float:
    """A fraction: mostly two decimals (what people type), sometimes any float in [0, 1]."""
    return draw(st.one_of(st.integers(0, 100).map(lambda n: n / 100),
                          st.floats(0.0, 1.0, allow_nan=False)))


@st.composite
def placements(draw) -> Placement:
    """gpu share, then cpu as a share of what is left: every valid triple, corners included."""
    gpu = draw(shares())
    cpu = min(1.0 - gpu, draw(shares()) * (1.0 - gpu))
    return Placement(gpu, max(0.0, cpu))


@st.composite
def policies(draw, max_batch_size: int = 8, max_batches: int = 4) -> Policy:
    return Policy(
        gpu_batch_size=draw(st.integers(1, max_batch_size)),
        num_gpu_batches=draw(st.integers(1, max_batches)),
        weights=draw(placements()), cache=draw(placements()),
        activations=draw(placements()),
        overlap=draw(st.booleans()), cpu_delegation=draw(st.booleans()),
        compress_weight=draw(st.booleans()), compress_cache=draw(st.booleans()),
        compress_bits=draw(st.sampled_from((4, 8))),
        # 16 = head_dim of the tiny models; 6 and 10 divide no axis; 64 pads head_dim
        compress_group_size=draw(st.sampled_from((2, 4, 6, 10, 16, 64))),
        attn_sparsity=draw(st.one_of(st.just(1.0), st.floats(0.01, 0.99))),
        attn_renormalize=draw(st.booleans()),
    )


@st.composite
def runs(draw, models=MODELS) -> Run:
    return Run(model=draw(st.sampled_from(models)), policy=draw(policies()),
               schedule=draw(st.sampled_from(("zigzag", "row_by_row"))),
               prompt_len=draw(st.integers(1, 12)), gen_len=draw(st.integers(1, 5)),
               num_blocks=draw(st.integers(1, 2)), prompt_seed=draw(st.integers(0, 1000)),
               varied_lengths=draw(st.booleans()), weight_seed=draw(st.integers(0, 3)))
