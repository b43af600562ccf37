"""The paper's Tables 2 and 4 and Figure 1, simulated on the paper's T4 (t4-paper-sourced):
a thin caller of `reproduce`, which holds the cells (experiments/*.yaml), runs them into the
store and writes results/tables/*.md|csv.

    python -m benchmarks.paper_tables          # a few minutes; no weights are made

The same as, in turn:

    python -m flexgen_lab reproduce experiment=table2 backend=simulated
    python -m flexgen_lab reproduce experiment=table2 reproduce.scale=paper-disk-ssd
    python -m flexgen_lab reproduce experiment=table4 backend=simulated
    python -m flexgen_lab reproduce experiment=figure1 backend=simulated

Every number printed beside "paper" is simulated, never measured.
"""

from __future__ import annotations

from flexgen_lab.reproduce import reproduce

RUNS = (["experiment=table2", "backend=simulated"],
        ["experiment=table2", "reproduce.scale=paper-disk-ssd"],
        ["experiment=table4", "backend=simulated"],
        ["experiment=figure1", "backend=simulated"])


def main() -> None:
    for args in RUNS:
        reproduce(args)


if __name__ == "__main__":
    main()
