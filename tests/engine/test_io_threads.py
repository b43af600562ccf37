"""The I/O threads take one torch thread each without taking the main thread's others: torch's
set_num_threads in a new thread also sets the process default, which a main thread that has
not run a parallel op yet would inherit (calibrate once timed its operators on 1 of 2)."""

from __future__ import annotations

import subprocess
import sys


def test_io_workers_use_one_thread_and_leave_the_main_threads_count():
    # a fresh process whose main thread asks nothing of torch's threads before the pool
    fresh = """
import torch
from flexgen_lab.engine.transfer import Executor
a = torch.empty(32 * 2**20, dtype=torch.uint8)
b = torch.empty_like(a)
ex = Executor(True, 2)
worker = ex.submit(lambda: (b.copy_(a), torch.get_num_threads())[1], [], {}).result()
ex.close()
torch.nn.functional.linear(torch.randn(64, 256), torch.randn(256, 256))
print(worker, torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "2", "PATH": ""})
    assert out.returncode == 0, out.stderr
    worker, after = map(int, out.stdout.split())
    assert (worker, after) == (1, 2)  # OMP_NUM_THREADS=2: the main thread keeps its two
