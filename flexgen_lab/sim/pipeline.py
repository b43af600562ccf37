"""Discrete-event simulation of pipeline parallelism (backend=simulated, distributed=pipeline).

Each stage is one machine of the profile running the engine's op stream over its own parts
(pipeline/stages.py; engine/schedule.ops with `parts`), timed by the single-machine
simulator: that gives its seconds per token step for one block. The pipeline then moves
micro-blocks as the original's DistOptLM does (digest §3.5): every stage works through
(token i, micro-block m) in that order; stage s starts a step when it is free and its input
has arrived; a step's activations go to stage s + 1 as one message on that machine's link
(a FIFO queue: latency + bytes / bw_network each), and the last stage's new token ids go
back to stage 0, where they start the micro-block's next token. Sends are asynchronous: a
stage goes on computing while its message travels. So stage s works on micro-block m while
s + 1 works on m - 1.

Phase times are the original's, read on the last stage: each of its steps is charged from
the end of its previous step (waiting for input included) to the step's end, to prefill
for token 0, to decode otherwise.

    >>> sim = simulate_pipeline(Job(spec, policy, "zigzag", profile, 512, 32), stages=4)
    >>> sim.generation_throughput, sim.stages[1].link_bytes["decode"]["network"]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from flexgen_lab.engine import schedule
from flexgen_lab.engine.transfer import LINKS, phase_of
from flexgen_lab.hardware.profile import HardwareProfile
from flexgen_lab.pipeline.stages import micro_blocks as blocks_in_flight
from flexgen_lab.pipeline.stages import stage_layers, stage_parts
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.memory_model import peak_bytes
from flexgen_lab.planner.pipeline import check_schedule, message_bytes, pipeline_prompts, stage_spec
from flexgen_lab.sim.simulator import OpCosts, run_stream, simulate

PHASES = ("prefill", "decode")


@dataclass
class StageSimulation:
    stage: int
    layers: range  # 0-based decoder layers
    token_steps_s: list[float]  # seconds of each token step for one block, alone
    link_bytes: dict[str, dict[str, int]]  # phase -> link (LINKS and "network", sent) -> bytes
    peaks: dict[str, float] = field(default_factory=dict)  # tier -> modelled peak bytes

    def row(self) -> dict:
        """Its `stages` row (results/schema.STAGE_COLUMNS; run_id added by the store)."""
        links = (*LINKS, "network")
        return {"stage": self.stage, "rank": self.stage,
                "layers": f"{self.layers.start}-{self.layers.stop - 1}",
                **{f"bytes_{link}": sum(self.link_bytes[p][link] for p in PHASES)
                   for link in links},
                **{f"peak_{tier}_bytes": int(n) for tier, n in self.peaks.items()},
                "peak_rss_bytes": None}


@dataclass
class PipelineSimulation:
    prefill_s: float
    decode_s: float
    num_prompts: int
    gen_len: int
    stages: list[StageSimulation]
    steps: list[dict]  # (stage, token, micro_block, start_s, end_s) of every stage step

    @property
    def generation_throughput(self) -> float:
        return self.num_prompts * self.gen_len / (self.prefill_s + self.decode_s)

    @property
    def link_bytes(self) -> dict[str, dict[str, int]]:
        """phase -> link -> bytes, summed over stages (network: every message sent)."""
        return {p: {link: sum(s.link_bytes[p][link] for s in self.stages)
                    for link in (*LINKS, "network")} for p in PHASES}


def stage_peaks(job: Job, stages: int, stage: int, micro_blocks: int) -> dict[str, float]:
    """A stage's modelled peak per tier: its layers (and the embedding and head, which the
    memory model always counts: a small over-estimate for middle stages), with the cache
    and activation homes of all micro-blocks in flight (each keeps its own)."""
    own, _ = stage_spec(job.spec, stages, stage)
    policy = job.policy
    homes = dataclasses.replace(policy, num_gpu_batches=policy.num_gpu_batches * micro_blocks)
    return peak_bytes(job.replace(spec=own, policy=homes), job.profile.workers())


def simulate_stage(job: Job, stages: int, stage: int) -> StageSimulation:
    """One block through one stage's op stream: seconds per token step, bytes per link."""
    spec, policy, profile = job.spec, job.policy, job.profile
    parts = stage_parts(spec.num_layers, stages, stage)
    stream = schedule.ops(job.schedule, job.gen_len, spec.num_layers + 2,
                          policy.num_gpu_batches, parts)
    steps: list[float] = []
    _, _, records = run_stream(stream, OpCosts(job), policy.overlap, 0.0, profile.workers(),
                               steps, profile.overlap_contention)
    moved = {p: dict.fromkeys((*LINKS, "network"), 0) for p in PHASES}
    for record in records:
        for link, n in record["bytes"].items():
            moved[phase_of(record["token"])][link] += n
    return StageSimulation(stage, stage_layers(spec.num_layers, stages, stage), steps, moved)


def simulate_pipeline(job: Job, stages: int = 1, micro_blocks: int | None = None
                      ) -> PipelineSimulation:
    """Simulate the job's prompts (null: micro_blocks x block) over `stages` machines."""
    policy, profile, gen_len = job.policy, job.profile, job.gen_len
    m = blocks_in_flight(stages, micro_blocks)
    job = job.replace(num_prompts=pipeline_prompts(policy, stages, micro_blocks,
                                                   job.num_prompts))
    if stages == 1:  # one machine is the single-machine engine, block after block
        return _single(simulate(job), job)
    profile.require_speeds()
    profile.require_network()
    check_schedule(job.schedule)
    per_stage = [simulate_stage(job, stages, s) for s in range(stages)]
    rounds = job.prompts // (m * policy.block_size)
    messages = message_bytes(job)
    for st in per_stage:  # what each stage sends, per micro-block and round
        st.peaks = stage_peaks(job, stages, st.stage, m)
        last = st.stage == stages - 1
        st.link_bytes = {p: {k: v * m * rounds for k, v in links.items()}
                         for p, links in st.link_bytes.items()}
        # the last stage sends ids after every token but the last, the others activations
        sent = {"prefill": int(gen_len > 1) if last else 1,
                "decode": max(gen_len - 2, 0) if last else gen_len - 1}
        for p in PHASES:
            st.link_bytes[p]["network"] = (m * rounds * sent[p]
                                           * messages["ids" if last else p])
    prefill_s, decode_s, steps = _flow(per_stage, profile, messages, m, rounds, gen_len)
    return PipelineSimulation(prefill_s, decode_s, job.prompts, gen_len, per_stage, steps)


def _flow(per_stage: list[StageSimulation], profile: HardwareProfile, messages: dict,
          m: int, rounds: int, gen_len: int) -> tuple[float, float, list[dict]]:
    """The micro-blocks' way through the stages, event by event (see the module's doc)."""
    stages = len(per_stage)
    stage_free = [0.0] * stages
    link_free = [0.0] * stages  # link s: from stage s to s + 1 (the last one's: to stage 0)
    arrival: dict[tuple[int, int], float] = {}  # (stage, micro-block) -> its input's arrival
    phases, last_end, steps = [0.0, 0.0], 0.0, []
    for _ in range(rounds):
        arrival.update({(0, b): stage_free[0] for b in range(m)})  # the prompts are there
        for i in range(gen_len):
            kind = "prefill" if i == 0 else "decode"
            for b in range(m):
                for s, st in enumerate(per_stage):
                    start = max(stage_free[s], arrival[(s, b)])
                    end = stage_free[s] = start + st.token_steps_s[i]
                    steps.append({"stage": s, "token": i, "micro_block": b, "start_s": start,
                                  "end_s": end})
                    last = s == stages - 1
                    if last:
                        phases[i > 0] += end - last_end
                        last_end = end
                        if i == gen_len - 1:
                            continue  # no next token to start
                    sent = max(end, link_free[s]) + profile.network_seconds(
                        messages["ids" if last else kind])
                    link_free[s] = sent
                    arrival[((s + 1) % stages, b)] = sent
    return phases[0], phases[1], steps


def _single(sim, job: Job) -> PipelineSimulation:
    """The single-machine simulation as a one-stage pipeline (its figures unchanged; its
    blocks run one after another, so one block's homes are live at a time)."""
    moved = {p: {**sim.link_bytes[p], "network": 0} for p in PHASES}
    stage = StageSimulation(0, range(job.spec.num_layers), [], moved,
                            stage_peaks(job, 1, 0, 1))
    return PipelineSimulation(sim.prefill_s, sim.decode_s, sim.num_prompts, job.gen_len,
                              [stage], [])


def over_capacity(sim: PipelineSimulation, capacities: dict[str, int]) -> list[str]:
    """Each stage's tiers whose modelled peak exceeds one machine's capacity."""
    return [f"stage {st.stage} {tier} tier: modelled peak {int(n)} bytes > capacity "
            f"{capacities[tier]}" for st in sim.stages for tier, n in st.peaks.items()
            if n > capacities[tier]]


def run_columns(sim: PipelineSimulation) -> dict:
    """The runs row's figures of a simulated pipeline: bytes per link summed over stages
    (the network's in link_bytes_json), peaks per tier the largest stage's (one machine's)."""
    moved = sim.link_bytes
    return {**{f"bytes_{link}": moved["prefill"][link] + moved["decode"][link]
               for link in LINKS},
            **{f"peak_{tier}_bytes": int(max(st.peaks[tier] for st in sim.stages))
               for tier in ("gpu", "cpu", "disk")},
            "link_bytes_json": json.dumps(moved)}


def trace_rows(sim: PipelineSimulation) -> list[dict]:
    """trace=true: one row per stage step (rank and stage the stage's, batch the
    micro-block, layer null: the step covers the stage's parts), for timelines."""
    return [{"rank": r["stage"], "stage": r["stage"], "device": "simulated", "op": "compute",
             "token": r["token"], "layer": None, "batch": r["micro_block"], "link": None,
             "bytes": 0, "start_s": r["start_s"], "end_s": r["end_s"]} for r in sim.steps]
