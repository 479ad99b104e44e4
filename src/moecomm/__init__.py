"""moecomm: MoE communication for DP attention + EP experts.

Quantize before the all-gather (allgatherv of NVFP4 / FP8 tokens), combine with reducescatterv.
Packages, bottom to top (docs/architecture.md): ``errors``; ``quant`` (wire formats) and ``comm`` (the
collectives, ``launch``); ``moe`` (routing, expert weights, expert compute); ``layer`` (dispatch, combine,
``moe_forward``, ``GraphedMoE``); ``ops`` (the custom ops for ``torch.compile``); ``bench``, ``demo`` and
the ``moecomm`` command on top.
"""

from moecomm.comm import all_gatherv, check_consistency, gather_sizes, reduce_scatterv

__all__ = ["all_gatherv", "reduce_scatterv", "gather_sizes", "check_consistency"]
__version__ = "0.2.0"
