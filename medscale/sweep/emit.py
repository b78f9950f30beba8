"""Cluster launchers for a sweep: a SLURM array script or Kubernetes Job manifests.

Both run, per run, exactly the command the local launcher runs: ``python -m medscale train --config BASE
--set ... --workdir RESULTS/<sweep>/<run_id>``, after writing the run's ``sweep.json`` (atomically) and
skipping runs whose ``summary.json`` already exists; a retried job resumes from the run's checkpoints in
its directory on the shared results volume.

Kubernetes manifests suit OpenShift's restricted security context: no fixed user id (the platform assigns
one), ``runAsNonRoot``, no privilege escalation, all capabilities dropped, the runtime's default seccomp
profile, ``HOME`` on a writable ``/tmp``; GPUs requested as ``nvidia.com/gpu``; results on a
ReadWriteMany PersistentVolumeClaim (``pvc.yaml`` creates one if the cluster has none).
"""

from __future__ import annotations

import json
import os
import re
import shlex

from medscale import rundir
from medscale.errors import UserError
from medscale.sweep.design import Run

TARGETS = ("slurm", "kubernetes")


def _plan_json(run: Run) -> str:
    return json.dumps(run.plan(), sort_keys=True)


def _train_args(run: Run, workdir_expr: str, extra_sets: tuple[str, ...]) -> str:
    """Shell words of ``train ... --workdir "<expr>"`` (``workdir_expr`` is left for the shell to expand)."""
    argv = ["train", "--config", run.base]
    for item in [*run.overrides, *extra_sets]:
        argv += ["--set", item]
    return " ".join(shlex.quote(a) for a in argv) + f' --workdir "{workdir_expr}" --quiet'


def _run_script(run: Run, results: str, extra_sets: tuple[str, ...], python: str) -> str:
    """The shell lines that train one run (shared by both targets)."""
    plan = _plan_json(run)
    return "\n".join([
        f'DIR="${{MEDSCALE_RESULTS:-{results}}}/{run.sweep}/{run.run_id}"',
        f'if [ -f "$DIR/summary.json" ]; then echo "{run.run_id}: already finished"; exit 0; fi',
        'mkdir -p "$DIR"',
        f'printf "%s\\n" {shlex.quote(plan)} > "$DIR/sweep.json.tmp" && mv "$DIR/sweep.json.tmp" "$DIR/sweep.json"',
        f"exec {python} -m medscale {_train_args(run, '$DIR', extra_sets)}",
    ])


def emit_slurm(runs: list[Run], out: str, *, results: str = "results", gpus: int = 1, cpus: int = 8,
               mem: str = "64G", time: str = "2-00:00:00", partition: str | None = None,
               max_parallel: int | None = None, setup: str = "", python: str = "python",
               extra_sets: tuple[str, ...] = ()) -> list[str]:
    """Write ``<out>/<sweep>.sbatch`` (one array task per run, task i = run i of ``runs.tsv``)."""
    sweep = runs[0].sweep
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=medscale-{sweep}", f"#SBATCH --array={array}",
             f"#SBATCH --gres=gpu:{gpus}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}", f"#SBATCH --time={time}",
             f"#SBATCH --output=medscale-{sweep}-%A_%a.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["# Submit from the repository root: sbatch " + f"{sweep}.sbatch",
              "# Runs whose summary.json exists are skipped; a resubmitted run resumes from its checkpoints.",
              "set -euo pipefail"]
    if setup:
        lines += setup.splitlines()
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    for i, run in enumerate(runs):
        body = _run_script(run, results, extra_sets, python)
        lines.append(f"  {i})  # {run.run_id}")
        lines += ["    " + ln for ln in body.splitlines()]
        lines.append("    ;;")
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    path = os.path.join(out, f"{sweep}.sbatch")
    _write(path, "\n".join(lines))
    return [path, _write_index(runs, out)]


def k8s_name(sweep: str, run_id: str) -> str:
    """A DNS-1123 Job name (<= 63 chars) unique per run: the sweep, the readable prefix, the hash."""
    clean = re.sub(r"[^a-z0-9-]+", "-", f"ms-{sweep}-{run_id}".lower()).strip("-")
    clean = re.sub(r"-+", "-", clean)
    if len(clean) > 63:
        clean = clean[:54].rstrip("-") + "-" + run_id[-8:].lower()
    return clean


def emit_kubernetes(runs: list[Run], out: str, *, image: str = "medscale:latest", results: str = "/results",
                    pvc: str = "medscale-results", gpus: int = 1, cpus: int = 8, mem: str = "64Gi",
                    namespace: str | None = None, backoff_limit: int = 3, storage: str = "100Gi",
                    python: str = "python", extra_sets: tuple[str, ...] = ()) -> list[str]:
    """Write ``<out>/jobs.yaml`` (one Job per run), ``<out>/pvc.yaml`` and ``<out>/runs.tsv``."""
    import yaml

    sweep = runs[0].sweep
    docs = []
    for run in runs:
        name = k8s_name(sweep, run.run_id)
        labels = {"app.kubernetes.io/name": "medscale", "app.kubernetes.io/component": "train",
                  "medscale/sweep": re.sub(r"[^A-Za-z0-9_.-]", "-", sweep)[:63]}
        meta = {"name": name, "labels": labels, "annotations": {"medscale/run-id": run.run_id}}
        if namespace:
            meta["namespace"] = namespace
        script = "set -eu\n" + _run_script(run, results, extra_sets, python)
        resources = {"limits": {"nvidia.com/gpu": gpus, "memory": mem},
                     "requests": {"nvidia.com/gpu": gpus, "cpu": str(cpus), "memory": mem}}
        container = {
            "name": "train", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["/bin/sh", "-c", script],
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MEDSCALE_RESULTS", "value": results},
                    {"name": "PYTHONUNBUFFERED", "value": "1"}],
            "resources": resources,
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "results", "mountPath": results}, {"name": "dshm", "mountPath": "/dev/shm"},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }
        pod = {"restartPolicy": "Never",
               "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
               "containers": [container],
               "volumes": [{"name": "results", "persistentVolumeClaim": {"claimName": pvc}},
                           {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                           {"name": "tmp", "emptyDir": {}}]}
        docs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                     "spec": {"backoffLimit": backoff_limit, "ttlSecondsAfterFinished": 7 * 86400,
                              "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}})
    jobs = os.path.join(out, "jobs.yaml")
    _write(jobs, "# medscale sweep " + sweep + f": {len(docs)} Jobs, one per run. kubectl apply -f jobs.yaml\n"
           + yaml.safe_dump_all(docs, sort_keys=False, width=1000))
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": pvc, **({"namespace": namespace} if namespace else {})},
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage}}}}
    pvc_path = os.path.join(out, "pvc.yaml")
    _write(pvc_path, "# the shared results volume (skip if your project has one)\n" + yaml.safe_dump(claim))
    return [jobs, pvc_path, _write_index(runs, out)]


def _write_index(runs: list[Run], out: str) -> str:
    lines = ["index\trun_id\tsize\tenc_len\tsteps\tmodel_flops\tbudget"]
    for i, r in enumerate(runs):
        lines.append(f"{i}\t{r.run_id}\t{r.size}\t{r.enc_len}\t{r.steps}\t{r.model_flops:.4g}\t"
                     f"{'' if r.budget is None else f'{r.budget:.4g}'}")
    path = os.path.join(out, "runs.tsv")
    _write(path, "\n".join(lines) + "\n")
    return path


def _write(path: str, text: str) -> None:
    rundir.write_text(path, text)
    if path.endswith(".sbatch"):
        os.chmod(path, 0o755)


def emit(runs: list[Run], target: str, out: str, **options) -> list[str]:
    if not runs:
        raise UserError("the sweep has no runs to emit")
    if target == "slurm":
        return emit_slurm(runs, out, **options)
    if target == "kubernetes":
        return emit_kubernetes(runs, out, **options)
    raise UserError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
