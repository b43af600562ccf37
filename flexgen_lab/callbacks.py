"""Engine callbacks the runner attaches: the op trace, a progress bar, and a fan-out list."""

from __future__ import annotations

from flexgen_lab.config import RunConfig
from flexgen_lab.engine.batch import Callbacks
from flexgen_lab.models.spec import ModelSpec


class TraceRecorder(Callbacks):
    """Collects the engine's ops as trace rows (docs/architecture.md's trace table): one row per
    op and link it moved bytes over (an op that moved nothing gets one row with link None)."""

    def __init__(self, device: str = "compute"):
        self.device = device
        self.rank = self.stage = 0  # a pipeline stage's (pipeline/run.py sets them)
        self.rows: list[dict] = []

    def on_op(self, record: dict) -> None:
        base = dict(rank=self.rank, stage=self.stage, device=self.device, op=record["op"],
                    token=record["token"], layer=record["layer"], batch=record["batch"],
                    start_s=record["start_s"], end_s=record["end_s"])
        moved = record.get("bytes") or {}
        if not moved:
            self.rows.append({**base, "link": None, "bytes": 0})
        for link, nbytes in moved.items():
            self.rows.append({**base, "link": link, "bytes": nbytes})


class ProgressBar(Callbacks):
    """A tqdm bar over compute steps; it shows only on a terminal and for long runs."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec):
        from tqdm import tqdm

        p = cfg.policy
        blocks = (cfg.workload.num_prompts or p.gpu_batch_size * p.num_gpu_batches) // (
            p.gpu_batch_size * p.num_gpu_batches)
        total = blocks * cfg.workload.gen_len * (spec.num_layers + 2) * p.num_gpu_batches
        self.bar = tqdm(total=total, unit="step", desc="generate", disable=None, delay=2.0,
                        leave=False)

    def on_step(self, step, start_s, end_s) -> None:
        self.bar.update()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class CallbackList(Callbacks):
    def __init__(self, items: list[Callbacks]):
        self.items = items

    def on_logits(self, token, batch, logits) -> None:
        for item in self.items:
            item.on_logits(token, batch, logits)

    def on_step(self, step, start_s, end_s) -> None:
        for item in self.items:
            item.on_step(step, start_s, end_s)

    def on_op(self, record) -> None:
        for item in self.items:
            item.on_op(record)


def chain(*callbacks: Callbacks | None) -> Callbacks | None:
    items = [c for c in callbacks if c is not None]
    return CallbackList(items) if len(items) > 1 else (items[0] if items else None)
