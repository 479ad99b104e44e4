"""``moecomm demo``: all-MiniLM-L6-v2 on N ranks, attention data-parallel, the FFNs as expert-parallel MoEs.

Modules: ``minilm`` (the model in plain torch, and how its FFNs become experts), ``moefied`` (the demo's
MoE plan and its one call into the library), ``oracle`` (the original model and the comparison),
``progress`` (the progress bars), ``run`` (the ranks, the driver, the table and the command line).
"""

from moecomm.demo.moefied import default_num_experts, resolve_strategy, split_counts
from moecomm.demo.oracle import Oracle
from moecomm.demo.run import StrategyResult, add_arguments, print_results, run, run_demo

__all__ = ["add_arguments", "run", "run_demo", "split_counts", "default_num_experts", "resolve_strategy",
           "Oracle", "StrategyResult", "print_results"]
