"""flexgen_lab: reproduce, ablate and extend FlexGen (high-throughput LLM inference, offloaded).

    python -m flexgen_lab run schedule=zigzag compress=none
"""

__version__ = "0.1.0"
