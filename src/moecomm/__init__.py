"""moecomm: MoE communication for DP attention + EP experts.

Quantize before the all-gather (allgatherv of NVFP4 / FP8 tokens), combine with reducescatterv.
Modules: ``collectives``, ``launch``, ``quant``, ``routing``, ``moe``, ``dispatch``, ``ops`` (custom ops for
``torch.compile``), ``bench``, ``demo``.
"""

from moecomm.collectives import all_gatherv, check_consistency, reduce_scatterv

__all__ = ["all_gatherv", "reduce_scatterv", "check_consistency"]
__version__ = "0.1.0"
