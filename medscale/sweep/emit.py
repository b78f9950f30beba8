"""Cluster launchers for a sweep: a SLURM array script or Kubernetes Job manifests.

Both run, per run, exactly the command the local launcher runs: ``python -m medscale train --config BASE
--set ... --workdir RESULTS/<sweep>/<run_id>``, after writing the run's ``sweep.json`` (atomically) and
skipping runs whose ``summary.json`` already exists; a retried job resumes from the run's checkpoints in
its directory on the shared results volume.

A run may span several nodes (``nodes > 1``) or several processes on one node (SLURM ``process_per="gpu"``):
its processes meet at a coordinator on the first node (``MEDSCALE_COORDINATOR=HOST:PORT``, with
``MEDSCALE_NUM_PROCESSES`` and ``MEDSCALE_PROCESS_ID``; ``medscale.model.sharding.distributed_settings``).
SLURM starts them with one ``srun`` per run; Kubernetes runs an Indexed Job (one pod per node, the process id
from the completion index) with a headless Service that gives pod 0 its DNS name.

Kubernetes manifests pass OpenShift's restricted security context constraints, old (``restricted``) and new
(``restricted-v2``): no fixed user or group id (the platform assigns one), ``runAsNonRoot``, no privilege
escalation, all capabilities dropped, every written path on a volume (``HOME`` and ``TMPDIR`` on an emptyDir
``/tmp``, results on a ReadWriteMany PersistentVolumeClaim that ``pvc.yaml`` creates if the cluster has none),
and a ``seccompProfile`` only when asked for (``seccomp="runtime-default"``; the restricted SCC before
OpenShift 4.11 refuses any). GPUs are requested as ``nvidia.com/gpu``.
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
PROCESS_PER = ("node", "gpu")
SECCOMP = ("none", "runtime-default")
ENTRY = ("-m", "medscale")  # what the jobs run: ``<python> -m medscale train ...`` (deploy/Containerfile)
MAX_NAME = 63  # a DNS-1123 label: Kubernetes object names and pod host names
_LABEL_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _plan_json(run: Run) -> str:
    return json.dumps(run.plan(), sort_keys=True)


def _train_args(run: Run, workdir_expr: str, extra_sets: tuple[str, ...]) -> str:
    """Shell words of ``train ... --workdir "<expr>"`` (``workdir_expr`` is left for the shell to expand)."""
    argv = ["train", "--config", run.base]
    for item in [*run.overrides, *extra_sets]:
        argv += ["--set", item]
    return " ".join(shlex.quote(a) for a in argv) + f' --workdir "{workdir_expr}" --quiet'


def _prepare_lines(run: Run, results: str, first_only: str | None = None) -> list[str]:
    """Shell lines: the run's folder in ``DIR``, exit if finished, write its ``sweep.json`` (by the process
    ``first_only`` names as 0, when given)."""
    plan = _plan_json(run)
    write = f'printf "%s\\n" {shlex.quote(plan)} > "$DIR/sweep.json.tmp" && mv "$DIR/sweep.json.tmp" "$DIR/sweep.json"'
    if first_only:
        write = f'if [ "{first_only}" = 0 ]; then {write}; fi'
    return [f'DIR="${{MEDSCALE_RESULTS:-{results}}}/{run.sweep}/{run.run_id}"',
            f'if [ -f "$DIR/summary.json" ]; then echo "{run.run_id}: already finished"; exit 0; fi',
            'mkdir -p "$DIR"', write]


def _run_script(run: Run, results: str, extra_sets: tuple[str, ...], python: str,
                first_only: str | None = None) -> str:
    """The shell lines that train one run in one process (both targets)."""
    return "\n".join([*_prepare_lines(run, results, first_only),
                      f"exec {python} {' '.join(ENTRY)} {_train_args(run, '$DIR', extra_sets)}"])


def check_layout(target: str, nodes: int, gpus: int, process_per: str, coordinator_port: int | None) -> int:
    """Processes per run for ``nodes`` x (1 or ``gpus``); a UserError for a combination that cannot run."""
    if nodes < 1:
        raise UserError(f"--nodes must be at least 1, not {nodes}")
    if process_per not in PROCESS_PER:
        raise UserError(f"--process-per must be one of {', '.join(PROCESS_PER)}, not {process_per!r}")
    if gpus < 0:
        raise UserError(f"--gpus-per-node must be 0 or more, not {gpus}")
    if process_per == "gpu":
        if target != "slurm":
            raise UserError("--process-per gpu is for --target slurm; a Kubernetes pod is one process per node")
        if gpus < 1:
            raise UserError("--process-per gpu needs --gpus-per-node 1 or more")
    processes = nodes * (gpus if process_per == "gpu" else 1)
    if processes > 1 and coordinator_port is None:
        raise UserError(f"--nodes {nodes} --process-per {process_per} starts {processes} processes that meet at a "
                        "coordinator on the first node: give --coordinator-port PORT (a free TCP port, 1024-65535)")
    if coordinator_port is not None and not 1024 <= coordinator_port <= 65535:
        raise UserError(f"--coordinator-port must be in 1024-65535, not {coordinator_port}")
    return processes


def check_name(name: str | None, room: int = 0) -> None:
    """``--name``: a DNS-1123 label that, with ``room`` characters appended, is at most 63 characters."""
    if name is None:
        return
    if not _LABEL_RE.fullmatch(name):
        raise UserError(f"--name {name!r}: use lower-case letters, digits and '-', starting with a letter and "
                        "not ending with '-'")
    if len(name) + room > MAX_NAME:
        extra = f" (with the {room} characters added for runs and pods, at most {MAX_NAME - room})" if room else ""
        raise UserError(f"--name {name!r} is {len(name)} characters; names are at most {MAX_NAME}{extra}: "
                        "give a shorter --name")


def _job_name(name: str | None, sweep: str, run: Run, several: bool, room: int) -> str:
    """The run's job name: ``name`` (one run) or ``name-<hash>`` (several), else from the sweep and run id."""
    if name is None:
        return k8s_name(sweep, run.run_id, room)
    return name if not several else f"{name}-{run.run_id[-8:].lower()}"


def emit_slurm(runs: list[Run], out: str, *, results: str = "results", gpus: int = 1, cpus: int = 8,
               mem: str = "64G", time: str = "2-00:00:00", partition: str | None = None,
               max_parallel: int | None = None, setup: str = "", python: str = "python",
               extra_sets: tuple[str, ...] = (), nodes: int = 1, process_per: str = "node",
               coordinator_port: int | None = None, name: str | None = None) -> list[str]:
    """Write ``<out>/<sweep>.sbatch`` (one array task per run, task i = run i of ``runs.tsv``).

    A run on several processes (``nodes`` > 1, or ``process_per="gpu"``) is one ``srun`` of ``nodes`` x (1 or
    ``gpus``) tasks; the batch step (on the first node) writes the run's ``sweep.json`` and names the
    coordinator: the first host of ``SLURM_JOB_NODELIST`` at ``coordinator_port``."""
    processes = check_layout("slurm", nodes, gpus, process_per, coordinator_port)
    check_name(name)  # one SLURM job (an array) for the sweep
    sweep = runs[0].sweep
    job = name or f"medscale-{sweep}"
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    per_node = gpus if process_per == "gpu" else 1
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --array={array}",
             f"#SBATCH --gres=gpu:{gpus}", f"#SBATCH --nodes={nodes}"]
    lines += ["#SBATCH --ntasks=1"] if processes == 1 else [f"#SBATCH --ntasks-per-node={per_node}"]
    lines += [f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}", f"#SBATCH --time={time}",
              f"#SBATCH --output=medscale-{sweep}-%A_%a.out"]
    if processes > 1:
        lines.append("#SBATCH --requeue")  # a node failure requeues the run, which resumes from its checkpoint
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["# Submit from the repository root: sbatch " + f"{sweep}.sbatch",
              "# Runs whose summary.json exists are skipped; a resubmitted run resumes from its checkpoints."]
    if processes > 1:
        lines.append(f"# Each run: {nodes} node(s) x {per_node} process(es), coordinator on the first node at "
                     f"port {coordinator_port}.")
    lines.append("set -euo pipefail")
    if setup:
        lines += setup.splitlines()
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    for i, run in enumerate(runs):
        if processes == 1:
            body = _run_script(run, results, extra_sets, python)
        else:
            body = "\n".join(_srun_lines(run, results, extra_sets, python, nodes, per_node, process_per,
                                         coordinator_port))
        lines.append(f"  {i})  # {run.run_id}")
        lines += ["    " + ln for ln in body.splitlines()]
        lines.append("    ;;")
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac", ""]
    path = os.path.join(out, f"{sweep}.sbatch")
    _write(path, "\n".join(lines))
    return [path, _write_index(runs, out)]


def _srun_lines(run: Run, results: str, extra_sets, python: str, nodes: int, per_node: int, process_per: str,
                port: int) -> list[str]:
    """One run as ``nodes`` x ``per_node`` processes: each learns its id from ``SLURM_PROCID`` (and, one per
    GPU, its device from ``SLURM_LOCALID``)."""
    local = ' MEDSCALE_LOCAL_DEVICE_IDS="$SLURM_LOCALID"' if process_per == "gpu" else ""
    task = (f'MEDSCALE_PROCESS_ID="$SLURM_PROCID"{local} exec {python} {" ".join(ENTRY)} '
            f"{_train_args(run, '$MEDSCALE_RUN_DIR', extra_sets)}")
    return [*_prepare_lines(run, results),
            'export MEDSCALE_RUN_DIR="$DIR"',
            f'export MEDSCALE_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"',
            f"export MEDSCALE_NUM_PROCESSES={nodes * per_node}",
            f"srun --nodes={nodes} --ntasks-per-node={per_node} --kill-on-bad-exit=1 /bin/sh -c {shlex.quote(task)}"]


def k8s_name(sweep: str, run_id: str, room: int = 0) -> str:
    """A DNS-1123 Job name unique per run, at most 63 - ``room`` characters (``room``: what Kubernetes appends,
    ``-<index>`` for the pods of an Indexed Job): the sweep, the readable prefix, the hash."""
    limit = MAX_NAME - room
    clean = re.sub(r"[^a-z0-9-]+", "-", f"ms-{sweep}-{run_id}".lower()).strip("-")
    clean = re.sub(r"-+", "-", clean)
    if len(clean) > limit:
        clean = clean[:limit - 9].rstrip("-") + "-" + run_id[-8:].lower()
    return clean


def _parse_selector(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--node-selector {item!r}: give KEY=VALUE (e.g. nvidia.com/gpu.present=true)")
        out[key] = value
    return out


def _parse_toleration(item: str) -> dict:
    """``KEY[=VALUE][:EFFECT]`` -> a toleration (Equal with a value, Exists without)."""
    spec, _, effect = item.partition(":")
    key, sep, value = spec.partition("=")
    effects = ("NoSchedule", "PreferNoSchedule", "NoExecute")
    if not key or (effect and effect not in effects):
        raise UserError(f"--toleration {item!r}: give KEY[=VALUE][:EFFECT], EFFECT one of {', '.join(effects)} "
                        "(e.g. nvidia.com/gpu:NoSchedule)")
    tol = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def emit_kubernetes(runs: list[Run], out: str, *, image: str = "medscale:latest", results: str = "/results",
                    pvc: str = "medscale-results", gpus: int = 1, cpus: int = 8, mem: str = "64Gi",
                    namespace: str | None = None, backoff_limit: int = 3, storage: str = "100Gi",
                    python: str = "python", extra_sets: tuple[str, ...] = (), nodes: int = 1,
                    process_per: str = "node", coordinator_port: int | None = None, name: str | None = None,
                    seccomp: str | None = None, openshift: bool = False, node_selector=(),
                    tolerations=()) -> list[str]:
    """Write ``<out>/jobs.yaml`` (per run one Job; with ``nodes`` > 1 an Indexed Job of ``nodes`` pods and its
    headless Service), ``<out>/pvc.yaml`` and ``<out>/runs.tsv``.

    ``openshift``: the choices every OpenShift restricted SCC admits (no seccomp profile; asking for one as
    well is an error). ``node_selector``: ``KEY=VALUE`` items; ``tolerations``: ``KEY[=VALUE][:EFFECT]``."""
    import yaml

    processes = check_layout("kubernetes", nodes, gpus, process_per, coordinator_port)
    if seccomp is not None and seccomp not in SECCOMP:
        raise UserError(f"--seccomp must be one of {', '.join(SECCOMP)}, not {seccomp!r}")
    if openshift and seccomp == "runtime-default":
        raise UserError("--openshift leaves seccompProfile unset (OpenShift before 4.11 refuses it); drop "
                        "--seccomp runtime-default, or drop --openshift on a cluster that accepts it")
    seccomp = seccomp or "none"
    index_room = len(f"-{nodes - 1}") if processes > 1 else 0
    check_name(name, (9 if len(runs) > 1 else 0) + index_room)
    selector = _parse_selector(node_selector)
    tols = [_parse_toleration(t) for t in tolerations or ()]
    sweep = runs[0].sweep
    docs = []
    for run in runs:
        job = _job_name(name, sweep, run, len(runs) > 1, index_room)
        labels = {"app.kubernetes.io/name": "medscale", "app.kubernetes.io/component": "train",
                  "medscale/sweep": re.sub(r"[^A-Za-z0-9_.-]", "-", sweep)[:63].strip("-_.") or "sweep"}
        meta = {"name": job, "labels": labels, "annotations": {"medscale/run-id": run.run_id}}
        if namespace:
            meta["namespace"] = namespace
        env = [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"},
               {"name": "MEDSCALE_RESULTS", "value": results},
               {"name": "JAX_COMPILATION_CACHE_DIR", "value": f"{results}/.cache/jax"},
               {"name": "PYTHONUNBUFFERED", "value": "1"}]
        pod_labels = dict(labels)
        if processes > 1:
            pod_labels["medscale/job"] = job
            env += [{"name": "MEDSCALE_COORDINATOR", "value": f"{job}-0.{job}:{coordinator_port}"},
                    {"name": "MEDSCALE_NUM_PROCESSES", "value": str(processes)},
                    {"name": "MEDSCALE_PROCESS_ID", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
            script = "set -eu\n" + _run_script(run, results, extra_sets, python, first_only="$MEDSCALE_PROCESS_ID")
        else:
            script = "set -eu\n" + _run_script(run, results, extra_sets, python)
        resources = {"limits": {"nvidia.com/gpu": gpus, "memory": mem},
                     "requests": {"nvidia.com/gpu": gpus, "cpu": str(cpus), "memory": mem}}
        container = {
            "name": "train", "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["/bin/sh", "-c", script], "env": env, "resources": resources,
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "results", "mountPath": results}, {"name": "dshm", "mountPath": "/dev/shm"},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }
        if processes > 1:
            container["ports"] = [{"name": "coordinator", "containerPort": coordinator_port, "protocol": "TCP"}]
        security = {"runAsNonRoot": True}
        if seccomp == "runtime-default":
            security["seccompProfile"] = {"type": "RuntimeDefault"}
        pod = {"restartPolicy": "Never", "securityContext": security, "containers": [container],
               "volumes": [{"name": "results", "persistentVolumeClaim": {"claimName": pvc}},
                           {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                           {"name": "tmp", "emptyDir": {}}]}
        if selector:
            pod["nodeSelector"] = dict(selector)
        if tols:
            pod["tolerations"] = [dict(t) for t in tols]
        spec = {"backoffLimit": backoff_limit, "ttlSecondsAfterFinished": 7 * 86400}
        if processes > 1:
            pod["subdomain"] = job  # pod i is <job>-<i>.<job>: the headless Service below
            # a lost pod stops the others (jax.distributed); each is retried, so allow every pod its retries
            spec.update(completionMode="Indexed", completions=processes, parallelism=processes,
                        backoffLimit=backoff_limit * processes)
            service_meta = {"name": job, "labels": dict(labels), "annotations": {"medscale/run-id": run.run_id}}
            if namespace:
                service_meta["namespace"] = namespace
            docs.append({"apiVersion": "v1", "kind": "Service", "metadata": service_meta,
                         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                                  "selector": {"medscale/job": job},
                                  "ports": [{"name": "coordinator", "port": coordinator_port,
                                             "targetPort": coordinator_port, "protocol": "TCP"}]}})
        spec["template"] = {"metadata": {"labels": pod_labels}, "spec": pod}
        docs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec})
    jobs = os.path.join(out, "jobs.yaml")
    what = f"{len(runs)} Jobs, one per run" if processes == 1 else \
        f"{len(runs)} Indexed Jobs of {processes} pods and their headless Services, one of each per run"
    _write(jobs, "# medscale sweep " + sweep + f": {what}. kubectl apply -f jobs.yaml\n"
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
