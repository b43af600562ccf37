"""A measured distributed=pipeline run: every rank runs its stage; one row per run.

    torchrun --nproc-per-node 2 -m flexgen_lab run distributed=pipeline distributed.stages=2

Each stage runs the offloading engine over its parts (pipeline/stages.py) with the profile's
capacities as its own budgets. Rank 0 gathers the stages' reports and stores the run's row
(num_stages, throughput as the last stage timed it, bytes summed over stages, peaks of the
fullest stage) and one `stages` row per stage. A failure is stored once: the first stage to
fail claims the row in the launcher's store and writes it with its own error; the others
raise without writing. SIGTERM (torchrun's agent stopping the survivors of a dead stage) is
such a failure.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from flexgen_lab.engine.batch import Callbacks, Generation, Sampling
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.memory import PeakRSS
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.models.weights import open_weights
from flexgen_lab.pipeline.comm import StageComm
from flexgen_lab.pipeline.stage_run import StageReport, generate_stage
from flexgen_lab.pipeline.stages import micro_blocks, stage_parts
from flexgen_lab.units import TORCH_DTYPES

log = logging.getLogger(__name__)
_RUNS = itertools.count()  # this process's pipeline runs: part of each row's claim key


class Terminated(BaseException):
    """SIGTERM arrived: the launcher is stopping this stage."""


@contextmanager
def sigterm_raises():
    """Turn SIGTERM into an exception in the main thread, so the row can still be written."""
    def handler(signum, frame):
        raise Terminated("SIGTERM: the launcher stopped this stage (another stage failed, or "
                         "the job was cancelled)")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(cfg, spec, device, dtype: str, budgets: dict[str, int], policy, ids, mask,
              io_workers: int, callbacks: Callbacks | None, comm: StageComm
              ) -> StageReport:
    """This rank's stage: its engine, its generation, its process's peak RSS."""
    d = cfg.distributed
    parts = stage_parts(spec.num_layers, d.stages, comm.rank)
    weights = open_weights(spec.name, cfg.model.path, cfg.seed)
    sampling = Sampling(cfg.workload.temperature, cfg.seed, cfg.workload.stop_token)
    log.info("stage %d of %d: parts %d-%d (0 = embedding, %d = head), %d torch threads",
             comm.rank, d.stages, parts.start, parts.stop - 1, spec.num_layers + 1,
             torch.get_num_threads())
    with torch.inference_mode(), PeakRSS() as rss:
        tiers = Tiers(budgets["gpu"], budgets["cpu"], budgets["disk"], device, policy.pin_memory)
        with Engine(spec, weights, policy, cfg.schedule.name, device, TORCH_DTYPES[dtype],
                    callbacks, tiers, cfg.engine.offload_dir, cfg.engine.disk_io, io_workers,
                    cfg.engine.weight_cache, parts) as engine:
            comm.barrier()  # every stage built: the clocks start together
            origin = time.perf_counter()
            report = generate_stage(engine, comm, ids, mask, cfg.workload.gen_len, sampling,
                                    micro_blocks(d.stages, d.micro_blocks), origin)
    report.peak_rss_bytes = rss.peak_bytes
    log.info("stage %d: prefill %.3f s, decode %.3f s, sent %d bytes", comm.rank,
             report.prefill_s, report.decode_s,
             sum(report.link_bytes[p]["network"] for p in ("prefill", "decode")))
    return report


def claim_key(asked_hash: str) -> str:
    return f"{asked_hash}-{next(_RUNS)}"


def merged(reports: list[StageReport]) -> tuple[Generation, dict, list[dict]]:
    """The run's generation and columns from every stage's report, and the stages' rows."""
    last = reports[-1]
    phases = ("prefill", "decode")
    link_bytes = {p: {} for p in phases}
    for report in reports:
        for p in phases:
            for link, n in report.link_bytes[p].items():
                link_bytes[p][link] = link_bytes[p].get(link, 0) + n
    gen = Generation(last.output_ids, last.prefill_s, last.decode_s, link_bytes)
    engine_links = [link for link in link_bytes["prefill"] if link != "network"]
    columns = {
        **{f"bytes_{link}": link_bytes["prefill"][link] + link_bytes["decode"][link]
           for link in engine_links},
        **{f"peak_{tier}_bytes": max(r.peaks[tier] for r in reports)
           for tier in reports[0].peaks},
        "peak_rss_bytes": max(r.peak_rss_bytes or 0 for r in reports),
        "num_stages": len(reports),
        "placement_json": json.dumps({f"stage {r.stage}": r.placement for r in reports}),
        "link_bytes_json": json.dumps(link_bytes),
    }
    return gen, columns, [stage_row(r) for r in reports]


def stage_row(report: StageReport) -> dict:
    """A `stages` row (results/schema.py STAGE_COLUMNS) from a stage's report."""
    first, last = report.layers
    links = {link: report.link_bytes["prefill"][link] + report.link_bytes["decode"][link]
             for link in report.link_bytes["prefill"]}
    return {"stage": report.stage, "rank": report.stage, "layers": f"{first}-{last}",
            **{f"bytes_{link}": n for link, n in links.items()},
            **{f"peak_{tier}_bytes": n for tier, n in report.peaks.items()},
            "peak_rss_bytes": report.peak_rss_bytes}



class StageFailed(RuntimeError):
    """This stage failed; run_id names the row if this stage stored it (else None)."""

    def __init__(self, message: str, run_id: int | None, status: str):
        super().__init__(message)
        self.run_id, self.status = run_id, status


@dataclass
class PipelineOutcome:
    """What rank 0 gathered: the generation, the row's columns, the stages' rows and the
    merged trace; `claimed` says whether this rank stores the row."""

    generation: Generation
    columns: dict
    stage_rows: list[dict]
    trace: list[dict]
    claimed: bool


def run_stages(cfg, spec, device, dtype: str, budgets: dict[str, int], policy, ids, mask,
               io_workers: int, callbacks: Callbacks | None, tracer, row: dict, store
               ) -> PipelineOutcome | None:
    """This rank's stage of a measured pipeline run; rank 0 gets the outcome, the other ranks
    None. A failure stores the row here only if this stage claims it (StageFailed)."""
    comm = StageComm.from_env(cfg.distributed.stages, cfg.distributed.timeout_s, device)
    key = claim_key(row["config_hash"])
    if tracer is not None:
        tracer.rank = tracer.stage = comm.rank
    try:
        with sigterm_raises():
            report = run_stage(cfg, spec, device, dtype, budgets, policy, ids, mask,
                               io_workers, callbacks, comm)
            report.trace = tracer.rows if tracer is not None else []
            reports = comm.gather(report)
    except BaseException as err:  # the first stage to fail stores the run's row
        status = "oom" if type(err).__name__ == "BudgetExceeded" else "error"
        message = f"stage {comm.rank}: {type(err).__name__}: {err}"
        run_id = (store.record_run({**row, "status": status, "error": message})
                  if comm.claim_row(key) else None)
        comm.close()
        raise StageFailed(message, run_id, status) from err
    claimed = comm.first and comm.claim_row(key)
    comm.close()
    if reports is None:
        return None
    gen, columns, stage_rows = merged(reports)
    return PipelineOutcome(gen, columns, stage_rows,
                           [r for report in reports for r in report.trace], claimed)
