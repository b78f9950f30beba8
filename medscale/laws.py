"""Scaling-law forms and the published laws, as data with citations.

Every law answers ``loss(N, D)``, ``n_opt(C)``, ``d_opt(C)`` for compute C under C = 6 N D (the convention of
the papers these come from; the project's own encoder-decoder accounting is applied by the callers that ask).
N is the parameter count of the law's convention: Chinchilla and Epoch count all parameters, Kaplan
non-embedding ones.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from medscale.errors import UserError
from medscale.hardware import PF_DAY  # the one definition


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Approach 3 form)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    citation: str = ""

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """N_opt proportional to C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt proportional to C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def n_opt(self, c):
        """Compute-optimal parameters for C FLOPs under C = 6 N D (closed form)."""
        return self.G * (np.asarray(c, dtype=float) / 6.0) ** self.a

    def d_opt(self, c):
        return (1.0 / self.G) * (np.asarray(c, dtype=float) / 6.0) ** self.b

    def to_dict(self) -> dict:
        return {"form": "chinchilla", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020: L(N, D) = [(Nc/N)^(aN/aD) + Dc/D]^aD (Eq. 1.5), N non-embedding;
    compute-efficient size N_opt = n_coef * (C / PF-day)^n_exp (Eq. 6.1 / Fig. 14), D_opt = C / (6 N_opt)."""

    name: str
    alpha_n: float
    alpha_d: float
    n_c: float
    d_c: float
    n_coef: float
    n_exp: float
    citation: str = ""

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return ((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d

    @property
    def a(self) -> float:
        return self.n_exp

    @property
    def b(self) -> float:
        return 1.0 - self.n_exp

    def n_opt(self, c):
        return self.n_coef * (np.asarray(c, dtype=float) / PF_DAY) ** self.n_exp

    def d_opt(self, c):
        return np.asarray(c, dtype=float) / (6.0 * self.n_opt(c))

    def to_dict(self) -> dict:
        return {"form": "kaplan", **dataclasses.asdict(self)}


PUBLISHED = {
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Approach 3 (Sec. 3.3, Eq. 10).
    # alpha, beta unrounded as reproduced in Besiroglu et al. 2024, Table 1 (they give a = 0.46, b = 0.54).
    "chinchilla": ChinchillaLaw("chinchilla", E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849,
                                citation="Hoffmann et al. 2022, arXiv:2203.15556, Approach 3"),
    # The same law with the rounded exponents printed in the paper (alpha = 0.34, beta = 0.28).
    "chinchilla-rounded": ChinchillaLaw("chinchilla-rounded", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
                                        citation="Hoffmann et al. 2022, arXiv:2203.15556, Eq. 10 (rounded)"),
    # Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv:2404.10102, Eq. 4.
    "epoch2024": ChinchillaLaw("epoch2024", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                               citation="Besiroglu et al. 2024, arXiv:2404.10102"),
    # Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv:2001.08361: Eq. 1.5 constants
    # (alpha_N 0.076, alpha_D 0.095, N_c 8.8e13, D_c 5.4e13) and N_opt = 1.3e9 (C / PF-day)^0.73 (Eq. 6.1).
    "kaplan2020": KaplanLaw("kaplan2020", alpha_n=0.076, alpha_d=0.095, n_c=8.8e13, d_c=5.4e13,
                            n_coef=1.3e9, n_exp=0.73, citation="Kaplan et al. 2020, arXiv:2001.08361"),
}


def law_from_dict(data: dict, name: str = "fit"):
    """A law from its JSON form: ``{"form": "chinchilla", "E", "A", "B", "alpha", "beta", ...}``."""
    form = data.get("form", "chinchilla")
    try:
        if form == "chinchilla":
            return ChinchillaLaw(name=data.get("name", name), E=float(data["E"]), A=float(data["A"]),
                                 B=float(data["B"]), alpha=float(data["alpha"]), beta=float(data["beta"]),
                                 citation=data.get("citation", ""))
        if form == "kaplan":
            fields = ("alpha_n", "alpha_d", "n_c", "d_c", "n_coef", "n_exp")
            return KaplanLaw(name=data.get("name", name), citation=data.get("citation", ""),
                             **{f: float(data[f]) for f in fields})
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"law {name}: missing or bad field {exc}") from None
    raise UserError(f"law {name}: unknown form {form!r} (chinchilla or kaplan)")


def load_law(name_or_path: str):
    """A published law by name, or the law in a fit file written by ``medscale fit --out FILE``.

    A fit file is JSON whose key ``"law"`` holds the law's parameters (``law_from_dict``'s form)."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    if not name_or_path.endswith(".json") and "/" not in name_or_path:
        raise UserError(f"unknown law {name_or_path!r}; use one of {', '.join(PUBLISHED)} or a fit file (.json)")
    try:
        with open(name_or_path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"law file {name_or_path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"law file {name_or_path} does not parse as JSON ({exc}); write it with medscale fit --out") from None
    law = data.get("law") if isinstance(data, dict) else None
    if not isinstance(law, dict):
        raise UserError(f"law file {name_or_path} has no 'law' object; write it with medscale fit --out")
    out = law_from_dict(law, name=law.get("name", name_or_path))
    for v in (getattr(out, f.name) for f in dataclasses.fields(out) if f.name not in ("name", "citation")):
        if not math.isfinite(v):
            raise UserError(f"law file {name_or_path}: non-finite parameter")
    return out


N_CONVENTIONS = ("total", "non_embedding")
# which parameter count each published law's N means (laws.py's docstring)
PUBLISHED_CONVENTION = {"chinchilla": "total", "chinchilla-rounded": "total", "epoch2024": "total",
                        "kaplan2020": "non_embedding"}


def load_law_with_convention(name_or_path: str):
    """``(law, n_convention)``: a published law or a fit file, and which parameter count its N means.

    A fit file may say ``"n_convention": "total" | "non_embedding"`` in its ``law`` object or at the top
    level; without it, ``non_embedding`` (the project's fits use non-embedding parameters by default)."""
    law = load_law(name_or_path)
    if name_or_path in PUBLISHED_CONVENTION:
        return law, PUBLISHED_CONVENTION[name_or_path]
    with open(name_or_path) as fh:  # load_law has parsed it already
        data = json.load(fh)
    conv = data["law"].get("n_convention", data.get("n_convention", "non_embedding"))
    if conv not in N_CONVENTIONS:
        raise UserError(f"law file {name_or_path}: n_convention must be one of {', '.join(N_CONVENTIONS)}, "
                        f"not {conv!r}")
    return law, conv
