"""Cost model of pipeline parallelism: stages on machines of one profile, `micro_blocks`
blocks in flight, activations over the network link (the paper's Table 3; digest §3.5).

Each stage computes its parts (pipeline/stages.py: THE split rule) with the run's policy, so
its time per block is `cost_model.predict` over its own decoder layers and ends (embedding on
stage 0, head on the last). A micro-block is one block (gpu_batch_size x num_gpu_batches
sequences); its activations go from stage s to s + 1 as one message per token step, and the
last stage sends the new token ids back to stage 0 (the original's ring). With
P_s = stage s's prefill seconds per block, D_s its mean decode seconds per token and block,
M micro-blocks, S stages, c_pre, c_dec, c_ids the messages' seconds (latency + bytes / bw):

    fill   = sum_s P_s + (S - 1) c_pre + (M - 1) max(max_s P_s, c_pre)
             (a flow shop of identical jobs: the first goes through, the rest follow the
             bottleneck; links are machines of the shop)
    period = max(sum_s D_s + (S - 1) c_dec + c_ids,        one micro-block's way round the ring
                 M max(max_s D_s, c_dec, c_ids))           the busiest stage or link per token
    prefill = rounds x fill, decode = rounds x (n - 1) x period

where rounds = prompts / (M x block). sim/pipeline.py times the same thing event by event
(each stage's op stream, each message in its link's queue); tests hold the two within 10 %.
One stage is the single-machine engine: `predict` itself, exactly.

    >>> pred = predict_pipeline(Job(spec, policy, "zigzag", profile, 512, 32), stages=4)
    >>> pred.generation_throughput
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.pipeline.stages import micro_blocks as blocks_in_flight
from flexgen_lab.pipeline.stages import stage_layers
from flexgen_lab.planner.cost_model import Prediction, predict
from flexgen_lab.planner.job import Ends, Job

TOKEN_ID_BYTES = 8  # int64 token ids, as torch makes them


def stage_spec(spec: ModelSpec, stages: int, stage: int) -> tuple[ModelSpec, Ends]:
    """The model as one stage sees it: its decoder layers, and whether it computes the
    embedding (stage 0) and the head (the last stage)."""
    layers = stage_layers(spec.num_layers, stages, stage)
    return (dataclasses.replace(spec, num_layers=len(layers)), (stage == 0, stage == stages - 1))


def heaviest_stage(spec: ModelSpec, stages: int) -> int:
    """The stage with the most decoder layers (the first, by the split rule); the search
    plans its policy, which every stage then runs."""
    return max(range(stages), key=lambda s: len(stage_layers(spec.num_layers, stages, s)))


def message_bytes(job: Job) -> dict[str, int]:
    """Bytes of one micro-block's messages: activations in prefill (block x s x h x q) and in
    decode (block x h x q), and the token ids the last stage sends back to stage 0."""
    block, h, q = job.policy.block_size, job.spec.hidden, job.dtype_bytes
    return {"prefill": block * job.prompt_len * h * q, "decode": block * h * q,
            "ids": block * TOKEN_ID_BYTES}


def pipeline_prompts(policy: Policy, stages: int, micro_blocks: int | None,
                     num_prompts: int | None) -> int:
    """workload.num_prompts under the pipeline: null means micro_blocks x block."""
    return num_prompts or blocks_in_flight(stages, micro_blocks) * policy.block_size


def check_schedule(schedule: str) -> None:
    """Several stages pass a micro-block on one token at a time, each stage going layer by
    layer over all its GPU batches: the zig-zag order (the original's DistOptLM loop)."""
    if schedule != "zigzag":
        raise ValueError(f"schedule={schedule!r} with several pipeline stages; allowed: zigzag")


@dataclass
class PipelinePrediction:
    prefill_s: float
    decode_s: float
    num_prompts: int
    gen_len: int
    stages: list[Prediction] = field(default_factory=list)  # per stage, one block

    @property
    def generation_throughput(self) -> float:
        return self.num_prompts * self.gen_len / (self.prefill_s + self.decode_s)


def predict_pipeline(job: Job, stages: int = 1, micro_blocks: int | None = None
                     ) -> PipelinePrediction | Prediction:
    """Prefill and decode seconds of the pipeline (the module's formulas); the job's
    num_prompts null means micro_blocks x block."""
    policy, profile, gen_len = job.policy, job.profile, job.gen_len
    m = blocks_in_flight(stages, micro_blocks)
    job = job.replace(num_prompts=pipeline_prompts(policy, stages, micro_blocks,
                                                   job.num_prompts))
    if stages == 1:  # one machine: the engine's own prediction, exactly
        return predict(job)
    profile.require_network()
    check_schedule(job.schedule)
    per_stage = [predict_stage(job, stages, s) for s in range(stages)]
    hop = {k: profile.network_seconds(n) for k, n in message_bytes(job).items()}
    fill_s = (sum(p.prefill_s for p in per_stage) + (stages - 1) * hop["prefill"]
              + (m - 1) * max(max(p.prefill_s for p in per_stage), hop["prefill"]))
    decode_s = 0.0
    if gen_len > 1:
        steps = [p.decode_s / (gen_len - 1) for p in per_stage]
        ring = sum(steps) + (stages - 1) * hop["decode"] + hop["ids"]
        decode_s = (gen_len - 1) * max(ring, m * max(*steps, hop["decode"], hop["ids"]))
    rounds = job.prompts // (m * policy.block_size)
    return PipelinePrediction(rounds * fill_s, rounds * decode_s, job.prompts, gen_len,
                              per_stage)


def predict_stage(job: Job, stages: int, stage: int) -> Prediction:
    """One stage's prefill and decode seconds for one block, on its own machine."""
    own, ends = stage_spec(job.spec, stages, stage)
    return predict(job.replace(spec=own, ends=ends, num_prompts=None))
