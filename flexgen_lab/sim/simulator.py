"""Discrete-event simulation of the engine: the exact op stream of engine/schedule.py, timed on
a hardware profile instead of executed (backend=simulated). No weight is allocated, so
opt-175b on the paper's T4 simulates in seconds.

What it honours, as the engine does (engine/engine.py):
- one main thread issues the ops in stream order and runs each compute op to its end; with
  overlap every load and store goes to a pool of profile.workers() workers, taken in issue order, a
  worker held from the moment it picks the op (waiting on dependencies included) to its end;
- a compute waits for its weights, its hidden input and its cache; a load of cache or hidden
  waits for the store that wrote them; stores run one after the other; without overlap each op
  runs inline, in stream order;
- each link is a FIFO queue (one copy at a time at the profile's bandwidth): an op crosses its
  links in order (disk -> cpu -> gpu for loads, gpu -> cpu -> disk for stores);
- a compute and the copies beside it slow each other (profile.overlap_contention seconds
  per second of overlap: 0 on a GPU, about 1 on a CPU whose copies share its cores);
- the phase clocks are the engine's: a token step starts when the main thread reaches its
  first compute, and the run ends when the last store is done.
Durations come from the cost model's own terms (link_rate, step_seconds), bytes from
planner.traffic.OpTraffic (equal to the engine's counters), so the three cannot drift apart.

    >>> sim = simulate(Job(spec, policy, "zigzag", profile, prompt_len=512, gen_len=32))
    >>> sim.generation_throughput, sim.link_bytes["decode"]["cpu_to_gpu"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flexgen_lab.engine import dependencies, schedule
from flexgen_lab.engine.placement import batch_ranges, split_units
from flexgen_lab.engine.schedule import Op
from flexgen_lab.engine.transfer import IO_THREADS, LINKS, phase_of
from flexgen_lab.planner.cost_model import link_rate, step_seconds
from flexgen_lab.planner.job import Job
from flexgen_lab.planner.traffic import OpTraffic

LOAD_ORDER = ("disk_to_cpu", "cpu_to_gpu")
STORE_ORDER = ("gpu_to_cpu", "cpu_to_disk")


@dataclass(frozen=True)
class Cost:
    """What one op takes: seconds on each link it crosses (in order), compute seconds (main
    thread), and the bytes it moves per link."""

    links: tuple[tuple[str, float], ...] = ()
    compute_s: float = 0.0
    moved: dict[str, int] = field(default_factory=dict)


@dataclass
class Simulation:
    prefill_s: float
    decode_s: float
    num_prompts: int
    gen_len: int
    link_bytes: dict[str, dict[str, int]]  # phase -> link -> bytes
    trace: list[dict]  # the engine's op records: op, token, layer, batch, bytes, start_s, end_s

    @property
    def generation_throughput(self) -> float:
        return self.num_prompts * self.gen_len / (self.prefill_s + self.decode_s)


class _Clock:
    """State of one block's simulation: the main thread, the I/O workers, the link queues."""

    def __init__(self, overlap: bool, start: float, workers: int, contention: float = 0.0):
        self.overlap, self.now, self.contention = overlap, start, contention
        self.copying: list[tuple[float, float]] = []  # I/O ops' busy spans, for contention
        self.in_flight: list[tuple] = []  # buffers whose I/O may not have ended yet
        self.workers = [start] * workers
        self.link_free = dict.fromkeys(LINKS, start)
        self.done: dict[tuple, float] = {}  # buffer key -> end of the op that fills/frees it
        self.last_store = start
        self.stores_end = start

    def io(self, key: tuple, deps: list[tuple], cost: Cost, store: bool) -> tuple[float, float]:
        """An I/O op issued now; returns (start, end). Moving nothing, it ends when issued."""
        if not cost.links:
            return self.now, self.now
        ready = max([self.now, *(self.done.get(d, self.now) for d in deps)])
        if store:
            ready = max(ready, self.last_store)
        worker = 0
        if self.overlap:
            worker = min(range(len(self.workers)), key=self.workers.__getitem__)
            ready = max(ready, self.workers[worker])
        start, t = None, ready
        for link, seconds in cost.links:
            t = max(t, self.link_free[link]) if self.overlap else t
            start = t if start is None else start  # when its first byte moves
            t += seconds
            self.link_free[link] = t
        self.done[key] = t
        if self.overlap:
            self.workers[worker] = t
            self.copying.append((start, t))
            self.in_flight.append(key)
        else:
            self.now = t
        if store:
            self.last_store = self.stores_end = t
        return start, t

    def compute(self, deps: list[tuple], cost: Cost) -> tuple[float, float]:
        """A compute on the main thread. Copies running beside it and the compute slow each
        other (profile.overlap_contention: 0 on a GPU, about 1 on a CPU whose copies share
        its cores): the compute takes contention x the copying it overlaps longer, and the
        copies' timeline after its start stretches the same way (every copy that overlaps it
        was issued before it: the main thread issues nothing while it computes)."""
        start = max([self.now, *(self.done.get(d, self.now) for d in deps)])
        end = start + cost.compute_s
        if self.contention and self.copying:
            overlap = _covered(self.copying, start, end)  # before the copies stretch
            self._stretch(start, end)
            end += self.contention * overlap
        self.now = end
        return start, end

    def _stretch(self, start: float, end: float) -> None:
        """Delay every I/O time after `start` by contention x the copying in [start, that
        time] (up to the compute's end): monotone, so the copies keep their order."""
        spans = self.copying = [(a, b) for a, b in self.copying if b > start]
        self.in_flight = [k for k in self.in_flight if self.done[k] > start]

        def later(t: float) -> float:
            return t + self.contention * _covered(spans, start, min(t, end)) if t > start else t
        self.workers = [later(t) for t in self.workers]
        self.link_free = {link: later(t) for link, t in self.link_free.items()}
        self.last_store, self.stores_end = later(self.last_store), later(self.stores_end)
        for key in self.in_flight:
            self.done[key] = later(self.done[key])
        self.copying = [(later(a), later(b)) for a, b in spans]


def _covered(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of [start, end] covered by the union of spans."""
    covered, reach = 0.0, start
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, end)
        if b > a:
            covered += b - a
            reach = b
    return covered


def run_stream(ops: Iterable[Op], cost_of: Callable[[Op], Cost], overlap: bool,
               start: float = 0.0, workers: int = IO_THREADS,
               token_steps: list[float] | None = None, contention: float = 0.0
               ) -> tuple[list[float], float, list[dict]]:
    """Time one block's op stream from `start`. Returns ([prefill, decode] seconds by the
    engine's clocks: each token step from its first compute to the next step's, the last to
    the end of the last store), the end time, and the op records. `token_steps`, when
    given, receives each token step's seconds by the same clocks (a pipeline stage's);
    `contention`: compute seconds each second of copying beside a compute adds to it."""
    clock, records = _Clock(overlap, start, workers, contention), []
    phase, token, mark = [0.0, 0.0], 0, start
    for op in ops:
        cost = cost_of(op)
        if op.kind == "compute":
            if op.token != token:
                phase[token > 0] += clock.now - mark
                if token_steps is not None:
                    token_steps.append(clock.now - mark)
                token, mark = op.token, clock.now
            begin, end = clock.compute(dependencies.waits_for(op), cost)
        else:
            begin, end = clock.io(dependencies.fills(op), dependencies.waits_for(op), cost,
                                  dependencies.is_store(op))
            if not cost.links:
                continue  # the engine submits nothing for an op that moves nothing
        records.append({"op": op.kind, "token": op.token, "layer": op.layer,
                        "batch": op.batch, "bytes": {k: v for k, v in cost.moved.items() if v},
                        "start_s": begin, "end_s": end})
    end = max(clock.now, clock.stores_end)
    phase[token > 0] += end - mark
    if token_steps is not None:
        token_steps.append(end - mark)
    return phase, end, records


class OpCosts:
    """Cost of each op of a run: bytes from OpTraffic, seconds from the cost model's terms."""

    def __init__(self, job: Job):
        spec, policy = job.spec, job.policy
        self.spec, self.policy, self.profile = spec, policy, job.profile
        self.zigzag = job.schedule == "zigzag"
        self.prompt_len, self.dtype_bytes = job.prompt_len, job.dtype_bytes
        self.traffic = OpTraffic(job)
        split = split_units(policy.block_size, policy.cache)
        self.cpu_rows = [sum(b - a for tier, (a, b) in
                             batch_ranges(split, k, policy.gpu_batch_size).items()
                             if tier != "gpu") if policy.cpu_delegation else 0
                         for k in range(policy.num_gpu_batches)]
        self._memo: dict[tuple, Cost] = {}

    def __call__(self, op: Op) -> Cost:
        part = ("embed" if op.layer == 0 else "head" if op.layer == self.spec.num_layers + 1
                else "layer")
        # identical ops cost the same: decoder layers and, for loads/stores, most tokens
        key = (op.kind, part, op.token, op.batch)
        if key not in self._memo:
            self._memo[key] = self._cost(op, part)
        return self._memo[key]

    def _cost(self, op: Op, part: str) -> Cost:
        moved = self.traffic(op)
        phase = phase_of(op.token)
        if op.kind != "compute":
            order = STORE_ORDER if op.kind.startswith("store") else LOAD_ORDER
            links = tuple((link, moved[link] / link_rate(self.profile, link, phase)
                           + self.profile.latency(link)) for link in order if moved[link])
            return Cost(links=links, moved=dict(moved))
        tokens = self.prompt_len if op.token == 0 else 1
        keys = self.prompt_len + op.token
        cpu_rows = self.cpu_rows[op.batch] if op.token > 0 else 0
        # the engine dequantises a part's weights once per (token, layer): in zig-zag the
        # first GPU batch of the layer does it for the others
        terms = step_seconds(self.spec, self.policy, self.profile, part,
                             self.policy.gpu_batch_size, tokens, keys, cpu_rows, phase,
                             self.dtype_bytes, dequant_weights=not self.zigzag or op.batch == 0)
        # delegated q/rows/output and sparse gathers: timed at link speed, inside the step
        transfers = sum(n / link_rate(self.profile, link, phase) + self.profile.latency(link)
                        for link, n in moved.items() if n)
        return Cost(compute_s=sum(terms.values()) + transfers, moved=dict(moved))


def simulate(job: Job) -> Simulation:
    """Simulate generating the job's prompts (one block by default), block after block."""
    spec, policy, profile, gen_len = job.spec, job.policy, job.profile, job.gen_len
    profile.require_speeds()
    costs = OpCosts(job)
    phases, moved, trace, start = [0.0, 0.0], {p: dict.fromkeys(LINKS, 0)
                                               for p in ("prefill", "decode")}, [], 0.0
    for _ in range(job.blocks):
        stream = schedule.ops(job.schedule, gen_len, spec.num_layers + 2,
                              policy.num_gpu_batches)
        phase, start, records = run_stream(stream, costs, policy.overlap, start,
                                           profile.workers(),
                                           contention=profile.overlap_contention)
        phases = [phases[0] + phase[0], phases[1] + phase[1]]
        trace.extend(records)
        for record in records:
            for link, n in record["bytes"].items():
                moved[phase_of(record["token"])][link] += n
    return Simulation(phases[0], phases[1], job.prompts, gen_len, moved, trace)
