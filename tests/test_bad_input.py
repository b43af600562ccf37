"""Bad and odd command lines over every command: the README's promise about exit codes.

Each line states its exit code and what its message must name (the key, or the value where
a key is not the point); what it may leave follows from the code:
  2  a configuration error: one message, no traceback, no row, and no file made or changed
     (Hydra's own log directory aside: Hydra makes it before any task runs);
  1  failed after starting: exactly one new row, status error or oom;
  0  an odd line that is fine: exactly one new row, status ok.
Never a file in the offload directory other than complete weight caches. The store starts
with one row, which must survive. Most lines run in this process through main(argv); those
marked SUBPROCESS run the console script, to check the exit codes a shell sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from flexgen_lab.__main__ import main
from flexgen_lab.results.store import ResultStore

DISK = "policy.weights.gpu=0 policy.weights.cpu=0"  # weights on the disk tier
NOTHING_FITS = ("model=opt-30b hardware=t4-paper hardware.gpu_mem=1MB hardware.cpu_mem=1MB "
                "hardware.disk_mem=1MB")
SAYS_WHAT_IS_ALLOWED = re.compile(r"allowed|must|expected|at most|need|usage|invalid choice")


@dataclass(frozen=True)
class Line:
    args: str  # after `python -m flexgen_lab`, shell-quoted, with {placeholders}
    code: int
    names: str  # the message must contain this
    store: str = "{db}"  # the store whose rows are counted
    subprocess: bool = False
    setup: str | None = None  # "damaged cache": a cache built, then one byte flipped


LINES = [
    # run: unknown keys, options and arguments (Hydra's errors while composing)
    Line("run foo=bar", 2, "foo"),
    Line("run +foo=1", 2, "foo"),
    Line("run ~foo", 2, "foo"),
    Line("run model=gpt5", 2, "model=gpt5"),
    Line("run policy=fastest", 2, "policy=fastest"),
    Line("run extra", 2, "extra"),
    Line("run --frobnicate", 2, "--frobnicate"),
    Line("run --config-dir={tmp}/nope", 2, "--config-dir"),
    Line("run policy.gpu_batch_size=1,2", 2, "policy.gpu_batch_size"),
    # wrong types and empty values
    Line("run policy.gpu_batch_size=2.5", 2, "policy.gpu_batch_size"),
    Line("run policy.overlap=maybe", 2, "policy.overlap"),
    Line("run policy.weights.gpu=", 2, "policy.weights.gpu"),
    Line("run policy.weights=0.5", 2, "policy.weights"),
    Line("run seed=1e3", 2, "seed"),
    Line("run workload.num_prompts=1e12", 2, "workload.num_prompts"),
    Line("run trace=maybe", 2, "trace"),
    Line("run dtype=float64", 2, "dtype"),
    Line("run backend=quantum", 2, "backend=quantum"),
    # sizes, fractions, NaN and inf
    Line("run policy.gpu_batch_size=0", 2, "policy.gpu_batch_size"),
    Line("run policy.gpu_batch_size=1000000000000", 2, "policy.gpu_batch_size"),
    Line("run policy.num_gpu_batches=99999999999999999999999", 2, "policy.num_gpu_batches"),
    Line("run policy.weights.gpu=1.5", 2, "policy.weights.gpu"),
    Line("run policy.weights.gpu=nan", 2, "policy.weights.gpu"),
    Line("run policy.weights.cpu=inf", 2, "policy.weights.cpu"),
    Line("run policy.cache.gpu=0.7 policy.cache.cpu=0.6", 2, "policy.cache"),
    Line("run policy.attn_sparsity=nan", 2, "policy.attn_sparsity"),
    Line("run policy.compress_bits=3", 2, "policy.compress_bits"),
    Line("run policy.compress_group_size=7", 2, "policy.compress_group_size"),
    Line("run policy.compress_group_size=1048576", 2, "policy.compress_group_size"),
    Line("run compress=auto", 2, "policy.compress_weight"),
    Line("run workload.prompt_len=0", 2, "workload.prompt_len"),
    Line("run workload.gen_len=100000", 2, "workload.gen_len"),
    Line("run workload.num_prompts=3", 2, "workload.num_prompts"),
    Line("run workload.num_prompts=4294967296", 2, "workload.num_prompts"),
    Line("run workload.num_prompts=134217728", 2, "hardware.cpu_mem"),  # ids alone: 16 GiB
    Line("run workload.temperature=nan", 2, "workload.temperature"),
    Line("run workload.temperature=inf", 2, "workload.temperature"),
    Line("run workload.temperature=-1", 2, "workload.temperature"),
    Line("run workload.stop_token=100000", 2, "workload.stop_token"),
    Line("run workload.prompts=corpus", 2, "workload.prompts"),
    Line("run workload.prompts=text", 2, "workload.prompts"),
    Line("run workload.prompt_text=hello", 2, "workload.prompt_text"),
    Line("run seed=-1", 2, "seed"),
    Line("run seed=99999999999999999999", 2, "seed"),
    Line("run hardware.gpu_mem=-1", 2, "hardware.gpu_mem"),
    Line("run hardware.gpu_mem=16XB", 2, "hardware.gpu_mem"),
    Line("run hardware.gpu_mem=inf", 2, "hardware.gpu_mem"),
    Line("run hardware.cpu_mem=1000TB", 2, "hardware.cpu_mem"),
    Line("run hardware.disk_mem=99999999999999999999999", 2, "hardware.disk_mem"),
    Line("run hardware.step_overhead_s=nan", 2, "hardware.step_overhead_s"),
    Line("run hardware.overlap_contention=-1", 2, "hardware.overlap_contention"),
    Line("run backend=simulated hardware=t4-paper hardware.bw_cpu_to_gpu=inf", 2,
         "hardware.bw_cpu_to_gpu"),
    # options that exist but do not fit together, or are not built
    Line("run backend=simulated hardware=local", 2, "hardware=local"),
    Line("run distributed=pipeline", 2, "distributed=pipeline"),
    Line("run system=llamacpp model=opt-tiny", 2, "opt family"),  # llama.cpp has no OPT
    Line("run engine.disk_io=mmap", 2, "engine.disk_io"),
    Line("run engine.weight_cache=sometimes", 2, "engine.weight_cache"),
    # missing and unusable paths
    Line("run engine.offload_dir=", 2, "engine.offload_dir"),
    Line(f"run {DISK} engine.offload_dir=/proc/flexgen_lab", 2, "proc"),
    Line(f"run {DISK} engine.offload_dir={{file}}/off", 2, "engine.offload_dir"),
    Line("run store.path=", 2, "store.path"),
    Line("run store.path={dir}", 2, "store.path"),
    Line("run store.path={text}", 2, "store.path"),
    Line("run store.path={file}/r.sqlite", 2, "store.path"),
    Line("run model=local", 2, "model.path"),
    Line("run model=local model.path={tmp}/missing", 2, "model.path"),
    Line("run model=local model.path={pickle}", 2, "model.path"),
    Line("run model=local model.path={corrupt}", 2, "model.safetensors"),
    Line("run model=local model.path={truncated}", 2, "model.safetensors"),
    Line("run model=local model.path={tmp}/missing.gguf", 2, "model.path"),
    Line("run model=local model.path={text_gguf}", 2, "not a valid GGUF"),
    Line("fetch", 2, "fetch"),
    Line("eval model=opt-tiny", 2, "tokenizer"),
    Line("eval model=opt-tiny eval.prefix_len=0", 2, "eval.prefix_len"),
    Line("fetch gpt5", 2, "smollm2-135m-instruct"),
    # a bad value inside a multirun list: refused before the first job
    Line("run --multirun policy.gpu_batch_size=1,0", 2, "policy.gpu_batch_size=0"),
    Line("run --multirun seed=0,1 workload.temperature=0,nan", 2, "workload.temperature"),
    # search
    Line("search model=gpt5", 2, "model=gpt5"),
    Line("search hardware=local", 2, "hardware=local"),
    Line(f"search {NOTHING_FITS}", 2, "hardware.gpu_mem=1MB"),
    Line("search workload.prompt_len=0", 2, "workload.prompt_len"),
    Line("search search.max_block_size=-1", 2, "search.max_block_size"),
    # table, calibrate, cache
    Line("table limit=0", 2, "limit"),
    Line("table colour=red", 2, "colour"),
    Line("table store.path={dir}", 2, "store.path"),
    Line("table store.path={text}", 2, "store.path"),
    Line("table store.path={tmp}/none.sqlite", 2, "store.path"),
    Line("calibrate quick=maybe", 2, "quick"),
    Line("calibrate name=../evil", 2, "name"),
    Line("calibrate offload_dir=/proc/flexgen_lab quick=true", 2, "offload_dir"),
    Line("calibrate fit=true name=nosuch", 2, "nosuch"),
    Line("calibrate fit=true name=t4-paper holdout=1.5", 2, "holdout"),
    Line("cache clear", 2, "clear"),
    Line("cache clear feedfacefeedface engine.offload_dir={off}", 2, "feedfacefeedface"),
    Line("cache engine.offload_dir=", 2, "engine.offload_dir"),
    # reproduce and plot
    Line("reproduce", 2, "experiment"),
    Line("reproduce experiment=nope", 2, "experiment"),
    Line("reproduce experiment=figure1 reproduce.scale=huge", 2, "reproduce.scale"),
    Line("reproduce experiment=figure1 reproduce.repeats=0", 2, "reproduce.repeats"),
    Line("reproduce experiment=figure1 policy.gpu_batch_size=abc", 2, "policy.gpu_batch_size"),
    Line("reproduce experiment=figure1 store.path={text}", 2, "store.path"),
    Line("plot experiment=figure1 reproduce.scale=huge", 2, "reproduce.scale"),
    Line("frobnicate", 2, "frobnicate"),
    # failed after starting: one row each
    Line("run hardware.gpu_mem=64KB", 1, "gpu tier"),
    Line("run backend=simulated model=opt-175b hardware=t4-paper policy=resident "
         "workload=paper-512", 1, "gpu tier"),
    Line("run model=local model.path={broken}", 1, "layers.1.fc1.weight"),
    Line(f"run {DISK} engine.weight_cache=verify", 1, "layer0001.bin", setup="damaged cache"),
    # odd but fine
    Line("run workload.temperature=0.7", 0, ""),
    Line("run store.path={tmp}/new/deeper/r.sqlite", 0, "", store="{tmp}/new/deeper/r.sqlite"),
    Line("run store.path={empty}", 0, "", store="{empty}"),
    Line(f"run {DISK} 'engine.offload_dir={{tmp}}/with space/off'", 0, ""),
    Line(f"run {DISK} engine.weight_cache=verify", 0, ""),
    # the console script, in a subprocess
    Line("run foo=bar", 2, "foo", subprocess=True),
    Line("run policy.gpu_batch_size=abc", 2, "policy.gpu_batch_size", subprocess=True),
    Line("run --multirun policy.gpu_batch_size=1,abc", 2, "policy.gpu_batch_size",
         subprocess=True),
    Line(f"search {NOTHING_FITS}", 2, "hardware.gpu_mem", subprocess=True),
    Line("run hardware.gpu_mem=64KB", 1, "gpu tier", subprocess=True),
]


@pytest.fixture(scope="module")
def model_dirs(hf_checkpoint, tmp_path_factory):
    """Local model directories: pickle-only, corrupt header, truncated, one tensor missing."""
    src, _ = hf_checkpoint("opt-odd")
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in ("pickle", "corrupt", "truncated", "broken"):
        dirs[name] = root / name
        shutil.copytree(src, dirs[name])
    weights = dirs["pickle"] / "model.safetensors"
    weights.rename(dirs["pickle"] / "pytorch_model.bin")
    (dirs["corrupt"] / "model.safetensors").write_bytes(b"\xff" * 100)
    data = (dirs["truncated"] / "model.safetensors").read_bytes()
    (dirs["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    tensors = load_file(dirs["broken"] / "model.safetensors")
    tensors.pop("model.decoder.layers.1.fc1.weight")
    save_file(tensors, dirs["broken"] / "model.safetensors")
    return dirs


def places(tmp_path: Path, model_dirs: dict) -> dict[str, str]:
    """The placeholders' paths; makes the files they name (and the store, with one row)."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "notes.gguf").write_text("not a model\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.sqlite").write_bytes(b"")
    ResultStore(tmp_path / "r.sqlite").record_run({"status": "ok", "model": "earlier"})
    return {"tmp": str(tmp_path), "db": str(tmp_path / "r.sqlite"),
            "off": str(tmp_path / "off"), "dir": str(tmp_path / "a_dir"),
            "text": str(tmp_path / "notes.txt"), "text_gguf": str(tmp_path / "notes.gguf"),
            "file": str(tmp_path / "a_file"),
            "empty": str(tmp_path / "empty.sqlite"),
            **{k: str(v) for k, v in model_dirs.items()}}


def argv(line: Line, where: dict[str, str]) -> list[str]:
    """The line's words, with a tiny default model, store and offload directory put first
    for run (the line's own overrides come later and win) and its flags before them."""
    words = [w.format(**where) for w in shlex.split(line.args)]
    if words[0] != "run":
        return words
    flags = [w for w in words[1:] if w.startswith("-")]
    defaults = ["model=opt-tiny", "workload=tiny", f"store.path={where['db']}",
                f"engine.offload_dir={where['off']}"]
    return [words[0], *flags, *defaults, *[w for w in words[1:] if not w.startswith("-")]]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a digest of its content; Hydra's logs left out."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "hydra" not in p.parts}


def rows(path: str) -> list[str]:
    return list(ResultStore(path).runs().status) if Path(path).exists() else []


def only_complete_caches(offload: Path) -> None:
    if not offload.exists():
        return
    assert {p.name for p in offload.iterdir()} <= {"weight_cache"}, list(offload.iterdir())
    for cache in (offload / "weight_cache").iterdir():
        assert (cache / "manifest.json").is_file(), f"left in the offload directory: {cache}"


def damage_a_cache(where: dict[str, str]) -> None:
    assert run_line(["run", "model=opt-tiny", "workload=tiny", *DISK.split(),
                     f"store.path={where['db']}", f"engine.offload_dir={where['off']}"])[0] == 0
    (cache,) = (Path(where["off"]) / "weight_cache").iterdir()
    part = cache / "layer0001.bin"
    manifest = json.loads((cache / "manifest.json").read_text())
    data = bytearray(part.read_bytes())
    data[manifest["parts"]["layer0001"]["fc1.weight"]["value"] + 7] ^= 0x20
    part.write_bytes(bytes(data))


def run_line(words: list[str]) -> tuple[int, str]:
    """main(words) in this process: (exit code, what it wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(words)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def console_script(words: list[str], cwd: Path) -> tuple[int, str]:
    script = Path(sys.executable).parent / "flexgen-lab"
    out = subprocess.run([str(script), *words], cwd=cwd, capture_output=True, text=True,
                         timeout=240)
    return out.returncode, out.stderr


@pytest.mark.parametrize("line", LINES, ids=lambda line: ("SUBPROCESS " if line.subprocess
                                                         else "") + line.args)
def test_bad_input(line, tmp_path, model_dirs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Hydra's logs and any default path land here
    where = places(tmp_path, model_dirs)
    if line.setup == "damaged cache":
        damage_a_cache(where)
    counted = line.store.format(**where)
    before_rows, before_files = rows(counted), snapshot(tmp_path)
    words = argv(line, where)
    code, err = (console_script(words, tmp_path) if line.subprocess else run_line(words))
    err += capsys.readouterr().err  # argparse writes to sys.stderr itself
    assert code == line.code, f"{words}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert line.names in err, f"{line.names!r} not named in:\n{err[-2000:]}"
    after = rows(counted)
    if line.code == 2:
        assert SAYS_WHAT_IS_ALLOWED.search(err), f"says nothing of what is allowed:\n{err}"
        assert after == before_rows and snapshot(tmp_path) == before_files
    else:
        assert after[:len(before_rows)] == before_rows and len(after) == len(before_rows) + 1
        assert after[-1] in (("ok",) if line.code == 0 else ("error", "oom"))
    only_complete_caches(Path(where["off"]))
    only_complete_caches(tmp_path / "with space" / "off")
