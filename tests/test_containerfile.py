"""deploy/Containerfile builds the image the emitted cluster jobs run: it installs medscale with the extra that
brings jax[cuda12], its entry point is the ``python -m medscale`` the emitters call, and it runs as a non-root
user id whose files are group 0's (OpenShift's arbitrary uid). The image itself is not built here (no registry)."""

import inspect
import json
import os
import re
import tomllib

from medscale.sweep import emit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _instructions():
    with open(os.path.join(REPO, "deploy", "Containerfile")) as fh:
        text = re.sub(r"\\\n", " ", fh.read())  # join continued lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_installs_the_cuda_extra_and_runs_the_emitters_entry_point():
    steps = _instructions()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    extra = [name for name, reqs in project["optional-dependencies"].items()
             if any(re.match(r"jax\[cuda12\]", r) for r in reqs)]
    assert extra == ["cuda12"]
    runs = " && ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r'pip install "\.\[cuda12\]"', runs)  # this checkout, with that extra
    copied = {rest.split()[0] for word, rest in steps if word == "COPY"}
    assert {"pyproject.toml", "medscale"} <= copied
    (entry,) = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    for emitter in (emit.emit_kubernetes, emit.emit_slurm):  # the python they call: the image's, on its PATH
        assert entry == [inspect.signature(emitter).parameters["python"].default, *emit.ENTRY]
    assert emit.ENTRY == ("-m", "medscale")


def test_the_image_runs_as_an_arbitrary_non_root_uid_in_group_0():
    steps = _instructions()
    (user,) = [rest for word, rest in steps if word == "USER"]
    assert user.isdigit() and int(user) > 0  # numeric, so the kubelet can check runAsNonRoot
    runs = " && ".join(rest for word, rest in steps if word == "RUN")
    assert "chgrp -R 0 /opt/medscale" in runs and "chmod -R g=u /opt/medscale" in runs
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "HOME=/tmp" in env  # the emitted pods mount /tmp as an emptyDir
    user_at = [w for w, _ in steps].index("USER")
    assert all(w != "RUN" for w, _ in steps[user_at:])  # nothing built as the final user
