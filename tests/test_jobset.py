"""deploy/k8s/jobset/: the JobSet manifest against the vendored JobSet CRD's schema, and what it promises.

No cluster runs here. The manifest is rendered as `kubectl apply -k` would (`kubectl kustomize`, or
the files themselves without kubectl) and validated against the openAPIV3Schema of the CRD in
deploy/k8s/jobset/crd/, translated to a JSON Schema that rejects what the API server would reject
or silently drop (an unknown field, a wrong type). Then the semantics: partition k of M servers at
the hostname JobSet gives it, workers on shards 0..N-1 from their completion index, N written once,
a worker's failure handled without restarting the servers. Command lines are parsed by the real
CLIs (tests/test_deploy.py's machinery).
"""

from __future__ import annotations

import copy
import hashlib
import pathlib
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from test_deploy import CommandLine, check_paths, k8s_fill, k8s_mounts, parse_command_line

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
JOBSET_DIR = K8S / "jobset"
CRD = JOBSET_DIR / "crd" / "jobset.x-k8s.io_jobsets.yaml"

# The vendored release (deploy/k8s/jobset/crd/README.md); the sha256 is that of the upstream file.
JOBSET_VERSION = "v0.12.0"
JOBSET_COMMIT = "f22e565ac3cc3265c7c45ef67ecffdc689af5d77"
CRD_SHA256 = "d022b87624512cf0b6741b31b24a2bea9945b5a838b50713af29332c878bb6fe"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 800 kB: 0.1 s with libyaml, 1.2 s without

# Job failure reasons a failure policy rule may match on (batch/v1 Job conditions).
JOB_FAILURE_REASONS = ("BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy", "FailedIndexes",
                       "MaxFailedIndexesExceeded")
RESTARTS_EVERY_JOB = ("RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts")


# -- the CRD's schema as a JSON Schema --------------------------------------------------------------

# Keywords of a structural schema this translation knows; anything else fails rather than being ignored.
JSON_SCHEMA_KEYWORDS = {"type", "properties", "required", "items", "additionalProperties", "enum", "pattern",
                        "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                        "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties",
                        "maxProperties", "anyOf", "allOf", "oneOf", "not"}
DROPPED_KEYWORDS = {"description", "default", "example", "title", "x-kubernetes-validations",  # CEL: not run here
                    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",  # checked by list_key_errors
                    "x-kubernetes-map-type"}


def to_json_schema(node: dict) -> dict:
    """A Kubernetes openAPIV3Schema node as a JSON Schema (draft 4, as OpenAPI 3.0 is).

    - ``x-kubernetes-int-or-string``: an integer or a string (anyOf), whatever ``type`` says.
    - ``nullable``: null is allowed too.
    - an object with ``properties`` and no ``x-kubernetes-preserve-unknown-fields``: no other keys
      (``additionalProperties: false``). The API server prunes unknown fields of such an object, and
      kubectl's default strict field validation rejects them: either way a typo must not pass.
    - CEL rules (``x-kubernetes-validations``) are not evaluated; list keys are checked by ``list_key_errors``.
    """
    unknown = set(node) - JSON_SCHEMA_KEYWORDS - DROPPED_KEYWORDS - {
        "nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-embedded-resource"}
    if unknown:
        raise ValueError(f"openAPIV3Schema keywords this translation does not know: {sorted(unknown)}")
    out = {key: value for key, value in node.items() if key in JSON_SCHEMA_KEYWORDS}
    if "properties" in out:
        out["properties"] = {name: to_json_schema(child) for name, child in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [to_json_schema(child) for child in out[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        # An embedded object carries apiVersion, kind and metadata whether or not the schema lists them.
        out.setdefault("properties", {}).update(
            {key: out.get("properties", {}).get(key, {"type": kind}) for key, kind in
             (("apiVersion", "string"), ("kind", "string"), ("metadata", "object"))})
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
        if "enum" in node:
            out["enum"] = [*node["enum"], None]
    return out


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


def list_key_errors(schema: dict, value, path: str = "") -> list[str]:
    """Duplicates in lists the schema calls a map (unique by x-kubernetes-list-map-keys) or a set."""
    errors = []
    if isinstance(value, dict):
        properties, rest = schema.get("properties", {}), schema.get("additionalProperties")
        for key, child in value.items():
            sub = properties.get(key, rest if isinstance(rest, dict) else None)
            if sub is not None:
                errors += list_key_errors(sub, child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        kind, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) if kind == "map" and isinstance(item, dict) else repr(item)
                for item in value] if kind in ("map", "set") else []
        errors += [f"{path}: duplicate {dict(zip(keys, key)) if kind == 'map' else key}"
                   for key in {key for key in seen if seen.count(key) > 1}]
        for i, item in enumerate(value):
            errors += list_key_errors(schema["items"], item, f"{path}[{i}]")
    return errors


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.load(CRD.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def validate(crd):
    """A function: a JobSet document → the list of what the API server would refuse in it (empty: valid)."""
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    structural = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(to_json_schema(structural), format_checker=FORMATS)
    api_version = f"{crd['spec']['group']}/{version['name']}"

    def errors(doc: dict) -> list[str]:
        found = [] if (doc.get("apiVersion"), doc.get("kind")) == (api_version, crd["spec"]["names"]["kind"]) \
            else [f"not a {api_version} {crd['spec']['names']['kind']}"]
        found += [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
        return found + list_key_errors(structural, doc)
    return errors


# -- rendering --------------------------------------------------------------------------------------

def kustomize(directory: pathlib.Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def documents_of(directory: pathlib.Path) -> list[dict]:
    """The documents a kustomization lists, read as files (without kubectl: no replacements, no image tag)."""
    docs = []
    for resource in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]:
        path = directory / resource
        docs += documents_of(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    """What `kubectl apply -k deploy/k8s/jobset` would send."""
    return kustomize(JOBSET_DIR) if shutil.which("kubectl") else documents_of(JOBSET_DIR)


@pytest.fixture(scope="module")
def jobset(rendered) -> dict:
    (doc,) = [d for d in rendered if d["kind"] == "JobSet"]
    return doc


def replicated(jobset: dict, name: str) -> dict:
    (rjob,) = [r for r in jobset["spec"]["replicatedJobs"] if r["name"] == name]
    return rjob


def container_of(rjob: dict, prog: str) -> dict:
    (container,) = [c for c in rjob["template"]["spec"]["template"]["spec"]["containers"] if c["command"][0] == prog]
    return container


FIELD_REF = re.compile(r"metadata\.annotations\['([^']+)'\]")


def pod_env(container: dict, annotations: dict) -> dict:
    """The container's environment as its pod would get it: the downward API's annotations filled in,
    ``$(VAR)`` in values expanded from the variables above it, as Kubernetes does; secrets stood in for."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = k8s_fill(str(var["value"]), env, f"env {var['name']}")
        elif "fieldRef" in var.get("valueFrom", {}):
            match = FIELD_REF.fullmatch(var["valueFrom"]["fieldRef"]["fieldPath"])
            assert match and match.group(1) in annotations, f"{var['name']}: no pod annotation {var['valueFrom']}"
            env[var["name"]] = annotations[match.group(1)]
        else:
            env[var["name"]] = "from-a-reference"
    return env


def pod_annotations(job_index: int, pod_index: int) -> dict:
    """The annotations JobSet (job index) and the Indexed Job (completion index) put on a pod."""
    return {"jobset.sigs.k8s.io/job-index": str(job_index),
            "batch.kubernetes.io/job-completion-index": str(pod_index)}


def run_params(jobset: dict, rjob_name: str, prog: str, monkeypatch, job_index=0, pod_index=0) -> dict:
    """The parameters the CLI of pod (job_index, pod_index) of a replicatedJob parses from its command line."""
    container = container_of(replicated(jobset, rjob_name), prog)
    line = CommandLine("k8s", f"JobSet {rjob_name} {job_index}-{pod_index} {container['name']}",
                       container["command"] + container.get("args", []),
                       pod_env(container, pod_annotations(job_index, pod_index)))
    _, ctx, unread = parse_command_line(line, monkeypatch)
    assert not unread, f"{line.where}: {prog} reads no option from {sorted(unread)}"
    return ctx.params


def pod_hostname(jobset: dict, rjob: str, job_index: int, pod_index: int) -> str:
    """JobSet's name for a pod with enableDNSHostnames: <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>."""
    subdomain = jobset["spec"]["network"].get("subdomain") or jobset["metadata"]["name"]
    return f"{jobset['metadata']['name']}-{rjob}-{job_index}-{pod_index}.{subdomain}"


# -- the vendored CRD -------------------------------------------------------------------------------

def test_crd_is_the_recorded_release_unmodified():
    text = CRD.read_text()
    header, _, body = text.partition("---\n")
    assert JOBSET_VERSION in header and JOBSET_COMMIT in header and "Apache License" in header
    assert all(line.startswith("#") for line in header.splitlines()), "only comments above the upstream file"
    assert hashlib.sha256(("---\n" + body).encode()).hexdigest() == CRD_SHA256, "the vendored CRD was changed"
    readme = (CRD.parent / "README.md").read_text()
    assert JOBSET_VERSION in readme and JOBSET_COMMIT in readme and CRD_SHA256 in readme


# -- the translation, on its own --------------------------------------------------------------------

def accepts(structural: dict, value) -> bool:
    return jsonschema.Draft4Validator(to_json_schema(structural), format_checker=FORMATS).is_valid(value)


def test_translation_of_kubernetes_extensions():
    int_or_string = {"x-kubernetes-int-or-string": True}
    assert accepts(int_or_string, 8080) and accepts(int_or_string, "grpc")
    assert not accepts(int_or_string, 1.5) and not accepts(int_or_string, ["grpc"])
    closed = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert accepts(closed, {"a": 1}) and not accepts(closed, {"a": 1, "b": 2}), "unknown fields fail"
    assert accepts({**closed, "x-kubernetes-preserve-unknown-fields": True}, {"a": 1, "b": 2})
    assert not accepts(closed, {"a": None}) and accepts({"type": "integer", "nullable": True}, None)
    assert not accepts({"type": "integer", "format": "int32"}, 2**31)
    assert accepts({"type": "integer", "format": "int32"}, 2**31 - 1)
    with pytest.raises(ValueError, match="does not know"):
        to_json_schema({"type": "string", "x-kubernetes-something-new": True})
    names = {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
             "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
    assert not list_key_errors(names, [{"name": "a"}, {"name": "b"}])
    assert list_key_errors(names, [{"name": "a"}, {"name": "a"}])


# -- the manifest against the schema ----------------------------------------------------------------

def test_rendered_jobset_matches_the_crd(rendered, jobset, validate):
    assert sorted(d["kind"] for d in rendered) == ["JobSet", "PersistentVolumeClaim", "PersistentVolumeClaim",
                                                  "Secret"], "the JobSet, its two volumes and the token"
    assert validate(jobset) == []


def rename(doc: dict, path: tuple, new: str) -> None:
    *parents, last = path
    node = doc
    for key in parents:
        node = node[key]
    node[new] = node.pop(last)


def put(doc: dict, path: tuple, value) -> None:
    *parents, last = path
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value


POD = ("spec", "replicatedJobs", 1, "template", "spec", "template", "spec")

BROKEN = {
    "replicatedJob instead of replicatedJobs": lambda d: rename(d, ("spec", "replicatedJobs"), "replicatedJob"),
    "failurPolicy": lambda d: rename(d, ("spec", "failurePolicy"), "failurPolicy"),
    "a typo deep in a container": lambda d: rename(d, (*POD, "containers", 0, "volumeMounts"), "volumeMount"),
    "replicas as a string": lambda d: put(d, ("spec", "replicatedJobs", 0, "replicas"), "1"),
    "completions beyond int32": lambda d: put(d, ("spec", "replicatedJobs", 1, "template", "spec", "completions"),
                                              2**31),
    "an action JobSet does not have": lambda d: put(d, ("spec", "failurePolicy", "rules", 0, "action"), "Ignore"),
    "a rule without a name": lambda d: d["spec"]["failurePolicy"]["rules"][0].pop("name"),
    "a quantity that is a list": lambda d: put(d, (*POD, "containers", 0, "resources", "limits", "memory"), ["32Gi"]),
    "two env variables of one name": lambda d: d["spec"]["replicatedJobs"][1]["template"]["spec"]["template"][
        "spec"]["containers"][0]["env"].append({"name": "PARAMHUB_TOKEN", "value": "x"}),
    "another API version": lambda d: put(d, ("apiVersion",), "jobset.x-k8s.io/v1alpha1"),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_schema_rejects_a_broken_jobset(jobset, validate, breakage):
    """Negative controls: each breakage, alone, is refused."""
    broken = copy.deepcopy(jobset)
    BROKEN[breakage](broken)
    assert validate(broken), f"{breakage}: accepted"


DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def test_what_the_jobset_webhook_checks(jobset):
    """Beyond the schema, JobSet's admission webhook refuses: Job and pod names that are not DNS-1035
    labels, a dependsOn on the first replicatedJob or on a later one, a subdomain that is no DNS label."""
    name, seen = jobset["metadata"]["name"], []
    assert DNS_1035_LABEL.fullmatch(jobset["spec"]["network"]["subdomain"])
    for i, rjob in enumerate(jobset["spec"]["replicatedJobs"]):
        spec = rjob["template"]["spec"]
        last_job = f"{name}-{rjob['name']}-{rjob.get('replicas', 1) - 1}"
        longest_pod = f"{last_job}-{spec['completions'] - 1}-abcde"  # JobSet's own check: a 5-character suffix
        assert DNS_1035_LABEL.fullmatch(last_job) and DNS_1035_LABEL.fullmatch(longest_pod), longest_pod
        depends = rjob.get("dependsOn", [])
        assert not (i == 0 and depends) and len(depends) <= 1, f"{rjob['name']}: dependsOn"
        assert all(d["name"] in seen for d in depends), f"{rjob['name']} depends on a later replicatedJob"
        seen.append(rjob["name"])
    assert "startupPolicy" not in jobset["spec"], "startupPolicy (deprecated) and dependsOn exclude each other"


def test_quantities_may_be_numbers_or_strings(jobset, validate):
    """int-or-string: `cpu: 8` and `cpu: "8"` are both valid (positive control of the translation)."""
    for value in (8, "8", "8000m"):
        variant = copy.deepcopy(jobset)
        put(variant, (*POD, "containers", 0, "resources", "requests", "cpu"), value)
        assert validate(variant) == [], value


# -- what the manifest promises ---------------------------------------------------------------------

def partitions(jobset: dict) -> int:
    """M: one Job per server partition, one pod each."""
    server = replicated(jobset, "server")
    assert server["template"]["spec"]["completions"] == server["template"]["spec"]["parallelism"] == 1
    return server["replicas"]


def with_partitions(jobset: dict, m: int) -> dict:
    """The JobSet changed for M server partitions as deploy/README.md says: the servers'
    replicas, the /M of PARAMHUB_PARTITION, every partition in the workers' --server; no evaluator."""
    changed = copy.deepcopy(jobset)
    replicated(changed, "server")["replicas"] = m
    (var,) = [v for v in container_of(replicated(changed, "server"), "ps-server")["env"]
              if v["name"] == "PARAMHUB_PARTITION"]
    assert var["value"].endswith("/1")
    var["value"] = var["value"][:-1] + str(m)
    args = container_of(replicated(changed, "workers"), "ps-worker")["args"]
    (i,) = [i for i, arg in enumerate(args) if arg.startswith("--server=")]
    port = args[i].rpartition(":")[2]
    args[i] = "--server=" + ",".join(f"{pod_hostname(changed, 'server', k, 0)}:{port}" for k in range(m))
    spec = changed["spec"]
    spec["replicatedJobs"] = [r for r in spec["replicatedJobs"] if r["name"] != "evaluator"]
    spec["successPolicy"]["targetReplicatedJobs"].remove("evaluator")
    spec["failurePolicy"]["rules"] = [r for r in spec["failurePolicy"]["rules"]
                                      if r["targetReplicatedJobs"] != ["evaluator"]]
    return changed


@pytest.mark.parametrize("m", [1, 3], ids=["as-shipped", "three-partitions"])
def test_server_partitions_know_their_index_and_resume(rendered, jobset, validate, monkeypatch, m):
    """Server k of M holds partition k/M (JobSet's job index), in a checkpoint directory of its own."""
    jobset = jobset if m == 1 else with_partitions(jobset, m)
    assert validate(jobset) == [] and partitions(jobset) == m
    server = replicated(jobset, "server")
    container = container_of(server, "ps-server")
    volumes = {v["name"]: v for v in server["template"]["spec"]["template"]["spec"]["volumes"]}
    claims = {d["metadata"]["name"] for d in rendered if d["kind"] == "PersistentVolumeClaim"}
    dirs = set()
    for k in range(m):
        params = run_params(jobset, "server", "ps-server", monkeypatch, job_index=k)
        assert params["partition"] == (k, m), f"partition {k} of {m} starts as {params['partition']}"
        assert params["host"] == "0.0.0.0" and params["token"] and not params["insecure"]
        assert params["resume"] and params["linger"], "--resume after a restart; --linger: no completion of its own"
        mount = next(mt for mt in container["volumeMounts"] if params["checkpoint_dir"].startswith(mt["mountPath"]))
        assert not mount.get("readOnly")
        # A claim of the kustomization, which no Job owns: it outlives the Jobs, and a RestartJobSet.
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
        dirs.add(params["checkpoint_dir"])
    assert len(dirs) == m, "each partition checkpoints to a directory of its own"
    spec = server["template"]["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "OnFailure", "a crash restarts in place, and resumes"
    assert spec["backoffLimit"] >= 1
    assert spec["podReplacementPolicy"] == "Failed", "never two servers on one checkpoint directory"


def test_workers_and_evaluator_dial_the_hostnames_jobset_gives(jobset, monkeypatch):
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    m = partitions(jobset)
    port = run_params(jobset, "server", "ps-server", monkeypatch)["port"]
    expected = [f"{pod_hostname(jobset, 'server', k, 0)}:{port}" for k in range(m)]
    assert all(len(host.split(".")[0]) <= 63 for host in expected), "a hostname is one DNS label"
    worker = run_params(jobset, "workers", "ps-worker", monkeypatch)
    assert [a.strip() for a in worker["server"].split(",")] == expected, "partition k's address, k = 0..M-1, in order"
    evaluator = run_params(jobset, "evaluator", "ps-eval", monkeypatch)
    # ps-eval dials one server, so an evaluator needs M = 1.
    assert m == 1 and evaluator["server"] == expected[0]


def test_workers_are_an_indexed_job_over_the_shards(jobset, monkeypatch):
    """Pod i trains shard i = JOB_COMPLETION_INDEX; completions = parallelism = N = the server's --workers."""
    spec = replicated(jobset, "workers")["template"]["spec"]
    n = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == n
    assert replicated(jobset, "workers")["replicas"] == 1, "one Indexed Job: N shards, one index each"
    assert run_params(jobset, "server", "ps-server", monkeypatch)["workers"] == n
    container = container_of(replicated(jobset, "workers"), "ps-worker")
    (index,) = [v for v in container["env"] if v["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    shards = [run_params(jobset, "workers", "ps-worker", monkeypatch, pod_index=i) for i in range(n)]
    assert [p["shard"] for p in shards] == list(range(n))
    assert {p["num_shards"] for p in shards} <= {None, n}
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"


def failure_action(jobset: dict, rjob: str, reason: str) -> str:
    """What JobSet does when a Job of ``rjob`` fails for ``reason``: the first matching rule's action,
    else RestartJobSet (JobSet's documented default)."""
    for rule in (jobset["spec"].get("failurePolicy") or {}).get("rules", []):
        if rule.get("targetReplicatedJobs") and rjob not in rule["targetReplicatedJobs"]:
            continue
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        return rule["action"]
    return "RestartJobSet"


def test_a_worker_failure_never_restarts_the_servers(jobset):
    """A worker pod's crash is retried by its own Job, per index; a failed worker Job does not recreate the servers."""
    spec = replicated(jobset, "workers")["template"]["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never", "backoffLimitPerIndex requires Never"
    assert spec["backoffLimitPerIndex"] >= 1, "a crashed worker gets a new pod for its shard"
    assert "maxFailedIndexes" not in spec or spec["maxFailedIndexes"] >= 1
    assert spec["podReplacementPolicy"] == "Failed", "never two workers of one name and shard at once"
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    assert {"type": "DisruptionTarget"} in [c for r in rules if r["action"] == "Ignore" for c in r["onPodConditions"]]
    assert all(r["action"] != "FailJob" for r in rules), "no pod failure should fail all the shards at once"
    for rjob in ("workers", "evaluator"):
        for reason in JOB_FAILURE_REASONS:
            assert failure_action(jobset, rjob, reason) not in RESTARTS_EVERY_JOB, (rjob, reason)
    # The negative control: without the rules, JobSet's default would recreate every Job, servers too.
    bare = copy.deepcopy(jobset)
    bare["spec"]["failurePolicy"]["rules"] = []
    assert failure_action(bare, "workers", "FailedIndexes") in RESTARTS_EVERY_JOB


def test_a_server_failure_restarts_the_set_a_bounded_number_of_times(jobset):
    policy = jobset["spec"]["failurePolicy"]
    for reason in JOB_FAILURE_REASONS:
        assert failure_action(jobset, "server", reason) == "RestartJobSet", "counted against maxRestarts"
    assert 1 <= policy["maxRestarts"] <= 5
    names = [rule["name"] for rule in policy["rules"]]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", name) for name in names), names
    targeted = {t for rule in policy["rules"] for t in rule.get("targetReplicatedJobs", [])}
    assert targeted <= {r["name"] for r in jobset["spec"]["replicatedJobs"]}
    # RestartJob and RestartJobAndIgnoreMaxRestarts sit behind an alpha feature gate, off by default.
    assert all(not rule["action"].startswith("RestartJob") or rule["action"].startswith("RestartJobSet")
               for rule in policy["rules"])


def test_success_when_the_workers_and_the_evaluator_are_done(jobset, monkeypatch):
    success = jobset["spec"]["successPolicy"]
    assert success["operator"] == "All"
    assert "workers" in success["targetReplicatedJobs"] and "server" not in success["targetReplicatedJobs"]
    assert set(success["targetReplicatedJobs"]) <= {r["name"] for r in jobset["spec"]["replicatedJobs"]}
    for rjob in ("workers", "evaluator"):
        assert replicated(jobset, rjob)["dependsOn"] == [{"name": "server", "status": "Ready"}]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl renders the kustomization")
@pytest.mark.parametrize("with_replacements", [True, False], ids=["as-shipped", "negative-control"])
def test_worker_count_is_written_once(tmp_path, monkeypatch, with_replacements):
    """Change the workers' completions alone: parallelism and the server's --workers follow (kustomization.yaml)."""
    shutil.copytree(JOBSET_DIR, tmp_path / "jobset", ignore=shutil.ignore_patterns("crd"))
    shutil.copytree(K8S / "secret", tmp_path / "secret")
    path = tmp_path / "jobset" / "jobset.yaml"
    doc = yaml.safe_load(path.read_text())
    replicated(doc, "workers")["template"]["spec"]["completions"] = 7
    path.write_text(yaml.safe_dump(doc))
    if not with_replacements:
        kustomization = yaml.safe_load((tmp_path / "jobset" / "kustomization.yaml").read_text())
        del kustomization["replacements"]
        (tmp_path / "jobset" / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    (rendered,) = [d for d in kustomize(tmp_path / "jobset") if d["kind"] == "JobSet"]
    follows = (replicated(rendered, "workers")["template"]["spec"]["parallelism"] == 7
               and run_params(rendered, "server", "ps-server", monkeypatch)["workers"] == 7)
    assert follows == with_replacements


def test_files_agree_without_kustomize(monkeypatch):
    """Read as files (kubectl apply -f), the manifest is consistent too: the copies hold N already."""
    (doc,) = [d for d in documents_of(JOBSET_DIR) if d["kind"] == "JobSet"]
    spec = replicated(doc, "workers")["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == run_params(doc, "server", "ps-server", monkeypatch)["workers"]


# -- the same containers as deploy/k8s --------------------------------------------------------------

def base_containers() -> dict:
    """prog → container of deploy/k8s's StatefulSet and Jobs."""
    docs = documents_of(K8S)
    return {c["command"][0]: c for d in docs if d["kind"] in ("StatefulSet", "Job")
            for c in d["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("rjob,prog", [("server", "ps-server"), ("workers", "ps-worker"), ("evaluator", "ps-eval")])
def test_containers_are_those_of_deploy_k8s(rendered, jobset, rjob, prog, monkeypatch):
    """Same image, flags, probes, resources and security as deploy/k8s; addresses and paths are the JobSet's."""
    base = base_containers()[prog]
    container = container_of(replicated(jobset, rjob), prog)
    pod = replicated(jobset, rjob)["template"]["spec"]["template"]["spec"]
    if shutil.which("kubectl"):
        images = {c["image"] for d in kustomize(K8S) if d["kind"] in ("StatefulSet", "Job")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        assert {container["image"]} == images
    else:
        assert container["image"] == base["image"]
    differ = ("--server", "--checkpoint-dir", "--workers")  # where the JobSet's names and layout differ
    flags = [a for a in container["args"] if not a.startswith(differ)]
    assert flags == [a for a in base["args"] if not a.startswith(differ)]
    for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe", "resources", "securityContext"):
        assert container.get(key) == base.get(key), key
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "fsGroup": 10001}
    params = run_params(jobset, rjob, prog, monkeypatch)
    check_paths(f"JobSet {rjob}", params, k8s_mounts(container))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {d["metadata"]["name"] for d in rendered if d["kind"] == "PersistentVolumeClaim"} | {"paramhub-data"}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, f"{mount['name']}: no volume"
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        assert claim is None or claim["claimName"] in claims, f"{mount['name']}: no claim {claim}"
        if mount["mountPath"] == "/data":
            assert mount["readOnly"] and volumes["data"]["persistentVolumeClaim"] == \
                {"claimName": "paramhub-data", "readOnly": True}
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for d in rendered if d["kind"] == "Secret"}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets.get(ref["name"], ()), ref
