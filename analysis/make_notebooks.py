"""Build the analysis notebooks (scaling_curves, isoflop, seqlen) from this script, so they are reproducible.

    python analysis/make_notebooks.py            # writes analysis/*.ipynb (no outputs)

Each notebook reads its results folder from the environment:
    MEDSCALE_RESULTS   a sweep folder (default: the committed reference sweep, results/reference)
    MEDSCALE_BOOTSTRAP bootstrap refits for the intervals (default 200; the tests use a few)
and runs headless:
    MEDSCALE_RESULTS=results/my_sweep jupyter nbconvert --to notebook --execute analysis/isoflop.ipynb
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

_SETUP = '''\
import os
import sys

REPO = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "analysis" \\
    else os.getcwd()
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # medscale importable without installing it
RESULTS = os.environ.get("MEDSCALE_RESULTS") or os.path.join(REPO, "results", "reference")
BOOTSTRAP = int(os.environ.get("MEDSCALE_BOOTSTRAP", "200"))
SEED = 0

%matplotlib inline
{imports}
from IPython.display import display

from medscale.analysis import plots, report

runs, curves = report.load_runs(RESULTS)  # the registry's table (all runs) and eval curves
points, fit_curves, _ = report.fit_points(RESULTS, runs, curves)  # what medscale fit fits
done = plots.done_runs(runs)
k = report.figure_model(runs)  # how the law meets the compute axis: the runs own FLOPs/token, then the ladder
print(f"{RESULTS}: {len(runs)} runs, {len(done)} finished; compute model: {k.label}")'''


def setup(imports: str) -> str:
    return _SETUP.replace("{imports}", imports)


def _show(expr: str) -> str:
    return f"fig = {expr}\ndisplay(fig)\nplots._plt().close(fig)"


def scaling_curves():
    cells = [
        new_markdown_cell(
            "# Scaling curves\n\n"
            "Loss against compute for every run, the empirical compute-optimal frontier, the fitted law "
            "L(N, D) = E + A/N^α + B/D^β (Approach 3, the same `fit_all` as `medscale fit`), per-modality laws, "
            "the law's residuals and task metrics.\n\n"
            "Conventions: N non-embedding parameters, D tokens (encoder + decoder), C model FLOPs; "
            "1 PF-day = 8.64e19 FLOPs. Parameters: `MEDSCALE_RESULTS` (a sweep folder), `MEDSCALE_BOOTSTRAP`."),
        new_code_cell(setup('import numpy as np\nimport pandas as pd')),
        new_code_cell('cols = [c for c in ("run_id", "size", "params", "tokens", "flops", "pf_days", "enc_len", '
                      '"dec_len", "loss", "status") if c in runs.columns]\n'
                      'runs.sort_values("flops")[cols]'),
        new_markdown_cell("## The fitted law (Approach 3) with bootstrap intervals"),
        new_code_cell(
            "from medscale.analysis.fitting import fit_all\n\n"
            "approaches = report.default_approaches(points, fit_curves)\n"
            "fit = report.run_fit(fit_all, points, fit_curves, approaches=approaches, bootstrap=BOOTSTRAP, seed=SEED)\n"
            "law = report.fitted_law(fit)\n"
            "draws = report.bootstrap_laws(fit) or report.reproduce_draws(fit, points, seed=SEED)\n"
            "print('approaches', approaches, '; warnings:', fit.get('warnings'))\n"
            "p = fit['approach3']\n"
            "ci = p.get('ci') or {}\n"
            "pd.DataFrame({key: {'value': p[key], 'low': (ci.get(key) or [None, None])[0],\n"
            "                    'high': (ci.get(key) or [None, None])[1]}\n"
            "              for key in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')}).T"),
        new_code_cell(_show("plots.plot_loss_vs_compute(runs, law=law, curves=curves, k=k)")),
        new_markdown_cell("## Per-modality laws\n\nThe same fit on each modality's eval loss."),
        new_code_cell(
            "modality_laws = {}\n"
            "for col in plots.modality_columns(done):\n"
            "    mfit = report.run_fit(fit_all, report.modality_points(runs, col), None, approaches=('3',), bootstrap=0, seed=SEED)\n"
            "    modality_laws[col.split('/', 1)[1]] = report.fitted_law(mfit)\n"
            "pd.DataFrame({m: {'E': g.E, 'A': g.A, 'B': g.B, 'alpha': g.alpha, 'beta': g.beta, 'a': g.a, 'b': g.b}\n"
            "              for m, g in modality_laws.items() if g is not None}).T"),
        new_code_cell("if modality_laws:\n    " + _show("plots.plot_loss_by_modality(runs, laws=modality_laws, k=k)")
                      .replace("\n", "\n    ")),
        new_markdown_cell("## Residuals of the fitted law"),
        new_code_cell("r = plots.residuals(runs, law)\n"
                      "print(f'RMS of log residuals {np.sqrt(np.mean(r ** 2)):.4f}, max |r| {np.max(np.abs(r)):.4f}')\n"
                      + _show("plots.plot_residuals(runs, law)")),
        new_markdown_cell("## Task metrics vs compute (when the runs were evaluated)"),
        new_code_cell("tm = plots.task_metric_table(runs)\n"
                      "if len(tm.columns):\n    " + _show("plots.plot_task_metrics(runs)").replace("\n", "\n    ")
                      + "\nelse:\n    print('no task metrics in these runs (medscale evaluate adds them)')"),
    ]
    return cells


def isoflop():
    cells = [
        new_markdown_cell(
            "# IsoFLOP analysis\n\n"
            "Loss against model size at fixed compute (the sweep's IsoFLOP budgets), the minimum of a parabola in "
            "log N per budget (Approach 2's raw material; the parabola's minimum is biased when the curve is "
            "asymmetric), and the compute-optimal N and D against compute from Approaches 1-3 with the bootstrap "
            "band, next to Kaplan 2020, Chinchilla 2022 and Epoch 2024 (their C = 6ND convention)."),
        new_code_cell(setup('import pandas as pd')),
        new_code_cell(
            "from medscale.analysis.fitting import fit_all\n\n"
            "approaches = report.default_approaches(points, fit_curves)\n"
            "fit = report.run_fit(fit_all, points, fit_curves, approaches=approaches, bootstrap=BOOTSTRAP, seed=SEED)\n"
            "law = report.fitted_law(fit)\n"
            "draws = report.bootstrap_laws(fit) or report.reproduce_draws(fit, points, seed=SEED)\n"
            "minima = plots.isoflop_minima(runs)\n"
            "pd.DataFrame(minima, columns=['C (FLOPs)', 'N at parabola minimum', 'loss at minimum', 'runs', 'D there'])"),
        new_code_cell(_show("plots.plot_isoflop(runs, law=law, k=k)")),
        new_code_cell(
            "power = {}\n"
            "for name in ('approach2', 'approach1'):\n"
            "    pa = report.power_allocation(fit.get(name))\n"
            "    if pa is not None:\n"
            "        power[name.replace('approach', 'Approach ')] = pa\n"
            + _show("plots.plot_allocation(runs, law=law, draws=draws, k=k, power_laws=power, extend_to=1e21)")),
        new_markdown_cell("## N_opt at a few budgets, by approach and published law"),
        new_code_cell(
            "budgets = [1e18, 1e19, 1e20, 1e21]\n"
            "table = {}\n"
            "table['Approach 3'] = [float(k.optimum(law, c)[0]) for c in budgets]\n"
            "for label, (kn, a, kd, b) in power.items():\n"
            "    table[label] = [kn * c ** a for c in budgets]\n"
            "for name in plots.PUBLISHED_OVERLAY:\n"
            "    table[name + ' (C=6ND)'] = [float(plots.PUBLISHED[name].n_opt(c)) for c in budgets]\n"
            "pd.DataFrame(table, index=[f'{c:.0e} FLOPs ({c / plots.PF_DAY:.3g} PF-days)' for c in budgets]).T"),
    ]
    return cells


def seqlen():
    cells = [
        new_markdown_cell(
            "# Sequence length\n\n"
            "What a longer sequence (encoder + decoder tokens per example) buys and costs: loss at the same size "
            "and tokens, FLOPs per token (attention grows with length), and loss against compute by length."),
        new_code_cell(setup('')),
        new_code_cell(
            "d = done.copy()\n"
            "d['seq_len'] = d['enc_len'].astype(float) + d['dec_len'].astype(float)\n"
            "d['flops_per_token'] = d['flops'].astype(float) / d['tokens'].astype(float)\n"
            "d['flops_per_token_per_param'] = d['flops_per_token'] / d['params'].astype(float)\n"
            "print('sequence lengths in these runs:', sorted(d['seq_len'].unique()))\n"
            "d.groupby('seq_len')[['flops_per_token_per_param']].median()"),
        new_markdown_cell("## Loss at the same size and tokens, by sequence length"),
        new_code_cell(
            "d['tokens_r'] = d['tokens'].astype(float).round(-3)\n"
            "groups = d.groupby(['params', 'tokens_r']).filter(lambda g: g['seq_len'].nunique() > 1)\n"
            "if len(groups):\n"
            "    display(groups.pivot_table(index=['params', 'tokens_r'], columns='seq_len', values='loss'))\n"
            "else:\n"
            "    print('no (size, tokens) pair was trained at more than one sequence length')"),
        new_code_cell(_show("plots.plot_loss_vs_seqlen(runs)")),
    ]
    return cells


NOTEBOOKS = {"scaling_curves": scaling_curves, "isoflop": isoflop, "seqlen": seqlen}


def build(out_dir: str = HERE) -> list[str]:
    paths = []
    for name, make in NOTEBOOKS.items():
        cells = make()
        for i, cell in enumerate(cells):
            cell["id"] = f"{name}-{i}"  # stable ids: the same script writes the same file
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        path = os.path.join(out_dir, f"{name}.ipynb")
        tmp = path + ".tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(p)
