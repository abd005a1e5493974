"""The deploy files (deploy/): parsed, and every command line in them checked against the real CLIs.

No Docker engine or Kubernetes cluster runs here, so nothing is built or started. Instead:
each command line of a container (compose services, their healthchecks, k8s containers, the
Dockerfile's CMD) is parsed by the click command of the console script it names, with
``make_context`` (parsing and option callbacks only; the command never runs), after the
placeholders the orchestrator would fill in are filled in. The PARAMHUB_* variables a container
sets are parsed with it (ps-* read every flag from them) and must each mean an option. The rest
checks what a parse cannot: one worker per shard, probes, volumes, secrets, the Dockerfile's stages.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

import click
import pytest

import yaml  # a dev dependency (pyproject.toml [dev]); without it the deploy files go unchecked, so no skip

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_HOSTNET = DEPLOY / "docker-compose.hostnet.yml"
COMPOSE_PORTS = DEPLOY / "docker-compose.ports.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"


# The console scripts of pyproject.toml that a container may run.
CONSOLE_SCRIPTS = {
    "ps-server": "paramhub.ps.cli:main",
    "ps-worker": "paramhub.worker.cli:main",
    "ps-eval": "paramhub.worker.eval_cli:main",
    "ps-data": "paramhub.tools.data:main",
    "ps-ctl": "paramhub.tools.ctl:main",
}

# PARAMHUB_* variables the deploy sets on purpose although the command does not read them (yet).
# Each one is a gap in a CLI, reported as an expected failure with its consequence, not hidden.
# (program, variable) pairs a deploy file sets that the program does not read yet, with why.
KNOWN_GAPS: dict[tuple[str, str], str] = {}

# Claims the manifests use but do not create: the data, which the user provides (deploy/README.md).
EXTERNAL_CLAIMS = {"paramhub-data"}

# Options whose value is a path inside the container: it must lie on a mounted volume.
PATH_OPTIONS = ("data", "out", "checkpoint_dir", "init_from")
WRITTEN_OPTIONS = ("out", "checkpoint_dir")


# -- command lines ----------------------------------------------------------------------------------

@dataclass
class CommandLine:
    """One command line of a deploy file, with what the orchestrator gives it."""

    source: str                     # "compose", "k8s" or "docker": which placeholders it may hold
    where: str                      # e.g. "compose service worker-0"
    argv: list                      # as written, placeholders and all
    env: dict = field(default_factory=dict)   # the container's environment
    check_env: bool = True          # False for a healthcheck: it inherits the container's variables


def load_command(prog: str) -> click.Command:
    """The click command behind a console script; a deploy file naming one that does not import fails."""
    assert prog in CONSOLE_SCRIPTS, f"{prog!r} is not one of paramhub's console scripts {sorted(CONSOLE_SCRIPTS)}"
    module, _, name = CONSOLE_SCRIPTS[prog].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{prog} ({CONSOLE_SCRIPTS[prog]}) does not import: {exc}")


def option_envvars(command: click.Command, ctx: click.Context) -> set[str]:
    """The environment variables the command reads its options from."""
    names = set()
    for param in command.params:
        if isinstance(param, click.Option):
            if param.envvar:
                names.update([param.envvar] if isinstance(param.envvar, str) else param.envvar)
            elif ctx.auto_envvar_prefix:  # click's rule: PREFIX_ + the option's name in upper case
                names.add(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return names


def parse_command_line(line: CommandLine, monkeypatch) -> tuple[str, click.Context, set[str]]:
    """Parses the command line, placeholders filled in, as its console script would, without running it.

    Returns the program, the context of the (sub)command that would run (None after --help), and
    the PARAMHUB_* variables of the container that no option reads.
    """
    argv, env = filled(line)
    for name in list(os.environ):
        if name.startswith("PARAMHUB_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prog, args = argv[0], argv[1:]
    command = load_command(prog)
    read = set()
    try:
        ctx = command.make_context(prog, list(args), resilient_parsing=False)
        read |= option_envvars(command, ctx)
        while isinstance(command, click.Group):
            # click 8.2 keeps the subcommand's words in _protected_args (protected_args is deprecated).
            rest = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
            assert rest, f"{line.where}: `{' '.join(argv)}` names no {prog} subcommand"
            if rest[0] not in command.list_commands(ctx):
                pytest.fail(f"{line.where}: `{' '.join(argv)}` names {prog} {rest[0]!r}, which is not one of its "
                            f"commands ({', '.join(command.list_commands(ctx))})")
            name, command, sub_args = command.resolve_command(ctx, rest)
            ctx = command.make_context(name, sub_args, parent=ctx, resilient_parsing=False)
            read |= option_envvars(command, ctx)
    except click.exceptions.Exit as exc:  # --help: printed, and valid
        assert exc.exit_code == 0, f"{line.where}: `{' '.join(argv)}` exits {exc.exit_code}"
        return prog, None, set()
    except click.UsageError as exc:
        pytest.fail(f"{line.where}: `{' '.join(argv)}` is not a valid {prog} command line: {exc.format_message()}")
    unread = {name for name in line.env if name.startswith("PARAMHUB_")} - read
    return prog, ctx, unread


# -- placeholders ---------------------------------------------------------------------------------

COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
K8S_VARIABLE = re.compile(r"\$\((\w+)\)")


def compose_fill(text: str, where: str) -> str:
    """``${VAR:-default}`` → default, as compose does without a .env; a variable without one fails."""
    def value(match):
        name, op, default = match.groups()
        assert op in ("-", ":-"), (f"{where}: ${{{name}}} has no default, so the file does not work without "
                                   f"a .env; write ${{{name}:-value}}")
        return default
    return COMPOSE_VARIABLE.sub(value, text)


def k8s_fill(text: str, env: dict, where: str) -> str:
    """``$(VAR)`` → a value: Kubernetes expands it only for a variable of the container's env."""
    def value(match):
        name = match.group(1)
        assert name in env, (f"{where}: $({name}) is not in the container's env, so Kubernetes passes it "
                             f"literally instead of expanding it")
        return env[name]
    return K8S_VARIABLE.sub(value, text)


def filled(line: CommandLine) -> tuple[list[str], dict]:
    """The argv and the environment the process would get."""
    if line.source == "compose":
        return ([compose_fill(arg, line.where) for arg in line.argv],
                {name: compose_fill(value, line.where) for name, value in line.env.items()})
    if line.source == "k8s":
        return [k8s_fill(arg, line.env, line.where) for arg in line.argv], dict(line.env)
    return list(line.argv), dict(line.env)


# -- files ------------------------------------------------------------------------------------------

def load_yaml(path: pathlib.Path):
    return yaml.safe_load(path.read_text())


INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continued lines joined."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continued lines too
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_cmd() -> list[str]:
    cmds = [json.loads(args) for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    return cmds[-1] if cmds else []


def compose_env(service: dict) -> dict:
    """A service's environment as a dict (compose allows a mapping or a list of NAME=value)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def k8s_documents(root: pathlib.Path = K8S) -> list[dict]:
    """Every manifest that root's kustomization.yaml lists, in order; a listed directory is a kustomization too."""
    docs = []
    for resource in load_yaml(root / "kustomization.yaml")["resources"]:
        path = root / resource
        if path.is_dir():
            docs += k8s_documents(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def pod_specs(docs: list[dict]):
    """(workload, pod spec) for every workload among the manifests."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield doc, doc["spec"]["template"]["spec"]


def container_env(container: dict) -> dict:
    """A container's env with values filled in: the literal value, or a stand-in for a reference."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var["name"] == "JOB_COMPLETION_INDEX":
            env[var["name"]] = "0"
        else:
            env[var["name"]] = "from-a-reference"
    return env


def command_lines() -> list:
    """Every command line in the deploy files, as pytest params."""
    lines = [CommandLine("docker", "Dockerfile CMD", dockerfile_cmd())]
    compose = load_yaml(COMPOSE)
    for name, service in compose["services"].items():
        where, env = f"compose service {name}", compose_env(service)
        lines.append(CommandLine("compose", where, service["command"], env))
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            argv = test[1:] if test[0] == "CMD" else shlex.split(test[1] if isinstance(test, list) else test)
            lines.append(CommandLine("compose", f"{where} healthcheck", argv, env, check_env=False))
    # The GPU override changes the environment of services whose command comes from the base file.
    for name, service in load_yaml(COMPOSE_GPU)["services"].items():
        base = compose["services"].get(name, {})
        argv = service.get("command") or base.get("command")
        lines.append(CommandLine("compose", f"compose GPU override {name}", argv,
                                 {**compose_env(base), **compose_env(service)}))
    for workload, spec in pod_specs(k8s_documents()):
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"k8s {workload['kind']}/{workload['metadata']['name']} container {container['name']}"
            lines.append(CommandLine("k8s", where, container.get("command", []) + container.get("args", []),
                                     container_env(container)))
    return [pytest.param(line, id=line.where) for line in lines]


@pytest.mark.parametrize("line", command_lines())
def test_command_line_is_valid(line, monkeypatch):
    """Each command parses with its console script, and each PARAMHUB_* variable it gets is an option."""
    assert line.argv, f"{line.where}: no command (the image has no ENTRYPOINT, so the command must be given)"
    # Compose and Kubernetes want strings: `args: [--workers, 4]` fails `kubectl apply`.
    assert all(isinstance(arg, str) for arg in line.argv), f"{line.where}: quote every word: {line.argv}"
    prog, _, unread = parse_command_line(line, monkeypatch)
    if not line.check_env:
        return
    gaps = {name: KNOWN_GAPS[prog, name] for name in unread if (prog, name) in KNOWN_GAPS}
    unknown = unread - set(gaps)
    assert not unknown, f"{line.where}: {prog} has no option read from {sorted(unknown)}; the variables do nothing"
    if gaps:
        pytest.xfail("; ".join(gaps.values()))


def parsed(line: CommandLine, monkeypatch) -> tuple[str, dict]:
    """(program, parameters) of a command line."""
    prog, ctx, _ = parse_command_line(line, monkeypatch)
    return prog, ctx.params


# -- mounts -----------------------------------------------------------------------------------------

def under(path: str, mounts: dict) -> str | None:
    """The mount point that holds ``path``, if any."""
    for target in mounts:
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target
    return None


def check_paths(where: str, params: dict, mounts: dict) -> None:
    """Every path option lies on a mount; what the process writes is on a writable one.

    ``mounts``: mount point → read-only?
    """
    for name in PATH_OPTIONS:
        value = params.get(name)
        if not isinstance(value, str) or not value.startswith("/"):
            continue  # unset, `synthetic`, or relative
        flag, target = "--" + name.replace("_", "-"), under(value, mounts)
        assert target, f"{where}: {flag} {value} is on no volume (mounts: {sorted(mounts)})"
        if name in WRITTEN_OPTIONS:
            assert not mounts[target], f"{where}: {flag} {value} is on the read-only mount {target}"


# -- docker compose ---------------------------------------------------------------------------------

def compose_mounts(service: dict, where: str) -> dict:
    """Mount point → read-only? for a service's volumes (short or long syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = compose_fill(volume, where).split(":")
            mounts[parts[1]] = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            mounts[volume["target"]] = bool(volume.get("read_only"))
    return mounts


def compose_services_running(compose: dict, prog: str) -> dict:
    return {name: s for name, s in compose["services"].items() if s["command"][0] == prog}


def test_compose_runs_one_worker_per_shard(monkeypatch):
    """Workers take shards 0..N-1, once each, N = the server's --workers, and dial the server."""
    compose = load_yaml(COMPOSE)
    (server_name, server), = compose_services_running(compose, "ps-server").items()
    server_line = CommandLine("compose", f"compose service {server_name}", server["command"])
    _, server_params = parsed(server_line, monkeypatch)
    workers = compose_services_running(compose, "ps-worker")
    assert len(workers) >= 2, "a cluster of one worker shows nothing"
    shards = {}
    for name, service in workers.items():
        _, params = parsed(CommandLine("compose", f"compose service {name}", service["command"]), monkeypatch)
        shards[name] = params["shard"]
        assert params["server"] == f"{server_name}:{server_params['port']}", f"{name} dials {params['server']}"
        assert params["num_shards"] in (None, len(workers)), f"{name}: --num-shards is not the number of workers"
    assert sorted(shards.values()) == list(range(len(workers))), f"shards are not 0..N-1 once each: {shards}"
    assert server_params["workers"] == len(workers), "the server's --workers is not the number of worker services"


def test_compose_server_listens_on_every_interface_with_a_token(monkeypatch):
    """ps-server refuses a non-loopback listener with neither TLS nor a token; --insecure is not the way."""
    compose = load_yaml(COMPOSE)
    (name, server), = compose_services_running(compose, "ps-server").items()
    line = CommandLine("compose", f"compose service {name}", server["command"], compose_env(server))
    _, params = parsed(line, monkeypatch)
    assert params["host"] == "0.0.0.0"
    assert not params["insecure"]
    assert params["token"], "the server gets no token (PARAMHUB_TOKEN)"
    clients = [s for s in compose["services"].values() if s["command"][0] in ("ps-worker", "ps-eval")]
    for service in clients:
        assert compose_env(service).get("PARAMHUB_TOKEN") == compose_env(server)["PARAMHUB_TOKEN"]


def test_compose_clients_wait_for_a_healthy_server():
    """Workers and the evaluator start once the server's health check passes, and that check asks gRPC health."""
    compose = load_yaml(COMPOSE)
    (server_name, server), = compose_services_running(compose, "ps-server").items()
    test = server["healthcheck"]["test"]
    (port,) = [compose_fill(arg, server_name).split("=", 1)[1] for arg in server["command"]
               if arg.startswith("--port=")]
    probed = compose_fill(test[3], server_name)
    assert test[:3] == ["CMD", "ps-ctl", "health"] and probed == f"127.0.0.1:{port}", test
    for name, service in compose["services"].items():
        if name != server_name:
            assert service["depends_on"][server_name]["condition"] == "service_healthy", name


def test_compose_volumes_hold_every_path(monkeypatch):
    """Named volumes are declared; data is read-only; checkpoints and metrics land on a writable volume."""
    compose = load_yaml(COMPOSE)
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        where = f"compose service {name}"
        for volume in service.get("volumes", []):
            source = compose_fill(volume if isinstance(volume, str) else volume["source"], where).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{where}: volume {source!r} is not declared under volumes:"
        mounts = compose_mounts(service, where)
        if "/data" in mounts:
            assert mounts["/data"], f"{where}: the data should be mounted read-only"
        prog, params = parsed(CommandLine("compose", where, service["command"]), monkeypatch)
        check_paths(where, params, mounts)
        if prog == "ps-server":
            assert params["checkpoint_dir"] and params["resume"], "the server should checkpoint and resume"


def test_compose_gpu_override_gives_each_worker_its_own_gpu():
    compose = load_yaml(COMPOSE)
    gpu = load_yaml(COMPOSE_GPU)
    assert set(gpu["services"]) <= set(compose["services"]), "the override names a service the base file lacks"
    workers = compose_services_running(compose, "ps-worker")
    assert set(gpu["services"]) == set(workers), "every worker, and only the workers, should get a GPU"
    seen = set()
    for name, service in gpu["services"].items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        ids = tuple(device["device_ids"])
        assert ids and not seen & set(ids), f"{name}: GPU {ids} is not its own"
        seen |= set(ids)
        build = service["build"]["args"]
        assert build["BASE_IMAGE"].startswith("nvidia/cuda:"), f"{name}: the GPU workers need a CUDA base"
        assert build["TORCH_INDEX"] == "https://pypi.org/simple", f"{name}: PyPI's torch wheels are the CUDA ones"


def test_env_example_lists_the_compose_variables():
    """deploy/.env.example documents exactly the variables the compose files use."""
    used = set()
    for path in (COMPOSE, COMPOSE_GPU, COMPOSE_HOSTNET, COMPOSE_PORTS):
        # In the parsed file, so that the comments' ${VAR:-default} do not count.
        used |= {match.group(1) for match in COMPOSE_VARIABLE.finditer(json.dumps(load_yaml(path)))}
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    documented = {line.split("=", 1)[0] for line in lines}
    assert documented == used, f"only in .env.example: {documented - used}; undocumented: {used - documented}"


def compose_cli() -> list[str] | None:
    """`docker compose` (the CLI plugin) or the standalone docker-compose; None if neither works here."""
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False, timeout=30)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_host_network_override_covers_every_service_and_publishes_nothing(monkeypatch):
    """On the host network every service must be there (no bridge to fall back to), and no port published."""
    compose, hostnet = load_yaml(COMPOSE), load_yaml(COMPOSE_HOSTNET)
    assert set(hostnet["services"]) == set(compose["services"])
    for name, service in hostnet["services"].items():
        assert service["network_mode"] == "host" and "ports" not in service, name
    assert all("ports" not in service for service in compose["services"].values()), \
        "a port in the base file cannot be taken away by the host-network override: publish it in ports.yml"
    (published,) = load_yaml(COMPOSE_PORTS)["services"]["ps-server"]["ports"]
    assert compose_fill(published, "ports.yml").startswith("127.0.0.1:"), "published on loopback only"


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_PORTS],
                                   [COMPOSE, COMPOSE_HOSTNET]],
                         ids=["base", "with-gpu-override", "with-ports", "on-the-host-network"])
def test_compose_config_validates(files):
    """The compose CLI validates and merges the files without a Docker engine."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither the docker CLI's compose plugin nor docker-compose is installed here")
    env = {name: value for name, value in os.environ.items() if name.startswith(("PATH", "HOME", "LANG"))}
    args = [*cli, "--project-directory", str(DEPLOY)]
    for path in files:
        args += ["-f", str(path)]
    result = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


# -- Kubernetes -------------------------------------------------------------------------------------

def k8s_workload(docs: list[dict], kind: str, prog: str) -> tuple[dict, dict]:
    """The one workload of ``kind`` whose container runs ``prog``, and that container."""
    found = [(doc, c) for doc, spec in pod_specs(docs) if doc["kind"] == kind
             for c in spec["containers"] if c["command"][0] == prog]
    assert len(found) == 1, f"expected one {kind} running {prog}, found {len(found)}"
    return found[0]


def k8s_line(doc: dict, container: dict) -> CommandLine:
    return CommandLine("k8s", f"k8s {doc['kind']}/{doc['metadata']['name']} container {container['name']}",
                       container["command"] + container.get("args", []), container_env(container))


def k8s_mounts(container: dict) -> dict:
    return {m["mountPath"]: bool(m.get("readOnly")) for m in container.get("volumeMounts", [])}


def test_kustomization_lists_every_manifest():
    """Every manifest and every part of its own (secret/) is listed; jobset/ is the alternative, never a part."""
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    present |= {path.parent.name for path in K8S.glob("*/kustomization.yaml")} - {"jobset"}
    assert listed == present, f"not listed: {present - listed}; missing: {listed - present}"
    assert "jobset" not in listed, "the JobSet runs the same workloads: apply one or the other"


def test_k8s_workers_are_an_indexed_job_over_the_shards(monkeypatch):
    """completions = parallelism = N = the server's --workers; pod i trains shard JOB_COMPLETION_INDEX = i."""
    docs = k8s_documents()
    _, server_params = parsed(k8s_line(*k8s_workload(docs, "StatefulSet", "ps-server")), monkeypatch)
    job, worker = k8s_workload(docs, "Job", "ps-worker")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == server_params["workers"]
    assert spec["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    shard_args = [arg for arg in worker["args"] if arg.startswith("--shard")]
    assert shard_args in (["--shard=$(JOB_COMPLETION_INDEX)"], ["--shard"]), shard_args
    if shard_args == ["--shard"]:
        assert worker["args"][worker["args"].index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)"
    (index,) = [var for var in worker["env"] if var["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    line = k8s_line(job, worker)
    for shard in range(spec["completions"]):
        line.env["JOB_COMPLETION_INDEX"] = str(shard)
        _, params = parsed(line, monkeypatch)
        assert params["shard"] == shard
        assert params["num_shards"] in (None, spec["completions"])
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    server_services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    host, _, port = params["server"].rpartition(":")
    assert host in server_services and int(port) == server_params["port"], params["server"]


def test_k8s_server_is_a_resuming_statefulset_with_grpc_probes(monkeypatch):
    docs = k8s_documents()
    statefulset, container = k8s_workload(docs, "StatefulSet", "ps-server")
    _, params = parsed(k8s_line(statefulset, container), monkeypatch)
    assert statefulset["spec"]["replicas"] == 1
    assert params["host"] == "0.0.0.0" and params["token"] and not params["insecure"]
    assert params["resume"] and params["checkpoint_dir"]
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in container["volumeMounts"] if under(params["checkpoint_dir"], {m["mountPath"]: 0})]
    assert mount["name"] in claims, "the checkpoints should be on the StatefulSet's own claim"
    ports = {p["containerPort"] for p in container["ports"]}
    assert params["port"] in ports
    assert container["readinessProbe"]["grpc"]["port"] == params["port"], "readiness: native gRPC on the server port"
    assert "livenessProbe" in container
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container and "grpc" in container[probe]:
            assert container[probe]["grpc"]["port"] in ports
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services.get(statefulset["spec"]["serviceName"])
    assert headless and headless["spec"]["clusterIP"] == "None", "serviceName should be a headless Service"


def test_k8s_services_reach_the_server():
    docs = k8s_documents()
    statefulset, container = k8s_workload(docs, "StatefulSet", "ps-server")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["spec"].get("clusterIP") == "None" for s in services} == {True, False}, "a headless and a normal one"
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), f"{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: no port {target}"


def test_k8s_eval_is_one_job_that_completes_with_the_run(monkeypatch):
    # ps-eval exits 0 after the final version: a Deployment would restart it, a Job completes.
    job, container = k8s_workload(k8s_documents(), "Job", "ps-eval")
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 1
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    _, params = parsed(k8s_line(job, container), monkeypatch)
    assert params["out"] and params["checkpoint_dir"]


def test_k8s_volumes_and_secrets_exist(monkeypatch):
    """Every mount has a volume, every claim and secret exists, every path option lies on a mount."""
    docs = k8s_documents()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"} | EXTERNAL_CLAIMS
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for d in docs if d["kind"] == "Secret"}
    readme = (DEPLOY / "README.md").read_text()
    for claim in EXTERNAL_CLAIMS:
        assert claim in readme, f"deploy/README.md should say how to make the claim {claim}"
    for workload, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])})
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        for container in spec["containers"]:
            line = k8s_line(workload, container)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{line.where}: no volume {mount['name']}"
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), f"{line.where}: no secret {ref}"
            _, params = parsed(line, monkeypatch)
            check_paths(line.where, params, k8s_mounts(container))


def test_kustomize_builds():
    """kubectl's built-in kustomize renders the manifests (no cluster needed)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed here")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(k8s_documents())
    images = {c["image"] for _, spec in pod_specs(rendered) for c in spec["containers"]}
    assert len(images) == 1 and ":" in images.pop(), "kustomization.yaml should set the image and its tag"


# -- Dockerfile -------------------------------------------------------------------------------------

def test_dockerfile_parses():
    """Known instructions; one stage, FROM the BASE_IMAGE argument (python:3.11-slim by default)."""
    instructions = dockerfile_instructions()
    unknown = {keyword for keyword, _ in instructions} - INSTRUCTIONS
    assert not unknown, f"unknown Dockerfile instructions: {unknown}"
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, so that the classic builder builds only what BuildKit would"
    first_from = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    global_args = dict(arg.split("=", 1) if "=" in arg else (arg, "") for keyword, arg in instructions[:first_from]
                       if keyword == "ARG")
    assert global_args.get("BASE_IMAGE") == "python:3.11-slim", "the CPU image on python:3.11-slim by default"


def test_dockerfile_image_is_unprivileged_and_has_no_entrypoint():
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final_stage = instructions[last_from:]
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image should run as a non-root user"
    assert all(keyword != "ENTRYPOINT" for keyword, _ in instructions), "the command comes from compose or k8s"


def test_dockerfile_installs_torch_then_the_project():
    """torch from TORCH_INDEX (the CPU wheels by default), then paramhub itself."""
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu", "CPU wheels unless told otherwise"
    runs = [arg for keyword, arg in instructions if keyword == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if "pip install --index-url ${TORCH_INDEX} ${TORCH_PAIR}" in run)
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run))
    assert torch_at < project_at, "torch first (the slow layer), then `pip install .`"


def test_dockerfile_copies_what_exists_and_is_not_ignored():
    """Each COPY source exists in the build context (the repository root) and .dockerignore keeps it."""
    patterns = [line.strip().lstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def kept(path: str) -> bool:  # the last pattern that matches decides; `!` keeps
        verdict = True
        for pattern in patterns:
            negated, glob = pattern.startswith("!"), pattern.lstrip("!")
            if pathlib.PurePath(path).match(glob) or path.startswith(glob + "/"):
                verdict = negated
        return verdict

    assert not kept(".git") and not kept("tests/test_deploy.py") and not kept("build/image/wheelhouse")
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        sources = [word for word in args.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
            assert kept(source), f"COPY {source}: .dockerignore drops it"


# -- Makefile and READMEs ---------------------------------------------------------------------------

def test_makefile_brings_the_cluster_up_and_down():
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE).group(1).split()
    for target in ("cluster-up", "cluster-down"):
        assert target in phony and re.search(rf"^{target}:", makefile, re.MULTILINE), target
    assert "deploy/docker-compose.yml" in makefile
