"""No router: vanilla models (no sharing) and plain recursive models, where every token runs every recursion.

    H^{r+1} = f(H^r)   for every token and every step r

The program holds only layer ops; all of Routing's defaults apply (no state, no losses, no FLOPs, always
continue).
"""
from __future__ import annotations

from model.routing.base import Routing


class NoRouting(Routing):
    name = "none"
    export_name = "none"
