"""Baseline `system=llamacpp`: llama.cpp (through llama-cpp-python) running a GGUF file.

llama.cpp runs GGUF files only, and no OPT: a run on model.path=*.gguf hands it that file; a
run on any other weights of a Llama-family model writes them once as a GGUF file in the run's
dtype (models/gguf_writer.py, kept in the weight cache by baselines/export.py), so llama.cpp
computes on exactly the engine's weights. The prompts are the run's token ids, unpadded, fed
directly (no text, no tokenizer); greedy; timed as the paper times (prefill = the first
token, decode = the rest), with the same thread count as every other system.

Batch 1 goes through its high-level API (`Llama.generate`, a prompt at a time). A larger
batch goes through its low-level bindings as llama.cpp's own batched examples do: one
`llama_batch` holding every sequence of the batch (each its own sequence id, in its own KV
stream) per `llama_decode`, the prompts together first, then one token per sequence per step.

Budgets are not enforced: llama.cpp maps the whole file and keeps its KV cache in memory.
On a GPU, `n_gpu_layers` (layers whose weights fit the gpu-tier budget) is its offload knob
and `w_gpu` = n_gpu_layers / L; on the CPU it is 0. The row says "not enforced" in its
placement_json, records peak anonymous and file-backed RSS apart (the map is file-backed),
and the llama-cpp-python version.

    python -m flexgen_lab run system=llamacpp model=llama-tiny
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flexgen_lab.engine.batch import Generation
from flexgen_lab.workload import unpadded

EXTRA = "llamacpp"
INSTALL = "pip install 'flexgen_lab[llamacpp]'"
CTX_ROUND = 256  # llama.cpp pads its context to a multiple of 256 cells


def versions() -> str:
    """llama-cpp-python's version and its vendored libraries' (llama.cpp's commit is not
    exposed by the build; its libllama and libggml carry versioned file names)."""
    import llama_cpp

    libs = [p.name.partition(".so.")
            for p in sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*.so.*.*.*"))]
    found = {name: version for name, _, version in libs}
    built = ", ".join(f"{name} {found[name]}" for name in ("libllama", "libggml") if name in found)
    return f"llama-cpp-python {llama_cpp.__version__}; llama.cpp vendored ({built or 'unknown'}" \
        "; commit not exposed)"


def threads() -> int:
    """The thread count every system uses (torch's, printed by the runner)."""
    return torch.get_num_threads()


def gpu_layers(spec, budgets: dict[str, int], device: torch.device, layer_bytes: int) -> int:
    """Layers llama.cpp offloads to the GPU: those whose weights fit the gpu-tier budget (0 on
    the CPU, or where this llama.cpp build has no GPU backend)."""
    import llama_cpp

    if device.type != "cuda" or not llama_cpp.llama_supports_gpu_offload():
        return 0
    return min(spec.num_layers, budgets["gpu"] // max(layer_bytes, 1))


def _quiet() -> None:
    """llama.cpp logs every load to stderr; keep errors only."""
    from llama_cpp import _logger

    _logger.set_verbose(False)


def extra_buffers() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weights repacked for its AMX or
    interleaved kernels). Not where its AMX path is active: there, on llama-cpp-python 0.3.36,
    a Q4_1 file (SmolLM2's own) crashes in ggml_backend_amx_mul_mat with SIGSEGV at the first
    llama_decode (measured on a Sapphire Rapids VM). Without them llama.cpp runs its ordinary
    CPU kernels; F32/F16/BF16 files never use these buffers, so only quantised files differ."""
    import llama_cpp

    return b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()


@contextmanager
def _default_model_params(**fields):
    """The high-level `Llama` takes its model parameters from llama_model_default_params()
    and has no argument for use_extra_bufts: give it defaults with `fields` set, for the
    duration of the construction only."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = default


def generate_single(path, prompts: list[list[int]], gen_len: int, n_gpu_layers: int):
    """Batch 1 through the high-level API: (outputs, prefill_s, decode_s)."""
    from llama_cpp import Llama

    n_ctx = _round(max(map(len, prompts)) + gen_len)
    with _default_model_params(use_extra_bufts=extra_buffers()):
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048),
                    n_threads=threads(), n_threads_batch=threads(),
                    n_gpu_layers=n_gpu_layers, seed=0, verbose=False)
    outputs, prefill_s, decode_s = [], 0.0, 0.0
    try:
        for prompt in prompts:
            llm.reset()  # no prefix of an earlier prompt reused: each prompt is prefilled whole
            start = time.perf_counter()
            stream = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True)
            out = [next(stream)]
            first = time.perf_counter()
            out += [next(stream) for _ in range(gen_len - 1)]
            prefill_s += first - start
            decode_s += time.perf_counter() - first
            stream.close()
            outputs.append(out)
    finally:
        llm.close()
    return outputs, prefill_s, decode_s


def _round(n: int) -> int:
    return -(-n // CTX_ROUND) * CTX_ROUND


class _Context:
    """A llama.cpp model and context for `n_seq` sequences, each its own KV stream."""

    def __init__(self, path, n_seq: int, per_seq: int, n_batch: int, n_gpu_layers: int):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers, mparams.use_extra_bufts = n_gpu_layers, extra_buffers()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_seq_max, cparams.kv_unified = n_seq * per_seq, n_seq, False
        cparams.n_batch, cparams.n_ubatch = n_batch, min(n_batch, 512)
        cparams.n_threads = cparams.n_threads_batch = threads()
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) entries."""
        b = self.batch
        for n, (token, pos, seq, logits) in enumerate(entries):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
            b.seq_id[n][0] = seq
        b.n_tokens = len(entries)
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {len(entries)} tokens")

    def argmax(self, index: int) -> int:
        """Greedy: the highest logit of the batch entry `index` (the first, on ties)."""
        ptr = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def generate_batched(path, prompts: list[list[int]], gen_len: int, n_gpu_layers: int):
    """Several sequences per llama_decode (low-level API): (outputs, prefill_s, decode_s)."""
    n_seq = len(prompts)
    n_batch = max(sum(map(len, prompts)), n_seq)
    ctx = _Context(path, n_seq, _round(max(map(len, prompts)) + gen_len), n_batch, n_gpu_layers)
    try:
        start = time.perf_counter()
        entries, last = [], []
        for seq, prompt in enumerate(prompts):
            entries += [(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)]
            last.append(len(entries) - 1)
        ctx.decode(entries)
        outputs = [[ctx.argmax(i)] for i in last]
        first = time.perf_counter()
        for step in range(1, gen_len):
            ctx.decode([(out[-1], len(prompt) + step - 1, seq, True)
                        for seq, (prompt, out) in enumerate(zip(prompts, outputs, strict=True))])
            for seq, out in enumerate(outputs):
                out.append(ctx.argmax(seq))
        done = time.perf_counter()
    finally:
        ctx.close()
    return outputs, first - start, done - first


def generate(path, prompts: list[list[int]], gen_len: int, batch_size: int,
             n_gpu_layers: int = 0) -> Generation:
    """Greedy tokens of every prompt, batch by batch, and the paper's times summed."""
    _quiet()
    outputs, prefill_s, decode_s = [], 0.0, 0.0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        go = generate_single if len(chunk) == 1 else generate_batched
        out, p, d = go(path, chunk, gen_len, n_gpu_layers)
        outputs += out
        prefill_s, decode_s = prefill_s + p, decode_s + d
    return Generation(torch.tensor(outputs, dtype=torch.long), prefill_s, decode_s)


def run(spec, weights, ids, mask, gen_len: int, batch_size: int, device: torch.device,
        dtype: torch.dtype, budgets: dict[str, int], offload_dir: str):
    """Write (or take) the GGUF file, generate batch by batch, report (Generation, columns)."""
    from flexgen_lab.baselines.export import gguf_file
    from flexgen_lab.baselines.rss import PeakRssSplit

    path = gguf_file(weights, spec, dtype, offload_dir)
    layer_bytes = sum(np.prod(s) for s in spec.layer_param_shapes().values()) * dtype.itemsize
    n_gpu = gpu_layers(spec, budgets, device, int(layer_bytes))
    with PeakRssSplit() as rss:
        gen = generate(path, unpadded(ids, mask), gen_len, batch_size, n_gpu)
    return gen, columns(spec, n_gpu, rss, path)


def columns(spec, n_gpu: int, rss, path) -> dict:
    """The row's columns: w_gpu = n_gpu_layers / L, the rest in host memory (mapped)."""
    w_gpu = n_gpu / spec.num_layers
    report = {"budgets": "not enforced", "file": str(path), "n_gpu_layers": n_gpu,
              "n_threads": threads()}
    return {
        "placement_json": json.dumps(report),
        "w_gpu": w_gpu, "w_cpu": 1 - w_gpu, "w_disk": 0.0,
        "peak_rss_bytes": rss.peak_bytes, "peak_rss_anon_bytes": rss.peak_anon_bytes,
        "peak_rss_file_bytes": rss.peak_file_bytes,
        "system_version": versions(),
    }

