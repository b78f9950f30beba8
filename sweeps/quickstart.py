"""The quickstart's IsoFLOP sweep (what ``medscale quickstart`` trains), as a sweep definition.

Run:  medscale sweep run sweeps/quickstart.py --workers 2      (then: medscale report results/quickstart)
"""

from medscale.analysis.quickstart import quickstart_sweep


def get_config():
    return quickstart_sweep()
