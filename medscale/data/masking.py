"""4M token budgets on the host (numpy, seeded): tokenised examples -> fixed-shape batches (``batch.py``).

Per example:

1. a mixture component is drawn (``data.mixture``, e.g. ``all2all:0.5,image2all:0.5``). ``all2all``: every
   present modality may be input and target; ``X2all`` (``image2all``, ``caption2all``, ...): only ``X`` is input,
   every other present modality is a target;
2. input weights and target weights are drawn from a symmetric Dirichlet(``alpha``) over the eligible
   modalities; the budgets are ``floor(w * enc_len)`` and ``floor(w * dec_len)``;
3. sequences (caption, boxes): input only -> the first tokens; target only -> tokens + ``</s>``; both -> span
   masking (T5/4M): a fraction ``b / (a + b)`` of the tokens, in spans of mean length 3, is replaced in the input
   by sentinels ``<S0> <S1> ...``; the target is ``<S0> span0 <S1> span1 ... </s>``. Input and target are cut to
   their budgets;
4. image-like modalities (image, segmentation) fill the rest: their shares of what the sequences left, input
   and target patches drawn disjoint from one random permutation (targets never among inputs); room left on
   either side is then given to image-like modalities that still have unused patches;
5. whatever budget finds no tokens (few tokens in the example, or none eligible) is padding (valid False).

``enc_caps`` (``data.enc_split``: one number per modality, summing to ``enc_len``) caps each modality's input
tokens: a sequence's input budget is at most its cap, an image-like modality's inputs (its share and the leftover
room) too. A per-modality encoder needs it (each modality's stack has a fixed number of places); a unified
encoder given the same caps sees exactly the same batches.

Roles (``roles``, from the registry): an input-only modality is never a target, a target-only one never an
input. ``given`` ties a target-only modality to an input-only one (the answer to its question): whenever the
target gets a budget, the given modality goes into the encoder whole (its tokens are taken off the encoder
budget before the Dirichlet shares are made), and it takes no share of its own.

Token ids are local to their modality. Decoder tokens of a modality are contiguous, sequences in order; the
decoder input of a sequence target is the previous target token (``START`` at its first position).
"""

from __future__ import annotations

import numpy as np

from medscale.errors import UserError

START, EOS = 2, 3


def parse_mixture(text: str, names: tuple[str, ...]) -> list[tuple[str | None, float]]:
    """``"all2all:0.5,image2all:0.5"`` -> [(None, 0.5), ("image", 0.5)] (None: all to all)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"data.mixture {text!r}: weight {w!r} is not a number") from None
        if weight < 0:
            raise UserError(f"data.mixture {text!r}: weights must be >= 0")
        if not name.endswith("2all"):
            raise UserError(f"data.mixture component {name!r}: write all2all or <modality>2all")
        src = name[: -len("2all")]
        if src == "all":
            out.append((None, weight))
        elif src in names:
            out.append((src, weight))
        else:
            raise UserError(f"data.mixture component {name!r}: unknown modality {src!r}; known: {', '.join(names)}")
    if not out or sum(w for _, w in out) <= 0:
        raise UserError(f"data.mixture {text!r}: give at least one component with a positive weight")
    return out


class Masker:
    """Builds batches from tokenised examples. Every position is below its modality's ``max_tokens``
    (a sequence target that would not fit is cut; the token caches keep sequences to ``max_tokens - 1`` tokens
    so that a whole sequence and its ``</s>`` fit).

    ``modalities``: list of ``(name, kind, max_tokens)`` in the model's modality order. Examples come as a dict
    of batched arrays: for an image-like modality ``name`` -> int [B, max_tokens] and ``name + "_len"`` -> [B]
    (max_tokens, or 0 when absent); for a sequence ``name`` -> int [B, max_tokens] (padded) and
    ``name + "_len"`` -> [B] (tokens before padding, no ``</s>``).
    """

    def __init__(self, modalities, enc_len: int, dec_len: int, alpha: float = 0.5,
                 mixture: str = "all2all:1", num_sentinels: int = 16, sentinel_base: int = 4,
                 mean_span: float = 3.0, enc_caps=None, roles: dict | None = None, given: dict | None = None):
        self.mods = [(str(n), str(k), int(t)) for n, k, t in modalities]
        self.names = tuple(n for n, _, _ in self.mods)
        self.enc_len, self.dec_len = int(enc_len), int(dec_len)
        if alpha <= 0:
            raise UserError(f"data.dirichlet_alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.mixture = parse_mixture(mixture, self.names)
        self.num_sentinels, self.sentinel_base = int(num_sentinels), int(sentinel_base)
        self.mean_span = float(mean_span)
        self.caps = [int(c) for c in enc_caps] if enc_caps else [self.enc_len] * len(self.mods)
        if len(self.caps) != len(self.mods):
            raise UserError(f"data.enc_split {tuple(enc_caps)} needs one number per modality ({', '.join(self.names)})")
        roles = dict(roles or {})
        self.can_in = np.array([roles.get(n, "both") != "target" for n in self.names])
        self.can_out = np.array([roles.get(n, "both") != "input" for n in self.names])
        self.ties = [(self.names.index(t), self.names.index(q)) for t, q in (given or {}).items()
                     if t in self.names and q in self.names]
        self.dirichlet_in = self.can_in.copy()  # a tied input takes no share: it is given whole with its target
        for _, q in self.ties:
            self.dirichlet_in[q] = False
        for src, _ in self.mixture:
            if src is not None and not self.can_in[self.names.index(src)]:
                raise UserError(f"data.mixture component {src}2all: {src} is never an input (a target-only "
                                "modality); drop it from data.mixture")

    # ------------------------------------------------------------------ helpers
    def _empty(self, B: int) -> dict:
        z = {}
        for side, L in (("enc", self.enc_len), ("dec", self.dec_len)):
            keys = ("tokens", "modality", "pos") if side == "enc" else ("input", "target", "modality", "pos")
            for k in keys:
                z[f"{side}_{k}"] = np.zeros((B, L), np.int32)
            z[f"{side}_valid"] = np.zeros((B, L), np.bool_)
        z["dec_causal"] = np.zeros((B, self.dec_len), np.bool_)
        return z

    def _spans(self, rng, n: int, k: int, s: int):
        """Lengths of s masked spans (sum k, each >= 1) and s+1 unmasked gaps (sum n-k, inner ones >= 1)."""
        cuts = np.sort(rng.permutation(k - 1)[: s - 1] + 1) if s > 1 else np.array([], int)
        masked = np.diff(np.concatenate([[0], cuts, [k]]))
        free = n - k - (s - 1)  # after giving each inner gap one token
        bins = rng.multinomial(free, np.ones(s + 1) / (s + 1)) if free > 0 else np.zeros(s + 1, int)
        gaps = bins + np.concatenate([[0], np.ones(s - 1, int), [0]])
        return masked, gaps

    def span_sizes(self, n: int, a: int, b: int) -> tuple[int, int]:
        """(masked tokens k, spans s) of span masking a sequence of ``n >= 2`` tokens under budgets a, b > 0."""
        k = min(max(round(n * b / (a + b)), 1), n - 1)
        return k, min(max(round(k / self.mean_span), 1), k, self.num_sentinels, n - k + 1)

    def _sequence(self, rng, x: np.ndarray, a: int, b: int):
        """Input and target token lists of one sequence under budgets a (input), b (target)."""
        n = len(x)
        if b > 0 and (a == 0 or n < 2):
            return [], (x.tolist() + [EOS])[:b]
        if b == 0:
            return x[:a], []
        k, s = self.span_sizes(n, a, b)
        masked, gaps = (v.tolist() for v in self._spans(rng, n, k, s))
        x = x.tolist()
        inp, tgt, p = [], [], 0
        for i in range(s):
            inp.extend(x[p:p + gaps[i]])
            p += gaps[i]
            inp.append(self.sentinel_base + i)
            tgt.append(self.sentinel_base + i)
            tgt.extend(x[p:p + masked[i]])
            p += masked[i]
        inp.extend(x[p:])
        tgt.append(EOS)
        return inp[:a], tgt[:b]

    # ------------------------------------------------------------------ main entry
    def __call__(self, ex: dict, rng: np.random.Generator, budgets: list | None = None) -> dict:
        """A batch of the examples ``ex``. ``budgets``, when given a list, receives per example ``{sequence
        name: (input budget, target budget)}`` (0: not an input / not a target; the input budget before it is
        cut to the sequence's length) of its present sequences: what ``medscale.data.entropy`` needs to bound
        the loss of the batch's sequence targets."""
        M = len(self.mods)
        B = int(np.asarray(ex[self.names[0] + "_len"]).shape[0])
        lens = np.stack([np.asarray(ex[n + "_len"]).astype(np.int64) for n in self.names], 1)  # [B, M]
        present = lens > 0
        # mixture component per example -> eligible inputs / targets (vectorised over the batch)
        probs = np.array([w for _, w in self.mixture], float)
        comps = rng.choice(len(self.mixture), size=B, p=probs / probs.sum())
        src = np.array([-1 if s is None else self.names.index(s) for s, _ in self.mixture])[comps]
        onehot = np.eye(M, dtype=bool)[np.maximum(src, 0)]
        has_src = (src >= 0) & (present & onehot).any(1)
        others = present & ~onehot
        in_c = np.where(has_src[:, None], onehot, present) & self.dirichlet_in
        out_c = np.where((has_src & others.any(1))[:, None], others, present) & self.can_out
        # Dirichlet weights (normalised gamma draws) and budgets
        w_in = rng.gamma(self.alpha, size=(B, M)) * in_c + 1e-12 * in_c
        w_out = rng.gamma(self.alpha, size=(B, M)) * out_c + 1e-12 * out_c
        w_in /= np.maximum(w_in.sum(1, keepdims=True), 1e-30)
        w_out /= np.maximum(w_out.sum(1, keepdims=True), 1e-30)
        b_all = np.floor(w_out * self.dec_len).astype(np.int64)
        reserve = np.zeros(B, np.int64)
        given = []
        for t, q in self.ties:  # the given input goes in whole wherever its target has a budget
            active = out_c[:, t] & (b_all[:, t] > 0) & present[:, q]
            n_q = np.where(active, np.minimum(lens[:, q], self.mods[q][2]), 0)
            reserve += n_q
            given.append((q, active, n_q))
        a_all = np.floor(w_in * np.maximum(self.enc_len - reserve, 0)[:, None]).astype(np.int64)
        for q, active, n_q in given:
            in_c[:, q] |= active
            a_all[:, q] = np.where(active, n_q, a_all[:, q])
        # an independent random patch order per example and image-like modality
        orders = {m: np.argsort(rng.random((B, n)), axis=1, kind="stable")
                  for m, (_, kind, n) in enumerate(self.mods) if kind == "image"}
        out = self._empty(B)
        L, I, O, WI, WO, A, Bb = (x.tolist() for x in (lens, in_c, out_c, w_in, w_out, a_all, b_all))
        for i in range(B):
            rec = {} if budgets is not None else None
            self._one(ex, i, L[i], I[i], O[i], WI[i], WO[i], A[i], Bb[i], orders, rng, out, rec)
            if rec is not None:
                budgets.append(rec)
        return out

    def _one(self, ex, i, lens, in_c, out_c, w_in, w_out, a_all, b_all, orders, rng, out, rec=None):
        enc_parts, dec_parts = {}, {}
        used_in = used_out = 0
        for m, (name, kind, maxt) in enumerate(self.mods):
            if kind != "sequence" or lens[m] == 0:
                continue
            x = ex[name][i][: min(lens[m], maxt)]
            a = min(a_all[m], len(x), self.caps[m]) if in_c[m] else 0
            b = min(b_all[m], maxt) if out_c[m] else 0  # positions stay below max_tokens
            if rec is not None:
                rec[name] = (int(min(a_all[m], self.caps[m])) if in_c[m] else 0, int(b))
            inp, tgt = self._sequence(rng, x, a, b)
            if len(inp):
                enc_parts[m] = (np.asarray(inp, np.int32), np.arange(len(inp)))
                used_in += len(inp)
            if len(tgt):
                dec_parts[m] = np.asarray(tgt, np.int32)
                used_out += len(tgt)
        img = [m for m in orders if lens[m] > 0]
        if img:
            r_in, r_out = self.enc_len - used_in, self.dec_len - used_out
            wi, wo = sum(w_in[m] for m in img), sum(w_out[m] for m in img)
            c_in = [min(int(r_in * w_in[m] / wi), self.caps[m]) if wi > 0 else 0 for m in img]
            c_out = [int(r_out * w_out[m] / wo) if wo > 0 else 0 for m in img]
            n = [lens[m] for m in img]
            for j in range(len(img)):
                if c_in[j] + c_out[j] > n[j]:
                    ci = round(n[j] * c_in[j] / (c_in[j] + c_out[j]))
                    c_in[j], c_out[j] = ci, n[j] - ci
            for j, m in enumerate(img):  # give leftover room to modalities with unused patches
                if in_c[m]:
                    c_in[j] += max(0, min(r_in - sum(c_in), n[j] - c_in[j] - c_out[j], self.caps[m] - c_in[j]))
            for j, m in enumerate(img):
                if out_c[m]:
                    c_out[j] += max(0, min(r_out - sum(c_out), n[j] - c_in[j] - c_out[j]))
            for j, m in enumerate(img):
                order = orders[m][i]
                toks = ex[self.mods[m][0]][i]
                if c_in[j]:
                    pos = np.sort(order[: c_in[j]])
                    enc_parts[m] = (toks[pos].astype(np.int32), pos)
                if c_out[j]:
                    pos = np.sort(order[c_in[j]: c_in[j] + c_out[j]])
                    dec_parts[m] = (toks[pos].astype(np.int32), pos)
        self._write(out, i, enc_parts, dec_parts)

    def _write(self, out, i, enc_parts, dec_parts):
        p = 0
        for m in sorted(enc_parts):
            toks, pos = enc_parts[m]
            L = min(len(toks), self.enc_len - p)
            out["enc_tokens"][i, p:p + L] = toks[:L]
            out["enc_modality"][i, p:p + L] = m
            out["enc_pos"][i, p:p + L] = pos[:L]
            out["enc_valid"][i, p:p + L] = True
            p += L
        p = 0
        for m in sorted(dec_parts):
            part = dec_parts[m]
            L0 = len(part[0]) if isinstance(part, tuple) else len(part)
            L = min(L0, self.dec_len - p)
            sl = slice(p, p + L)
            out["dec_modality"][i, sl] = m
            out["dec_valid"][i, sl] = True
            if isinstance(part, tuple):  # image-like
                out["dec_target"][i, sl] = part[0][:L]
                out["dec_pos"][i, sl] = part[1][:L]
            else:
                out["dec_target"][i, sl] = part[:L]
                out["dec_pos"][i, sl] = np.arange(L)
                out["dec_input"][i, sl] = np.concatenate([[START], part[: L - 1]])
                out["dec_causal"][i, sl] = True
            p += L

    def task(self, ex: dict, inputs, targets) -> dict:
        """Deterministic batch for generation/evaluation: every token of the ``inputs`` modalities in the
        encoder (cut to enc_len), every token of the ``targets`` (sequences + ``</s>``) in the decoder."""
        for n in list(inputs) + list(targets):
            if n not in self.names:
                raise UserError(f"unknown modality {n!r}; known: {', '.join(self.names)}")
        B = int(np.asarray(ex[self.names[0] + "_len"]).shape[0])
        out = self._empty(B)
        for i in range(B):
            enc_parts, dec_parts = {}, {}
            for m, (name, kind, maxt) in enumerate(self.mods):
                n = min(int(np.asarray(ex[name + "_len"])[i]), maxt)
                toks = np.asarray(ex[name][i][:n], np.int32)
                if name in inputs and n and self.caps[m]:
                    k = min(n, self.caps[m])
                    enc_parts[m] = (toks[:k], np.arange(k))
                if name in targets and (n or kind == "sequence"):
                    dec_parts[m] = (toks, np.arange(n)) if kind == "image" else \
                        np.concatenate([toks, [EOS]]).astype(np.int32)[:maxt]
            self._write(out, i, enc_parts, dec_parts)
        return out


def refit_inputs(batch: dict, enc_len: int, kinds, rng: np.random.Generator, whole=()) -> dict:
    """The same batch with its encoder side refitted to ``enc_len`` tokens; the decoder side (the targets) is
    kept exactly. This is the length-independent evaluation's input rule (docs/longseq.md, "Sequence length as
    a variable"): one fixed masking of the eval set drawn at a reference length, scored at every encoder length
    on the same targets, with as much of the same inputs as the encoder holds.

    Per example, when its valid inputs exceed ``enc_len``, each modality's block keeps a share proportional to
    its size (largest remainder): image-like blocks (``kinds[m] == "image"``) a random subset of their patches
    (one permutation per block, drawn whether or not it is cut, so the subsets of one example at different
    lengths are nested whenever the shares grow), sequence blocks their first tokens (the masker's own cut).
    When they fit, every input is kept and the rest is padding. ``kinds``: per modality index, its kind.
    ``whole``: modality indices kept whole before the others share what is left (a question given with its
    answer target, as the masker gives it)."""
    L = int(enc_len)
    B = batch["enc_tokens"].shape[0]
    out = {k: v for k, v in batch.items() if not k.startswith("enc_")}
    for k in ("enc_tokens", "enc_modality", "enc_pos"):
        out[k] = np.zeros((B, L), np.int32)
    out["enc_valid"] = np.zeros((B, L), np.bool_)
    for i in range(B):
        valid = np.flatnonzero(batch["enc_valid"][i])
        mods = batch["enc_modality"][i][valid]
        blocks = [(int(m), valid[mods == m]) for m in np.unique(mods)]
        perms = [rng.permutation(len(ix)) if kinds[m] == "image" else None for m, ix in blocks]
        n = np.array([len(ix) for _, ix in blocks], np.int64)
        total = int(n.sum())
        if total <= L:
            quota = n
        else:
            fixed = np.array([m in whole for m, _ in blocks], bool)
            quota = np.where(fixed, np.minimum(n, L), 0).astype(np.int64)
            room, share = L - int(quota.sum()), np.where(fixed, 0, n)
            if room > 0 and share.sum() > 0:
                exact = room * share / share.sum()
                cut = np.floor(exact).astype(np.int64)
                frac = exact - cut
                for j in np.argsort(-frac, kind="stable")[: room - int(cut.sum())]:
                    cut[j] += 1
                quota = quota + cut
        keep = []
        for (m, ix), perm, q in zip(blocks, perms, quota.tolist()):
            keep.append(ix[np.sort(perm[:q])] if perm is not None else ix[:q])
        keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        k = len(keep)
        for key in ("enc_tokens", "enc_modality", "enc_pos", "enc_valid"):
            out[key][i, :k] = batch[key][i][keep]
    return out
