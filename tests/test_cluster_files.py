"""The cluster files install this project (not a copied dependency list), with what the crawler and trainer import.

Every third-party module that crawler/, shards/ and the training entry point import, at
module level or inside a function, must come from a distribution that the cluster's
install pulls in: pyproject.toml's dependencies and the extras the cluster files name,
followed through the installed packages' own requirements, plus what they install with
--no-deps (facenet-pytorch, at the Makefile's version).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = "scn-scale"
LOCAL_PACKAGES = {"crawler", "scn_scale", "shards"}
#: Opt-in modules the cluster need not install: the driver refuses the setting that needs one,
#: naming the extra to install, before any worker starts (tracking=mlflow: scn_scale.tracking.check).
OPT_IN = {"mlflow"}


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` among shell commands (options included)."""
    installs = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def project_install(installs: list[list[str]], project_dir: str) -> tuple[set[str], set[str]]:
    """(extras of the project install, names installed with --no-deps); fails on any other pip install."""
    extras: set[str] | None = None
    no_deps: set[str] = set()
    for args in installs:
        targets = [a for a in args if not a.startswith("-")]
        for target in targets:
            match = re.fullmatch(rf"{re.escape(project_dir)}(?:\[([\w,-]+)\])?", target)
            if match:
                extras = set(filter(None, (match.group(1) or "").split(",")))
            elif "--no-deps" in args:
                no_deps.add(target)
            else:
                pytest.fail(f"pip installs {target!r} by hand; the cluster must install the project ({project_dir})")
    assert extras is not None, f"no pip install of the project directory {project_dir}"
    return extras, no_deps


def ray_cluster_install() -> tuple[set[str], set[str]]:
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    mounted = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, "the working tree (.) is copied to every node"
    commands = config["setup_commands"] + config.get("head_setup_commands", []) + config.get("worker_setup_commands", [])
    return project_install(pip_installs(commands), mounted[0])


def dockerfile_install() -> tuple[set[str], set[str]]:
    lines = (REPO / "cluster" / "Dockerfile").read_text().splitlines()
    copy = next(line.split() for line in lines if line.startswith("COPY "))
    assert copy[-2] == ".", "the whole build context (the committed repository) is copied"
    runs = [line[len("RUN "):] for line in lines if line.startswith("RUN ")]
    return project_install(pip_installs(runs), copy[-1])


def makefile_no_deps() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"pip install -q --no-deps (\S+)", text))


def test_cluster_launcher_and_image_install_the_project_the_same_way() -> None:
    extras, no_deps = ray_cluster_install()
    assert (extras, no_deps) == dockerfile_install()
    assert no_deps == makefile_no_deps()  # facenet-pytorch: the Makefile's pin and way


def test_the_readme_starts_the_cluster_without_a_prompt_and_the_dashboard_apart() -> None:
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^ray up -y cluster/ray-cluster\.yaml( +#.*)?$", readme, re.M)
    assert re.search(r"^ray dashboard cluster/ray-cluster\.yaml &( +#.*)?$", readme, re.M)
    assert not re.search(r"ray up [^\n]*&&", readme)


def ray_starts(commands: list[str]) -> list[list[str]]:
    """Every `ray start` among shell commands, with the environment assignments before it."""
    starts = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            at = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["ray", "start"]), None)
            if at is not None:
                starts.append(words[:at] + words[at + 2:])
    return starts


def test_the_launchers_dashboard_and_job_api_need_the_token_and_listen_on_loopback() -> None:
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    head, workers = ray_starts(config["head_start_ray_commands"]), ray_starts(config["worker_start_ray_commands"])
    assert len(head) == 1 and workers
    for start in head + workers:
        assert "RAY_AUTH_MODE=token" in start, start  # every node: no unauthenticated GCS or job API
    assert "--dashboard-host=127.0.0.1" in head[0]  # reached through `ray dashboard`'s SSH tunnel only
    assert "0.0.0.0" not in (REPO / "cluster" / "ray-cluster.yaml").read_text()
    assert config["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    readme = (REPO / "README.md").read_text()
    assert readme.index("ray get-auth-token --generate") < readme.index("ray up -y cluster/ray-cluster.yaml")
    assert re.search(r"^RAY_AUTH_MODE=token ray job submit --address http://127\.0\.0\.1:8265 ", readme, re.M)


def test_the_kuberay_cluster_uses_token_authentication() -> None:
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(int(p) for p in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # the first Ray with tokens
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}  # KubeRay sets both from its Secret


def test_job_environments_install_nothing_by_hand() -> None:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime-env.yaml").read_text())
    rayjob = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    for env in (runtime_env, job_env):
        assert not {"pip", "conda", "uv"} & set(env)
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {"YOUR-REGISTRY/scn-scale:latest"}  # the image built from cluster/Dockerfile
    build = "-f cluster/Dockerfile -t YOUR-REGISTRY/scn-scale:latest"
    assert build in (REPO / "cluster" / "kuberay-rayjob.yaml").read_text()


# -- what the crawler and the trainer import ----------------------------------------------------


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of everything a module imports, anywhere in it (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, where they are modules
    return found


def run_time_modules(entry_points: list[str]) -> set[str]:
    """Top-level third-party modules imported by the local modules reachable from the entry points."""
    todo, seen, third_party = list(entry_points), set(), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        for name in _imports(path, module):
            top = name.split(".")[0]
            if top in LOCAL_PACKAGES:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def installed_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the requirements (those whose markers hold here) and, through installed
    metadata, everything they require with the extras asked of them."""
    todo = [r for r in map(Requirement, requirements) if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                sub.marker = None
                todo.append(sub)
    return names


def test_cluster_install_covers_every_module_the_crawler_and_trainer_import() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras, no_deps = ray_cluster_install()
    unknown = extras - set(project["optional-dependencies"])
    assert not unknown, f"the cluster asks for extras pyproject.toml does not define: {unknown}"
    requirements = list(project["dependencies"])
    for extra in sorted(extras):
        requirements += project["optional-dependencies"][extra]
    covered = installed_closure(requirements) | {canonicalize_name(Requirement(n).name) for n in no_deps}

    files = [*(REPO / "crawler").rglob("*.py"), *(REPO / "shards").rglob("*.py")]
    every = [p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__") for p in files]
    modules = run_time_modules([*every, "scn_scale.train"]) - OPT_IN
    assert {"imagehash", "cv2", "facenet_pytorch", "yt_dlp", "av", "deepspeed", "ray", "safetensors"} <= modules
    distributions = importlib.metadata.packages_distributions()
    uncovered = {}
    for module in sorted(modules):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert names, f"{module} is imported but no installed distribution provides it (make install)"
        if not names & covered:
            uncovered[module] = sorted(names)
    assert not uncovered, f"imported at run time but not installed on the cluster: {uncovered}"
