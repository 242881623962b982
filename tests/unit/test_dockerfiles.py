"""The images and the documented path to a cluster, checked without Docker or a cluster.

No Docker engine is needed: the Dockerfiles are parsed here (a small parser for the instructions
they use) and checked for what a build or a pod would trip on: base images pinned to a tag that is
not ``latest``, a numeric non-root user, entry points that are console scripts of the package,
torch's CPU index by default for the operator and a CUDA one for the worker, COPY sources that
exist and that ``.dockerignore`` lets into the context, and a context from which the package
actually builds (``pip wheel`` over exactly the files the COPY instructions take). The kind
recipe must pass ``bash -n`` (and shellcheck and hadolint where they are installed), and the
README's cluster section must name only commands, flags, files and chart values that exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "docker" / "operator.Dockerfile"
WORKER = REPO / "docker" / "worker.Dockerfile"
GPT = REPO / "examples" / "gpt" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KIND_E2E = REPO / "scripts" / "kind-e2e.sh"
CLUSTER_EXAMPLE = REPO / "examples" / "gpt-cluster.yaml"
CHART = REPO / "charts" / "salamander"
README = REPO / "README.md"

#: Each Dockerfile and its build context.
CONTEXTS = {OPERATOR: REPO, WORKER: REPO, GPT: GPT.parent}

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SCRIPTS = PYPROJECT["project"]["scripts"]

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# --- a small Dockerfile parser ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str           # upper case: FROM, RUN, COPY, ...
    value: str             # the rest of the instruction, continuation lines joined
    line: int

    def words(self) -> list[str]:
        """The arguments: the JSON (exec) form's list, else shell words."""
        if self.value.startswith("["):
            words = json.loads(self.value)
            assert isinstance(words, list) and all(isinstance(w, str) for w in words), self
            return words
        return shlex.split(self.value)

    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` options (COPY --from=..., FROM --platform=...)."""
        out = {}
        for word in self.words():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            out[name] = value
        return out

    def operands(self) -> list[str]:
        words = self.words()
        return words[len(self.flags()):] if not self.value.startswith("[") else words


@dataclass
class Stage:
    image: str             # FROM's image, global ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    global_args: dict[str, str | None]
    stages: list[Stage]

    def arg_default(self, name: str) -> str | None:
        """An ARG's default, global or declared in any stage (the first declaration's)."""
        if self.global_args.get(name) is not None:
            return self.global_args[name]
        for inst in self.instructions:
            if inst.keyword == "ARG":
                key, _, default = inst.value.partition("=")
                if key.strip() == name and default:
                    return default.strip().strip('"')
        return None


def substitute(text: str, variables: dict[str, str | None]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by their values (an unknown or unset one by nothing)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2)) or "", text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, where Docker drops comment lines as well
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, value = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    assert not pending, f"{path}: the last instruction ends with a line continuation"

    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for inst in instructions:
        if inst.keyword == "ARG" and not stages:
            key, eq, default = inst.value.partition("=")
            global_args[key.strip()] = default.strip().strip('"') if eq else None
        elif inst.keyword == "FROM":
            operands = inst.operands()
            name = operands[2] if len(operands) == 3 and operands[1].upper() == "AS" else None
            assert len(operands) in (1, 3), f"{path}:{inst.line}: FROM {inst.value}"
            stages.append(Stage(substitute(operands[0], global_args), name))
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            raise AssertionError(f"{path}:{inst.line}: {inst.keyword} before the first FROM")
    return Dockerfile(path, instructions, global_args, stages)


def test_the_parser_joins_continuations_and_substitutes_args(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text('# syntax=docker/dockerfile:1\nARG BASE=python:3.11.13-slim\nFROM ${BASE} AS build\n'
                    'RUN a \\\n    # a comment inside\n    && b\nCOPY --from=build --chown=1:1 /x /y\n'
                    'FROM $BASE\nENTRYPOINT ["salamander"]\n')
    parsed = parse_dockerfile(path)
    assert [s.image for s in parsed.stages] == ["python:3.11.13-slim"] * 2
    assert parsed.stages[0].name == "build"
    run = parsed.stages[0].all("RUN")[0]
    assert (run.value, run.line) == ("a && b", 4)
    copy = parsed.stages[0].all("COPY")[0]
    assert copy.flags() == {"from": "build", "chown": "1:1"} and copy.operands() == ["/x", "/y"]
    assert parsed.stages[1].last("ENTRYPOINT").words() == ["salamander"]  # type: ignore[union-attr]


# --- a small .dockerignore matcher --------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out[:-2] + "(?:.*/)?", i + 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        rules.append((include, _pattern_regex(pattern)))
    return rules


def excluded(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the context leaves ``relative`` out: the last rule that matches the path or one
    of its parent directories decides (moby's patternmatcher), and no rule means it is in."""
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for include, regex in rules:
        if any(regex.match(p) for p in prefixes):
            verdict = not include
    return verdict


def test_the_matcher_follows_docker_semantics() -> None:
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("src")), (False, _pattern_regex("**/__pycache__"))]
    assert excluded("runs/x.log", rules) and excluded(".venv/bin/python", rules)
    assert not excluded("src/a/b.py", rules) and excluded("src/a/__pycache__/b.pyc", rules)


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    rules = dockerignore_rules()
    for path in (".venv/bin/python", "runs/gpt-1/worker-0.log", ".git/HEAD", "tests/unit/test_api.py",
                 "charts/salamander/Chart.yaml", "salamander.egg-info/PKG-INFO", "benchmarks/results/x.json",
                 "src/salamander/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x", ".hypothesis/x"):
        assert excluded(path, rules), f".dockerignore lets {path} into the context"
    for path in ("pyproject.toml", "README.md", "src/salamander/cli.py", "operator/src/salamander_operator/desired.py",
                 "worker/src/salamander_worker/agent.py", "src/salamander/controlplane/v1/controlplane_pb2.py"):
        assert not excluded(path, rules), f".dockerignore leaves {path} out of the context"


# --- the Dockerfiles ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfiles() -> dict[Path, Dockerfile]:
    return {path: parse_dockerfile(path) for path in CONTEXTS}


def test_every_dockerfile_starts_from_an_image(dockerfiles: dict[Path, Dockerfile]) -> None:
    for path, parsed in dockerfiles.items():
        assert parsed.stages, f"{path}: no FROM"
        assert parsed.instructions[0].keyword in ("ARG", "FROM"), path


def _tag(image: str) -> str | None:
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def test_base_images_are_pinned(dockerfiles: dict[Path, Dockerfile]) -> None:
    for path, parsed in dockerfiles.items():
        names = {s.name for s in parsed.stages if s.name}
        for stage in parsed.stages:
            if stage.image in names:
                continue  # an earlier stage of the same file
            tag = _tag(stage.image)
            assert tag and tag != "latest" and "$" not in stage.image, f"{path}: FROM {stage.image} is not pinned"
            if stage.image.startswith("python:"):
                assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), f"{path}: {stage.image}: pin the patch release"


def test_the_images_share_one_python(dockerfiles: dict[Path, Dockerfile]) -> None:
    """One Python for both images, and one that pyproject's requires-python admits."""
    pythons = {dockerfiles[p].global_args["PYTHON_IMAGE"] for p in (OPERATOR, WORKER)}
    assert len(pythons) == 1
    from packaging.specifiers import SpecifierSet

    version = re.match(r"python:(\d+\.\d+\.\d+)-", pythons.pop() or "")
    assert version and version.group(1) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_both_images_are_multi_stage_and_run_as_a_numeric_non_root_user(dockerfiles: dict[Path, Dockerfile]) -> None:
    for path in (OPERATOR, WORKER):
        parsed = dockerfiles[path]
        build, final = parsed.stages[0], parsed.stages[-1]
        assert len(parsed.stages) == 2 and build.name == "build", path
        assert not final.all("RUN") or all("pip install" not in r.value for r in final.all("RUN")), \
            f"{path}: the final stage installs packages; the build stage should"
        copies = [c for c in final.all("COPY") if c.flags().get("from") == "build"]
        assert copies and copies[0].operands() == ["/opt/salamander", "/opt/salamander"], path
        user = final.last("USER")
        assert user is not None, f"{path}: no USER: the image would run as root"
        uid, _, gid = user.value.partition(":")
        # numeric, so that Kubernetes can enforce runAsNonRoot against it
        assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), f"{path}: USER {user.value}"
        assert final.instructions.index(user) > final.instructions.index(copies[0]), path


def test_the_operator_image_runs_the_operator(dockerfiles: dict[Path, Dockerfile]) -> None:
    final = dockerfiles[OPERATOR].stages[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and entrypoint.words() == ["salamander"]
    assert cmd is not None and cmd.words() == ["operator"]
    assert SCRIPTS["salamander"] == "salamander.cli:main"
    # the chart's podSecurityContext runs it as the image's own user
    user = final.last("USER")
    assert user is not None
    if (CHART / "values.yaml").is_file():
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        context = values["operator"].get("podSecurityContext") or {}
        if "runAsUser" in context:
            assert user.value.split(":")[0] == str(context["runAsUser"]), "the image's UID and the chart's differ"


def test_the_worker_image_has_the_agent_and_a_workspace(dockerfiles: dict[Path, Dockerfile]) -> None:
    from salamander_operator.desired import AGENT_COMMAND

    assert AGENT_COMMAND in SCRIPTS and SCRIPTS[AGENT_COMMAND] == "salamander_worker.agent:main"
    parsed = dockerfiles[WORKER]
    build, final = parsed.stages
    assert any(f"command -v {AGENT_COMMAND}" in r.value for r in build.all("RUN"))
    workdir = final.last("WORKDIR")
    assert workdir is not None and workdir.value == "/workspace"
    # the user owns the environment (so layered images can pip install) without a second copy of it
    copy = [c for c in final.all("COPY") if c.flags().get("from") == "build"][0]
    assert copy.flags().get("chown") == final.last("USER").value  # type: ignore[union-attr]
    assert not any("chown -R" in r.value for r in final.all("RUN"))


def test_torch_comes_from_the_index_of_the_build(dockerfiles: dict[Path, Dockerfile]) -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pinned = re.search(r"SALAMANDER_TORCH:-torch==([\w.]+)\}", setup)
    assert pinned, "scripts/setup.sh no longer pins torch"
    for path in (OPERATOR, WORKER):
        parsed = dockerfiles[path]
        assert parsed.arg_default("TORCH_VERSION") == pinned.group(1), f"{path}: another torch than setup.sh"
        runs = [r.value for r in parsed.stages[0].all("RUN")]
        assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in runs, path
        # torch first, alone, then the package: pip keeps the torch build it already has
        assert runs.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"') < \
            next(i for i, r in enumerate(runs) if r.startswith("pip install /src"))
    assert dockerfiles[OPERATOR].arg_default("TORCH_INDEX") == CPU_INDEX
    worker_index = dockerfiles[WORKER].arg_default("TORCH_INDEX")
    assert worker_index and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", worker_index)


def test_copy_sources_exist_and_are_in_the_context(dockerfiles: dict[Path, Dockerfile]) -> None:
    rules = dockerignore_rules()
    for path, parsed in dockerfiles.items():
        context = CONTEXTS[path]
        for stage in parsed.stages:
            for inst in stage.all("COPY") + stage.all("ADD"):
                assert inst.keyword == "COPY", f"{path}:{inst.line}: use COPY, not ADD"
                if "from" in inst.flags():
                    continue
                *sources, _dest = inst.operands()
                for source in sources:
                    assert (context / source).exists(), f"{path}:{inst.line}: COPY {source}: not in {context}"
                    if context == REPO:
                        assert not excluded(source, rules), f"{path}:{inst.line}: .dockerignore leaves {source} out"


def test_the_gpt_image_puts_the_example_in_the_workers_working_directory(dockerfiles: dict[Path, Dockerfile]) -> None:
    parsed = dockerfiles[GPT]
    assert parsed.arg_default("BASE") == f"ghcr.io/salamander-dev/salamander-worker:{VERSION}"
    (stage,) = parsed.stages
    (copy,) = stage.all("COPY")
    *sources, dest = copy.operands()
    workdir = dockerfiles[WORKER].stages[-1].last("WORKDIR")
    assert workdir is not None and dest.rstrip("/") == workdir.value
    # every module train.py imports from its own directory is copied with it
    local = {p.stem for p in GPT.parent.glob("*.py")}
    imported = set(re.findall(r"^from (\w+) import|^import (\w+)", (GPT.parent / "train.py").read_text(), re.M))
    assert {name for pair in imported for name in pair if name in local} | {"train"} <= {Path(s).stem for s in sources}


def test_the_cluster_example_runs_the_gpt_image() -> None:
    from salamander.api import parse_manifest

    job = parse_manifest(yaml.safe_load(CLUSTER_EXAMPLE.read_text()))
    assert job.spec.worker.image == f"ghcr.io/salamander-dev/salamander-gpt:{VERSION}-cpu"
    assert job.spec.worker.command == ["python", "train.py"]
    assert job.spec.checkpoint is None, "a checkpoint directory on a cluster needs a shared volume"
    assert job.spec.snapshot is not None
    text = CLUSTER_EXAMPLE.read_text()
    assert f"# image: ghcr.io/salamander-dev/salamander-gpt:{VERSION}\n" in text
    assert "# limits: {nvidia.com/gpu: 1}" in text


def test_the_context_builds_the_package(tmp_path: Path, dockerfiles: dict[Path, Dockerfile]) -> None:
    """What `pip install /src` does in the build stage, from exactly the files the COPY
    instructions put in /src: the wheel has the three packages and both console scripts."""
    if importlib.util.find_spec("setuptools") is None:  # built offline, without build isolation
        pytest.skip("setuptools is not installed in this environment")
    rules = dockerignore_rules()
    root = tmp_path / "image"
    for inst in dockerfiles[OPERATOR].stages[0].all("COPY"):
        *sources, dest = inst.operands()
        for source in sources:
            target = root / dest.lstrip("/")
            origin = REPO / source
            if origin.is_dir():
                for file in origin.rglob("*"):
                    relative = file.relative_to(REPO).as_posix()
                    if file.is_file() and not excluded(relative, rules):
                        out = target / file.relative_to(origin)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, out)
            elif dest.endswith("/"):  # COPY a b /dir/: into the directory
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    wheels = tmp_path / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(wheels), str(root / "src")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("salamander-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("salamander/cli.py", "salamander_operator/kube/main.py", "salamander_worker/agent.py",
                   "salamander/controlplane/v1/controlplane_pb2.py"):
        assert module in names, module
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint() -> None:
    done = subprocess.run(["hadolint", "--failure-threshold", "error", *map(str, CONTEXTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- scripts/kind-e2e.sh ------------------------------------------------------------------------


def test_the_kind_recipe_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(KIND_E2E)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert KIND_E2E.stat().st_mode & 0o111, "scripts/kind-e2e.sh is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_kind_recipe_passes_shellcheck() -> None:
    done = subprocess.run(["shellcheck", str(KIND_E2E)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kind_recipe_builds_what_the_e2e_test_reads() -> None:
    from tests.cluster import test_helm_e2e as e2e

    text = KIND_E2E.read_text()
    for dockerfile in (OPERATOR, WORKER):
        assert f"-f {dockerfile.relative_to(REPO)} " in text
    assert "--build-arg TORCH_INDEX=\"$cpu_index\"" in text and f"cpu_index={CPU_INDEX}\n" in text
    assert f"--build-arg BASE=\"$worker_image\" -t \"$gpt_image\" {GPT.parent.relative_to(REPO)}\n" in text
    assert 'kind load docker-image --name "$cluster" "$operator_image" "$gpt_image"' in text
    for variable, value in (("KUBECONFIG", "kubeconfig"), (e2e.ENV_IMAGE, "gpt_image"),
                            (e2e.ENV_OPERATOR_IMAGE, "operator_image")):
        assert f'export {variable}="${value}"' in text, variable
    assert "pytest tests/cluster" in text


# --- README: the cluster section ----------------------------------------------------------------


def _cluster_section() -> str:
    text = README.read_text()
    start = text.index("## On a Kubernetes cluster\n")
    return text[start:text.index("\n## ", start + 1)]


def _commands(section: str) -> list[str]:
    """The shell commands of the section's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+#\s.*$", "", line))
    return commands


def test_readme_salamander_commands_parse() -> None:
    from salamander import cli

    parser = cli.build_parser()
    commands = []
    for command in _commands(_cluster_section()):
        if command.startswith("salamander "):
            commands.append(command)
        elif " -- salamander " in command:  # the command of a container (kubectl create deployment)
            commands.append(command.split(" -- ", 1)[1])
    assert {c.split()[1] for c in commands} >= {"operator", "rendezvous", "trace"}
    for command in commands:
        words = [w.replace("<", "").replace(">", "") for w in shlex.split(command)[1:]]
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            raise AssertionError(f"README: `{command}` does not parse") from exc


def test_readme_names_files_that_exist() -> None:
    section = _cluster_section()
    commands = _commands(section)
    for command in commands:
        words = shlex.split(command.replace("$REGISTRY", "registry.example.com/ml"))
        if words[:2] == ["docker", "build"]:
            if "-f" in words:
                assert (REPO / words[words.index("-f") + 1]).is_file(), command
            assert (REPO / words[-1]).is_dir(), command
        if words[0] == "kubectl" and words[1] in ("apply", "create", "delete") and "-f" in words:
            manifest = words[words.index("-f") + 1]
            assert manifest == "-" or (REPO / manifest).is_file(), command
        for word in words:
            if word.startswith(("examples/", "charts/", "crds/", "docker/")):
                assert (REPO / word).exists(), command
    for path in re.findall(r"`((?:examples|docker|charts|crds|dashboards|scripts)/[\w./*-]+)`", section):
        assert list(REPO.glob(path.rstrip("/"))), f"README names {path}, which does not exist"
    assert "kubectl apply -f -" in section and "examples/gpt-cluster.yaml" in section


def test_readme_kubectl_get_columns_are_the_crds() -> None:
    from salamander.api.crd import build_crd

    columns = [c["name"].upper() for c in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
               if not c.get("priority")]
    header = next(line for line in _cluster_section().splitlines() if line.startswith("# NAME"))
    assert header[2:].split() == ["NAME", *columns]


@pytest.mark.skipif(not (CHART / "values.yaml").is_file(), reason="charts/salamander is not here")
def test_readme_helm_values_exist_in_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    section = _cluster_section()
    keys = set()
    for command in _commands(section):
        words = shlex.split(command)
        if words[0] == "helm" and words[1] in ("install", "upgrade"):
            if "charts/salamander" not in words:
                continue  # another chart (kube-prometheus-stack)
            keys |= {words[i + 1].split("=", 1)[0] for i, w in enumerate(words) if w in ("--set", "--set-string")}
    keys |= set(re.findall(r"^\| `([\w.]+)`", section, re.M))
    assert keys, "no chart values in the README"
    for key in keys:
        node = values
        for part in key.split("."):
            if part == "labels" and isinstance(node, dict) and part in node:
                node = None  # a free-form map: any label below it
                break
            assert isinstance(node, dict) and part in node, f"README sets {key}, which the chart does not have"
            node = node[part]
