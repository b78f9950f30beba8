"""Emitted cluster launchers parse, hold one job per run, and run exactly the local launcher's command."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import yaml

from medscale.cli import main
from medscale.sweep import design

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ISO = """
c.name = "iso"
c.base = "tiny"
c.design = "isoflop"
c.sizes = ["d16l1", "d32l1", "d48l1", "d64l1", "d64l2", "d96l2", "d128l2"]
c.enc_lens = [32, 64]
c.budgets = [1e11, 1e12]
c.per_budget = 3
c.spread = 16.0
"""


def write_sweep(tmp_path, body, name="s.py"):
    path = tmp_path / name
    path.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                    + textwrap.indent(textwrap.dedent(body), "    ") + "    return c\n")
    return str(path)


def _plan(tmp_path):
    path = write_sweep(tmp_path, ISO)
    return path, design.expand(design.load_definition(path))


def _run_arm(script_text, env, tmp_path):
    """Run a job's shell text with python replaced by a recorder; returns the argv it would exec."""
    out = subprocess.run(["bash", "-c", script_text], check=False, env={**os.environ, **env}, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout.strip())


def test_slurm_array_script(tmp_path):
    path, runs = _plan(tmp_path)
    out = tmp_path / "slurm"
    assert main(["sweep", "emit", path, "--target", "slurm", "--out", str(out), "--gpus", "8",
                 "--python", "echo", "--partition", "gpu"]) == 0
    script = (out / "iso.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(out / "iso.sbatch")], check=False).returncode == 0  # valid shell
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", script, re.MULTILINE))
    assert directives["array"] == f"0-{len(runs) - 1}" and directives["gres"] == "gpu:8"
    assert directives["partition"] == "gpu"
    assert len(re.findall(r"^  \d+\)  # ", script, re.MULTILINE)) == len(runs)  # one array task per run
    index = (out / "runs.tsv").read_text().splitlines()[1:]
    assert [ln.split("\t")[1] for ln in index] == [r.run_id for r in runs]
    for i in (0, len(runs) - 1):  # run two tasks with `echo` standing in for python
        env = {"SLURM_ARRAY_TASK_ID": str(i), "MEDSCALE_RESULTS": str(tmp_path / "res")}
        argv = _run_arm(script, env, tmp_path)
        workdir = str(tmp_path / "res" / "iso" / runs[i].run_id)
        assert argv[:2] == ["-m", "medscale"]
        assert argv[2:] == runs[i].train_argv(workdir) + ["--quiet"]
        with open(os.path.join(workdir, "sweep.json")) as fh:
            plan = json.load(fh)
        assert plan["run_id"] == runs[i].run_id and plan["budget"] == runs[i].budget
        with open(os.path.join(workdir, "summary.json"), "w") as fh:
            fh.write("{}")  # a finished run is skipped
        again = subprocess.run(["bash", "-c", script], check=False, env={**os.environ, **env},
                               capture_output=True, text=True)
        assert again.returncode == 0 and "already finished" in again.stdout
    bad = subprocess.run(["bash", "-c", script], check=False, env={**os.environ, "SLURM_ARRAY_TASK_ID": "999"},
                         capture_output=True, text=True)
    assert bad.returncode == 2


def test_kubernetes_jobs(tmp_path):
    path, runs = _plan(tmp_path)
    out = tmp_path / "k8s"
    assert main(["sweep", "emit", path, "--target", "kubernetes", "--out", str(out), "--gpus", "8",
                 "--image", "registry.example/medscale:1", "--pvc", "shared", "--python", "echo",
                 "--set", "model.dtype=bfloat16"]) == 0
    docs = list(yaml.safe_load_all((out / "jobs.yaml").read_text()))
    assert len(docs) == len(runs) and all(d["kind"] == "Job" and d["apiVersion"] == "batch/v1" for d in docs)
    names = [d["metadata"]["name"] for d in docs]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names)
    assert [d["metadata"]["annotations"]["medscale/run-id"] for d in docs] == [r.run_id for r in runs]
    for doc, run in zip(docs, runs):
        pod = doc["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == "registry.example/medscale:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["requests"]["nvidia.com/gpu"] == 8
        assert pod["securityContext"]["runAsNonRoot"] is True and "runAsUser" not in pod["securityContext"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        vols = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in c["volumeMounts"] if m["name"] == "results")
        assert vols["results"]["persistentVolumeClaim"]["claimName"] == "shared"
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        assert c["command"][:2] == ["/bin/sh", "-c"]
    # run the last job's script with the mount path replaced by a temp folder
    run, doc = runs[-1], docs[-1]
    script = doc["spec"]["template"]["spec"]["containers"][0]["command"][2]
    argv = _run_arm(script, {"MEDSCALE_RESULTS": str(tmp_path / "pv")}, tmp_path)
    workdir = str(tmp_path / "pv" / "iso" / run.run_id)
    assert mount["mountPath"] == "/results"
    expected = run.train_argv(workdir)
    expected[-2:-2] = ["--set", "model.dtype=bfloat16"]
    assert argv[2:] == expected + ["--quiet"]
    pvc = yaml.safe_load((out / "pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "shared"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# ---------------------------------------------------------------------------------------------- several nodes
RECORDER = """#!/bin/sh
# stands in for python: one JSON line with the arguments and the process's distributed environment
exec "{python}" -c 'import json, os, sys; print(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) \
for k in ("MEDSCALE_COORDINATOR", "MEDSCALE_NUM_PROCESSES", "MEDSCALE_PROCESS_ID", "MEDSCALE_LOCAL_DEVICE_IDS")}}}}))' "$@"
"""
FAKE_SRUN = """#!/bin/bash
# stands in for srun: runs the step's tasks one after the other with the ids SLURM gives them
nodes=1; per=1
while [ "${1#--}" != "$1" ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; --ntasks-per-node=*) per=${1#--ntasks-per-node=} ;; esac
  shift
done
for ((i = 0; i < nodes * per; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && printf "gpu-node-17\\ngpu-node-18\\n"
"""


def _tools(tmp_path):
    """A folder with fake srun / scontrol and a python recorder; returns (PATH, recorder path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("recorder", RECORDER.format(python=sys.executable))]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", str(bin_dir / "recorder")


def test_slurm_runs_over_several_nodes(tmp_path):
    path, runs = _plan(tmp_path)
    env_path, recorder = _tools(tmp_path)
    for process_per, per_node in [("node", 1), ("gpu", 4)]:
        out = tmp_path / process_per
        assert main(["sweep", "emit", path, "--target", "slurm", "--out", str(out), "--nodes", "2",
                     "--gpus-per-node", "4", "--process-per", process_per, "--coordinator-port", "29500",
                     "--python", recorder]) == 0
        script = (out / "iso.sbatch").read_text()
        assert subprocess.run(["bash", "-n", str(out / "iso.sbatch")], check=False).returncode == 0
        directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", script, re.MULTILINE))
        assert directives["nodes"] == "2" and directives["gres"] == "gpu:4"
        assert directives["ntasks-per-node"] == str(per_node) and "ntasks" not in directives
        assert "#SBATCH --requeue" in script.splitlines()
        i = 1
        res = tmp_path / f"res-{process_per}"
        env = {"SLURM_ARRAY_TASK_ID": str(i), "MEDSCALE_RESULTS": str(res), "PATH": env_path,
               "SLURM_JOB_NODELIST": "gpu-node-[17-18]"}
        proc = subprocess.run(["bash", "-c", script], check=False, env={**os.environ, **env}, capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        tasks = [json.loads(line) for line in proc.stdout.splitlines()]
        workdir = str(res / "iso" / runs[i].run_id)
        assert len(tasks) == 2 * per_node
        for rank, task in enumerate(tasks):
            assert task["argv"][:2] == ["-m", "medscale"]
            assert task["argv"][2:] == runs[i].train_argv(workdir) + ["--quiet"]
            assert task["env"] == {"MEDSCALE_COORDINATOR": "gpu-node-17:29500",
                                   "MEDSCALE_NUM_PROCESSES": str(2 * per_node), "MEDSCALE_PROCESS_ID": str(rank),
                                   "MEDSCALE_LOCAL_DEVICE_IDS": str(rank % per_node) if process_per == "gpu" else None}
        with open(os.path.join(workdir, "sweep.json")) as fh:  # the plan, one line
            assert fh.read() == json.dumps(runs[i].plan(), sort_keys=True) + "\n"


# The fields of batch/v1 Job, v1 Service and their pod template that the emitter writes, with their types
# (Kubernetes API reference, v1.31); a key not listed here, or a value of another type, fails the check.
_STR, _INT, _BOOL = str, int, bool
_MAP = {str: str}
_META = {"name": _STR, "namespace": _STR, "labels": _MAP, "annotations": _MAP}
_ENV = {"name": _STR, "value": _STR, "valueFrom": {"fieldRef": {"fieldPath": _STR}}}
_CONTAINER = {
    "name": _STR, "image": _STR, "imagePullPolicy": ("Always", "Never", "IfNotPresent"), "command": [_STR],
    "env": [_ENV], "ports": [{"name": _STR, "containerPort": _INT, "protocol": ("TCP", "UDP", "SCTP")}],
    "resources": {"limits": {str: (int, str)}, "requests": {str: (int, str)}},
    "securityContext": {"allowPrivilegeEscalation": _BOOL, "runAsNonRoot": _BOOL, "capabilities": {"drop": [_STR]}},
    "volumeMounts": [{"name": _STR, "mountPath": _STR}],
}
_POD = {
    "restartPolicy": ("Never", "OnFailure"), "subdomain": _STR, "nodeSelector": _MAP,
    "tolerations": [{"key": _STR, "operator": ("Exists", "Equal"), "value": _STR,
                     "effect": ("NoSchedule", "PreferNoSchedule", "NoExecute")}],
    "securityContext": {"runAsNonRoot": _BOOL, "seccompProfile": {"type": ("RuntimeDefault",)}},
    "containers": [_CONTAINER],
    "volumes": [{"name": _STR, "persistentVolumeClaim": {"claimName": _STR}, "emptyDir": {"medium": _STR}}],
}
JOB = {"apiVersion": ("batch/v1",), "kind": ("Job",), "metadata": _META,
       "spec": {"backoffLimit": _INT, "ttlSecondsAfterFinished": _INT, "completionMode": ("NonIndexed", "Indexed"),
                "completions": _INT, "parallelism": _INT,
                "template": {"metadata": {"labels": _MAP}, "spec": _POD}}}
SERVICE = {"apiVersion": ("v1",), "kind": ("Service",), "metadata": _META,
           "spec": {"clusterIP": ("None",), "publishNotReadyAddresses": _BOOL, "selector": _MAP,
                    "ports": [{"name": _STR, "port": _INT, "targetPort": _INT, "protocol": ("TCP",)}]}}


def conforms(value, schema, where="") -> None:
    if isinstance(schema, tuple) and all(isinstance(s, str) for s in schema):
        assert value in schema, (where, value)
    elif isinstance(schema, tuple):
        assert isinstance(value, schema) and not isinstance(value, bool), (where, value)
    elif schema in (str, int, bool):
        assert isinstance(value, schema) and (schema is bool or not isinstance(value, bool)), (where, value)
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            conforms(item, schema[0], f"{where}[{i}]")
    elif set(schema) == {str}:  # a map
        assert isinstance(value, dict), where
        for k, v in value.items():
            assert isinstance(k, str), where
            conforms(v, schema[str], f"{where}.{k}")
    else:
        assert isinstance(value, dict), where
        unknown = set(value) - set(schema)
        assert not unknown, f"{where}: not in the schema: {unknown}"
        for k, v in value.items():
            conforms(v, schema[k], f"{where}.{k}")


DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def test_kubernetes_indexed_jobs_over_several_nodes(tmp_path):
    path, runs = _plan(tmp_path)
    out = tmp_path / "k8s"
    assert main(["sweep", "emit", path, "--target", "kubernetes", "--out", str(out), "--nodes", "3",
                 "--gpus-per-node", "8", "--coordinator-port", "29500", "--python", "echo", "--openshift",
                 "--node-selector", "nvidia.com/gpu.product=Tesla-V100-SXM2-32GB",
                 "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration", "dedicated=ml:NoExecute"]) == 0
    docs = list(yaml.safe_load_all((out / "jobs.yaml").read_text()))
    services = [d for d in docs if d["kind"] == "Service"]
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert len(services) == len(jobs) == len(runs) and len(docs) == 2 * len(runs)
    for svc, job, run in zip(services, jobs, runs):
        conforms(svc, SERVICE, "Service")
        conforms(job, JOB, "Job")
        name = job["metadata"]["name"]
        assert job["metadata"]["annotations"]["medscale/run-id"] == run.run_id
        assert DNS_LABEL.fullmatch(name) and len(f"{name}-2") <= 63  # pod host names <job>-<index>
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
        # the headless Service gives pod 0 a DNS name <job>-0.<service> and selects this run's pods only
        assert svc["metadata"]["name"] == pod["subdomain"] == name and svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
        assert env["MEDSCALE_COORDINATOR"] == f"{name}-0.{name}:29500"
        assert svc["spec"]["ports"][0]["port"] == c["ports"][0]["containerPort"] == 29500
        assert env["MEDSCALE_NUM_PROCESSES"] == "3"
        assert env["MEDSCALE_PROCESS_ID"] == {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-V100-SXM2-32GB"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "dedicated", "operator": "Equal", "value": "ml",
                                       "effect": "NoExecute"}]
        # OpenShift's restricted SCC, old and new: no ids, no seccomp profile, every written path on a volume
        for ctx in (pod["securityContext"], c["securityContext"]):
            assert not {"runAsUser", "runAsGroup", "fsGroup", "seccompProfile", "privileged"} & set(ctx)
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"] for v in pod["volumes"]}
        assert set(mounts.values()) == volumes
        for var in ("HOME", "TMPDIR", "MEDSCALE_RESULTS", "JAX_COMPILATION_CACHE_DIR"):
            assert any(env[var] == m or env[var].startswith(m + "/") for m in mounts), var
        assert "livenessProbe" not in c and "readinessProbe" not in c  # a stuck peer ends via jax's heartbeat
    # each pod's script: only process 0 writes sweep.json; every process execs the same train command
    run, script = runs[0], jobs[0]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    workdir = tmp_path / "pv" / "iso" / run.run_id
    for rank in (1, 0):
        argv = _run_arm(script, {"MEDSCALE_RESULTS": str(tmp_path / "pv"), "MEDSCALE_PROCESS_ID": str(rank)},
                        tmp_path)
        assert argv[2:] == run.train_argv(str(workdir)) + ["--quiet"]
        assert os.path.exists(workdir / "sweep.json") == (rank == 0)


def test_seccomp_profile_only_when_asked(tmp_path):
    path, _ = _plan(tmp_path)
    for flags, expected in [([], None), (["--seccomp", "runtime-default"], {"type": "RuntimeDefault"}),
                            (["--seccomp", "none"], None)]:
        out = tmp_path / ("k" + "".join(flags))
        assert main(["sweep", "emit", path, "--target", "kubernetes", "--out", str(out), *flags]) == 0
        for doc in yaml.safe_load_all((out / "jobs.yaml").read_text()):
            conforms(doc, JOB)
            assert doc["spec"]["template"]["spec"]["securityContext"].get("seccompProfile") == expected
            assert "completionMode" not in doc["spec"]  # one node: a plain Job, as before


def test_bad_combinations_are_one_error_line(tmp_path, capsys):
    path, _ = _plan(tmp_path)
    long_name = "a" * 64
    cases = [
        ("slurm", ["--nodes", "0"], "--nodes"),
        ("kubernetes", ["--nodes", "0"], "--nodes"),
        ("slurm", ["--nodes", "2"], "--coordinator-port"),
        ("kubernetes", ["--nodes", "2"], "--coordinator-port"),
        ("slurm", ["--process-per", "gpu", "--gpus", "8"], "--coordinator-port"),
        ("slurm", ["--nodes", "2", "--coordinator-port", "80"], "--coordinator-port"),
        ("slurm", ["--name", long_name], "--name"),
        ("kubernetes", ["--name", long_name], "--name"),
        ("kubernetes", ["--name", "a" * 60, "--nodes", "2", "--coordinator-port", "29500"], "--name"),
        ("kubernetes", ["--name", "Bad_Name"], "--name"),
        ("kubernetes", ["--process-per", "gpu", "--nodes", "2", "--coordinator-port", "29500"], "--process-per"),
        ("kubernetes", ["--openshift", "--seccomp", "runtime-default"], "--openshift"),
        ("kubernetes", ["--toleration", "x:Sometimes"], "--toleration"),
        ("kubernetes", ["--node-selector", "novalue"], "--node-selector"),
    ]
    for target, flags, word in cases:
        out = tmp_path / "never"
        capsys.readouterr()
        assert main(["sweep", "emit", path, "--target", target, "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and word in err, (flags, err)
        assert not out.exists()  # nothing half-written
    # through a real process: exit status 2, one line on stderr, no traceback
    proc = subprocess.run([sys.executable, "-m", "medscale", "sweep", "emit", path, "--target", "kubernetes",
                           "--out", str(tmp_path / "never"), "--nodes", "2"], check=False, capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
