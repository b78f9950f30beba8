"""The committed reference sweep (results/reference/): the quickstart's design under its own name.

Made by:  medscale quickstart --sweep sweeps/reference.py --workers 2
(records, metrics and the report are committed; checkpoints and logs are git-ignored)
"""

from medscale.analysis.quickstart import quickstart_sweep


def get_config():
    return quickstart_sweep(name="reference")
