"""Emitted cluster launchers parse, hold one job per run, and run exactly the local launcher's command."""

import json
import os
import re
import shlex
import subprocess
import textwrap

import yaml

from medscale.cli import main
from medscale.sweep import design

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
