"""The `eval` command: one configuration's accuracy on real text, stored as a run and its evals.

Everything `run` checks is checked first (exit 2, nothing stored); then the text is cut
(evaluation.py), the engine is built with the configuration's policy (placement, compression,
sparsity: the approximation under test) and the metrics go to table `evals`, with one `runs`
row whose system, compress, bits, group and attn_sparsity say which variant it was.

    python -m flexgen_lab eval model=smollm2-135m-instruct compress=both policy.attn_sparsity=0.1
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from flexgen_lab.checks import check_paths, prepare
from flexgen_lab.config import ConfigError, RunConfig
from flexgen_lab.corpus import corpus_path, corpus_sha256, load_documents
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.tiers import Tiers
from flexgen_lab.evaluation import EvalText, evaluate, last_word_passages, perplexity_windows
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import open_weights
from flexgen_lab.results.store import ResultStore, StoreError
from flexgen_lab.runner import RunFailed, config_columns, io_workers, to_policy
from flexgen_lab.units import TORCH_DTYPES
from flexgen_lab.workload import load_tokenizer

FULL_PRECISION_LABEL = "SmolLM2 as shipped (Q4_1 weights dequantised)"


@dataclass
class EvalResult:
    run_id: int
    metrics: dict  # perplexity, last_word_accuracy, scored_tokens, wall_s
    row: dict


def check_eval(cfg: RunConfig, spec: ModelSpec) -> None:
    """The eval keys, and what eval needs beyond a run: a tokenizer and the measured engine."""
    e, problems = cfg.eval, []
    for key in ("window_len", "n_windows", "passages", "prefix_len"):
        value = getattr(e, key)
        if not (isinstance(value, int) and value > 0):
            problems.append(f"eval.{key}={value!r}: must be an integer > 0")
    if e.stride is not None and not (isinstance(e.stride, int) and e.stride > 0):
        problems.append(f"eval.stride={e.stride!r}: must be an integer > 0 or null")
    if not problems and e.window_len < e.prefix_len + 2:
        problems.append(f"eval.window_len={e.window_len}: must be at least eval.prefix_len + 2 "
                        f"= {e.prefix_len + 2} (one token predicted by decode)")
    if not problems and e.window_len > spec.max_positions:
        problems.append(f"eval.window_len={e.window_len}: at most {spec.name}'s "
                        f"{spec.max_positions} positions")
    if not cfg.model.path:
        problems.append(f"eval needs a tokenizer, and model={cfg.model.name} has none; allowed: "
                        "model=smollm2-135m-instruct, or model.path=DIR or FILE.gguf")
    if cfg.system.name != "flexgen_lab" or cfg.backend.name != "measured":
        problems.append(f"eval runs the engine: system={cfg.system.name} backend="
                        f"{cfg.backend.name}; allowed: system=flexgen_lab backend=measured")
    if cfg.policy.name != "manual":
        problems.append("eval needs policy=manual (the variant is the policy)")
    if problems:
        raise ConfigError("invalid eval configuration:\n  " + "\n  ".join(problems))


def eval_text(cfg: RunConfig, tokenizer) -> tuple[EvalText, str]:
    e = cfg.eval
    path = corpus_path(e.corpus)
    docs = load_documents(path)
    stride = e.stride or e.window_len
    try:
        windows = perplexity_windows(tokenizer, docs, e.window_len, stride, e.n_windows)
        passages, word_lens = last_word_passages(tokenizer, docs, e.window_len, e.prefix_len,
                                                 e.passages)
    except ValueError as err:
        raise ConfigError(f"eval.corpus={e.corpus!r}: {err}") from None
    return EvalText(windows, passages, word_lens, stride), corpus_sha256(path)


def eval_hash(run_hash: str) -> str:
    """An eval's config_hash differs from a run's of the same configuration."""
    return hashlib.sha256(f"eval|{run_hash}".encode()).hexdigest()[:16]


def run_eval(cfg: RunConfig, show_progress: bool = True) -> EvalResult:
    spec, device, dtype, budgets = prepare(cfg)
    check_paths(cfg)
    check_eval(cfg, spec)
    tokenizer = load_tokenizer(cfg.model.path)
    text, sha = eval_text(cfg, tokenizer)
    try:
        store = ResultStore(cfg.store.path)
    except StoreError as err:
        raise ConfigError(str(err)) from None
    e = cfg.eval
    row = config_columns(cfg, spec, dtype, device, budgets)
    row |= {"config_hash": eval_hash(row["config_hash"]), "prompt_len": e.prefix_len,
            "gen_len": e.window_len - e.prefix_len,
            "num_prompts": text.windows.shape[0] + text.passages.shape[0]}
    policy = to_policy(cfg)
    try:
        weights = open_weights(spec.name, cfg.model.path, cfg.seed)
        tiers = Tiers(budgets["gpu"], budgets["cpu"], budgets["disk"], device, policy.pin_memory)
        with torch.inference_mode(), Engine(
                spec, weights, policy, cfg.schedule.name, device, TORCH_DTYPES[dtype], None,
                tiers, cfg.engine.offload_dir, cfg.engine.disk_io, io_workers(cfg, device),
                cfg.engine.weight_cache) as engine:
            metrics = evaluate(engine, text, e.prefix_len, show_progress)
    except BaseException as err:  # the row says how it ended, as for a run
        status = "oom" if type(err).__name__ == "BudgetExceeded" else "error"
        message = f"{type(err).__name__}: {err}"
        run_id = store.record_run({**row, "status": status, "error": message})
        raise RunFailed(message, run_id, status) from err
    metrics.pop("logprob")
    row |= {"status": "ok", "latency_s": metrics["wall_s"]}
    cut = dict(prefix_len=e.prefix_len, corpus_sha256=sha)
    evals = [
        dict(metric="perplexity", value=metrics["perplexity"], window_len=e.window_len,
             stride=text.stride, n_windows=text.windows.shape[0], **cut),
        dict(metric="last_word_accuracy", value=metrics["last_word_accuracy"],
             window_len=e.window_len, stride=None, n_windows=text.passages.shape[0], **cut),
        dict(metric="scored_tokens", value=metrics["scored_tokens"], window_len=e.window_len,
             stride=text.stride, n_windows=text.windows.shape[0], **cut),
    ]
    run_id = store.record_run(row, evals=evals)
    return EvalResult(run_id, metrics, row)


def variant_label(row: dict) -> str:
    """How a table names an eval's approximation."""
    parts = []
    if row["compress"] != "none":
        what = {"weight": "weights", "cache": "cache", "weight+cache": "weights and cache"}
        parts.append(f"{row['compress_bits']}-bit {what[row['compress']]} "
                     f"(group {row['compress_group']})")
    if row["attn_sparsity"] is not None and row["attn_sparsity"] < 1:
        parts.append(f"sparse attention {row['attn_sparsity']:g}")
    return " + ".join(parts) or f"full precision: {FULL_PRECISION_LABEL}"


def summary(result: EvalResult, store_path: str) -> str:
    m, r = result.metrics, result.row
    return (f"{r['model']} eval [{variant_label(r)}] on {r['device']} ({r['dtype']}): "
            f"perplexity {m['perplexity']:.3f} over {m['scored_tokens']} decode-predicted "
            f"tokens, last-word accuracy {m['last_word_accuracy']:.3f}; wall time "
            f"{m['wall_s']:.1f} s [measured]\nstored as run_id {result.run_id} in {store_path}")
