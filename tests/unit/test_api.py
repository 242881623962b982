"""Parsing manifests and specs: defaults, and one-line errors that name the field."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from salamander.api import InvalidSpec, Phase, TrainingJob, TrainingJobSpec, parse_manifest, parse_spec
from salamander.api.models import MAX_NAME_LENGTH
from tests.unit._support import EXAMPLE, FAST, QUICK, one_line

VALID_SPEC: dict[str, Any] = {
    "replicas": {"min": 2, "max": 4},
    "procsPerNode": 8,
    "restartBudget": 3,
    "worker": {
        "image": "img:1",
        "imagePullPolicy": "Always",
        "command": ["python", "train.py"],
        "args": ["--steps", "10"],
        "env": [{"name": "A", "value": "1"}],
        "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "16Gi"}, "requests": {"cpu": "500m"}},
        "workingDir": "/w",
        "nodeSelector": {"pool": "gpu"},
        "serviceAccountName": "trainer",
    },
    "snapshot": {"intervalSteps": 5, "groupSize": 4, "parity": 2, "persistEverySnapshots": 10,
                 "persistDirectory": "/shared/snapshots"},
}


def manifest(spec: Any = None, **top: Any) -> dict[str, Any]:
    body = {"apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "job"},
            "spec": copy.deepcopy(VALID_SPEC) if spec is None else spec}
    body.update(top)
    return body


def with_(path: str, value: Any) -> dict[str, Any]:
    """A deep copy of VALID_SPEC with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    spec = copy.deepcopy(VALID_SPEC)
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return spec


def invalid(fn: Any, *args: Any) -> InvalidSpec:
    with pytest.raises(InvalidSpec) as info:
        fn(*args)
    err = info.value
    assert one_line(str(err)), repr(str(err))
    assert str(err) == (f"{err.field}: {err.problem}" if err.field else err.problem)
    assert isinstance(err, ValueError)
    return err


# --- valid input and defaults -------------------------------------------------------------------

def test_the_example_manifest_parses() -> None:
    job = parse_manifest(EXAMPLE.read_text())
    assert isinstance(job, TrainingJob)
    assert job.metadata.name == "gpt"
    assert job.metadata.namespace == "default"
    assert (job.spec.replicas.min, job.spec.replicas.max) == (2, 2)
    assert job.spec.procs_per_node == 1
    assert job.spec.restart_budget == 3
    assert job.spec.worker.command == ["python", "examples/gpt/train.py"]
    assert job.spec.worker.args == ["--steps", "300"]
    assert job.status.phase is Phase.PENDING


def test_a_loaded_mapping_parses_like_text() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert parse_manifest(data) == parse_manifest(EXAMPLE.read_text())


def test_spec_defaults() -> None:
    spec = parse_spec({"worker": {"image": "i", "command": ["c"]}})
    assert (spec.replicas.min, spec.replicas.max) == (1, 1)
    assert spec.procs_per_node == 1
    assert spec.restart_budget == 100
    w = spec.worker
    assert w.args == [] and w.env == [] and w.node_selector == {}
    assert w.resources.requests == {} and w.resources.limits == {}
    assert w.image_pull_policy is None and w.working_dir is None and w.service_account_name is None
    assert spec.snapshot is None and spec.persist_directory() is None


def test_a_full_spec_parses_with_snake_case_attributes() -> None:
    spec = parse_spec(VALID_SPEC)
    assert spec.procs_per_node == 8
    assert spec.worker.image_pull_policy == "Always"
    assert spec.worker.resources.limits == {"nvidia.com/gpu": 8, "memory": "16Gi"}
    assert spec.worker.env[0].name == "A"
    assert spec.model_dump(by_alias=True, exclude_defaults=False)["procsPerNode"] == 8
    # a dump parses back to the same spec
    assert parse_spec(spec.model_dump(by_alias=True)) == spec


def test_env_value_defaults_to_empty() -> None:
    assert parse_spec(with_("worker.env", [{"name": "X"}])).worker.env[0].value == ""


@pytest.mark.parametrize("quantity", [0, 2, "2", "500m", "16Gi", "1.5", ".5", "1e3", "+1", "128974848", "129M", "1Ki"])
def test_valid_quantities(quantity: int | str) -> None:
    assert parse_spec(with_("worker.resources", {"limits": {"cpu": quantity}})).worker.resources.limits == {
        "cpu": quantity}


def test_status_is_read_back_ignoring_unknown_fields() -> None:
    job = parse_manifest(manifest(status={"phase": "Running", "restarts": 2, "someFutureField": 1}))
    assert job.status.phase is Phase.RUNNING and job.status.restarts == 2


def test_metadata_extra_fields_are_ignored() -> None:
    job = parse_manifest(manifest(metadata={"name": "job", "namespace": "ns", "uid": "u", "generation": 3,
                                            "labels": {"a": "b"}, "resourceVersion": "1"}))
    assert (job.metadata.namespace, job.metadata.uid, job.metadata.generation) == ("ns", "u", 3)


def test_longest_name_is_accepted() -> None:
    assert parse_manifest(manifest(metadata={"name": "a" * MAX_NAME_LENGTH})).metadata.name == "a" * MAX_NAME_LENGTH


# --- each defect names its field ------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("apiVersion: [unclosed\n", "malformed YAML"),
    ("a: b\n  c: d\n", "malformed YAML"),
    ("key: 'open string\n", "malformed YAML"),
    ("\tkind: TrainingJob\n", "malformed YAML"),
])
def test_malformed_yaml(text: str, needle: str) -> None:
    err = invalid(parse_manifest, text)
    assert err.field == ""
    assert needle in str(err)


def test_malformed_yaml_names_line_and_column() -> None:
    err = invalid(parse_manifest, "apiVersion: v1\nkind: [x\nspec: {}\n")
    assert "line " in str(err) and "column " in str(err)


@pytest.mark.parametrize("text, count", [("", 0), ("# only a comment\n", 0), ("a: 1\n---\nb: 2\n", 2),
                                         ("---\na: 1\n---\na: 2\n---\na: 3\n", 3)])
def test_not_exactly_one_document(text: str, count: int) -> None:
    err = invalid(parse_manifest, text)
    assert err.field == ""
    assert f"found {count}" in str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", "true\n"])
def test_not_a_mapping(text: str) -> None:
    err = invalid(parse_manifest, text)
    assert err.field == ""
    assert "mapping" in str(err)


def test_a_non_mapping_object_is_rejected() -> None:
    err = invalid(parse_manifest, ["not", "a", "mapping"])
    assert err.field == "" and "list" in str(err)


@pytest.mark.parametrize("top, field", [
    ({"kind": "Deployment"}, "kind"),
    ({"apiVersion": "salamander.dev/v1"}, "apiVersion"),
    ({"apiVersion": "apps/v1"}, "apiVersion"),
])
def test_wrong_kind_or_api_version(top: dict[str, Any], field: str) -> None:
    assert invalid(parse_manifest, manifest(**top)).field == field


def test_missing_spec() -> None:
    body = manifest()
    del body["spec"]
    err = invalid(parse_manifest, body)
    assert err.field == "spec" and err.problem == "required field is missing"


@pytest.mark.parametrize("spec, field, problem", [
    ({**VALID_SPEC, "replicaz": {"min": 1}}, "spec.replicaz", "unknown field"),
    (with_("worker.imagePulPolicy", "Always"), "spec.worker.imagePulPolicy", "unknown field"),
    (with_("replicas", {"min": 3, "max": 2}), "spec.replicas", "must not exceed"),
    (with_("replicas", {"min": 0, "max": 2}), "spec.replicas.min", "greater than or equal to 1"),
    (with_("replicas", {"min": 1, "max": 0}), "spec.replicas.max", "greater than or equal to 1"),
    (with_("replicas", {"min": 1, "max": 5000}), "spec.replicas.max", "less than or equal to 4096"),
    (with_("replicas", {"max": -3}), "spec.replicas.max", "greater than or equal to 1"),
    (with_("replicas", {"min": 2}), "spec.replicas", "must not exceed"),  # max defaults to 1
    (with_("procsPerNode", -1), "spec.procsPerNode", "greater than or equal to 1"),
    (with_("procsPerNode", 0), "spec.procsPerNode", "greater than or equal to 1"),
    (with_("procsPerNode", "many"), "spec.procsPerNode", "integer"),
    (with_("procsPerNode", 1.5), "spec.procsPerNode", "integer"),
    (with_("restartBudget", -1), "spec.restartBudget", "greater than or equal to 0"),
    (with_("worker.image", ...), "spec.worker.image", "required field is missing"),
    (with_("worker.image", ""), "spec.worker.image", "at least 1 character"),
    (with_("worker", ...), "spec.worker", "required field is missing"),
    (with_("worker.command", []), "spec.worker.command", "at least 1 item"),
    (with_("worker.command", ...), "spec.worker.command", "required field is missing"),
    (with_("worker.command", [""]), "spec.worker.command[0]", "at least 1 character"),
    (with_("worker.command", "python train.py"), "spec.worker.command", "list"),
    (with_("worker.args", ["ok", 3]), "spec.worker.args[1]", "string"),
    (with_("worker.imagePullPolicy", "Sometimes"), "spec.worker.imagePullPolicy", "Always"),
    (with_("worker.resources", {"limits": {"cpu": "lots"}}), "spec.worker.resources.limits.cpu",
     "not a resource quantity"),
    (with_("worker.resources", {"requests": {"memory": "16 Gi"}}), "spec.worker.resources.requests.memory",
     "not a resource quantity"),
    (with_("worker.resources", {"limits": {"cpu": "-1"}}), "spec.worker.resources.limits.cpu",
     "not a resource quantity"),
    (with_("worker.resources", {"cpus": {}}), "spec.worker.resources.cpus", "unknown field"),
    (with_("worker.env", [{"name": "OK"}, {"name": "1BAD"}]), "spec.worker.env[1].name", "environment variable name"),
    (with_("worker.env", [{"name": "HAS SPACE"}]), "spec.worker.env[0].name", "environment variable name"),
    (with_("worker.env", [{"value": "v"}]), "spec.worker.env[0].name", "required field is missing"),
    (with_("worker.env", [{"name": "A", "valueFrom": {}}]), "spec.worker.env[0].valueFrom", "unknown field"),
    (with_("worker.nodeSelector", {"pool": 1}), "spec.worker.nodeSelector.pool", "string"),
    (with_("worker.serviceAccountName", "Trainer"), "spec.worker.serviceAccountName", "DNS name"),
])
def test_bad_spec_names_the_field(spec: dict[str, Any], field: str, problem: str) -> None:
    err = invalid(parse_spec, spec)
    assert err.field == field, str(err)
    assert problem in err.problem, str(err)
    # the same defect inside a whole manifest names the same field
    assert invalid(parse_manifest, manifest(spec)).field == field


def test_negative_integer_quantity() -> None:
    err = invalid(parse_spec, with_("worker.resources", {"limits": {"cpu": -1}}))
    assert err.field.startswith("spec.worker.resources.limits.cpu")
    assert "negative" in str(err)


@pytest.mark.parametrize("value", [None, [], "spec", 3])
def test_spec_that_is_not_a_mapping(value: Any) -> None:
    err = invalid(parse_spec, value)
    assert err.field == "spec" and "mapping" in err.problem


@pytest.mark.parametrize("name", ["a" * (MAX_NAME_LENGTH + 1), "UpperCase", "has_underscore", "-lead", "trail-",
                                  "1starts-with-digit", ""])
def test_bad_metadata_name(name: str) -> None:
    err = invalid(parse_manifest, manifest(metadata={"name": name}))
    assert err.field == "metadata.name"


def test_several_problems_are_counted_in_one_line() -> None:
    err = invalid(parse_spec, {"replicaz": 1, "procsPerNode": 0, "worker": {"image": "", "command": []}})
    assert "more problems" in err.problem


def test_yaml_text_errors_are_reported_from_the_text() -> None:
    text = EXAMPLE.read_text().replace("min: 2", "min: 3").replace("max: 2", "max: 1")
    err = invalid(parse_manifest, text)
    assert err.field == "spec.replicas"


# --- YAML edge cases -------------------------------------------------------------------------------

@pytest.mark.parametrize("date", ["2024-01-01", "2024-02-30", "2024-13-01", "2024-01-01T10:00:00Z"])
def test_date_like_scalars_stay_strings_as_kubectl_reads_them(date: str) -> None:
    text = ("apiVersion: salamander.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: job}\nspec:\n"
            "  worker:\n    image: img\n    command: [python, train.py]\n    args: [--since, " + date + "]\n")
    assert parse_manifest(text).spec.worker.args == ["--since", date]


BAD_YAML_SCALARS = {
    "an explicit !!int that is not one": "procsPerNode: !!int eight",
    "an explicit !!float that is not one": "procsPerNode: !!float x",
    "an explicit !!bool that is not one": "procsPerNode: !!bool maybe",
    "an explicit !!timestamp that is not one": "procsPerNode: !!timestamp soon",
    "an integer of 5000 digits": "procsPerNode: " + "9" * 5000,
}


@pytest.mark.parametrize("line", list(BAD_YAML_SCALARS.values()), ids=list(BAD_YAML_SCALARS))
def test_yaml_constructor_errors_are_invalid_spec(line: str) -> None:
    text = ("apiVersion: salamander.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: job}\nspec:\n"
            "  worker:\n    image: img\n    command: [python, train.py]\n    " + line + "\n")
    invalid(parse_manifest, text)


def test_deeply_nested_yaml_is_invalid_spec() -> None:
    invalid(parse_manifest, "[" * 1100 + "]" * 1100)


@pytest.mark.parametrize("key", ["a\nb", "x\r\ny", "tab\u2028sep"])
def test_unknown_key_with_a_line_break_still_gives_one_line(key: str) -> None:
    invalid(parse_spec, {**VALID_SPEC, key: 1})


# --- properties -----------------------------------------------------------------------------------

#: Mapping keys without line breaks (keys with them are covered above).
safe_keys = st.text(st.characters(blacklist_categories=("Cc", "Zl", "Zp", "Cs")), max_size=12)
any_keys = st.text(max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20))


def json_like(keys: st.SearchStrategy[str], max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                        max_leaves=max_leaves)


SAFE_JSON = json_like(safe_keys)
#: Small replacement values for mutations: mostly scalars, sometimes a small container.
SAFE_VALUES = json_like(safe_keys, max_leaves=4)
ANY_VALUES = json_like(any_keys, max_leaves=4)


FIELD_NAMES = ["replicas", "min", "max", "procsPerNode", "restartBudget", "worker", "image", "imagePullPolicy",
               "command", "args", "env", "name", "value", "resources", "requests", "limits", "workingDir",
               "nodeSelector", "serviceAccountName", "cpu", "nvidia.com/gpu", "snapshot", "intervalSteps",
               "groupSize", "parity", "persistEverySnapshots", "persistDirectory", "checkpoint", "directory",
               "claimName"]


def _containers(node: Any) -> list[Any]:
    """Every dict and list inside ``node``, itself included."""
    found = []
    if isinstance(node, (dict, list)):
        found.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            found.extend(_containers(child))
    return found


@st.composite
def mutated_specs(draw: st.DrawFn, safe: bool = True) -> dict[str, Any]:
    keys, values = (safe_keys, SAFE_VALUES) if safe else (any_keys, ANY_VALUES)
    spec = copy.deepcopy(VALID_SPEC)
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(_containers(spec)))
        op = draw(st.sampled_from(["delete", "insert", "swap"]))
        if isinstance(target, dict):
            if op == "insert" or not target:
                target[draw(st.sampled_from(FIELD_NAMES) | keys)] = draw(values)
            else:
                key = draw(st.sampled_from(sorted(target)))
                if op == "delete":
                    del target[key]
                else:
                    target[key] = draw(values)
        else:
            if op == "insert" or not target:
                target.insert(draw(st.integers(0, len(target))), draw(values))
            else:
                i = draw(st.integers(0, len(target) - 1))
                if op == "delete":
                    del target[i]
                else:
                    target[i] = draw(values)
    return spec


def _parse_spec_outcome(value: Any) -> None:
    try:
        result = parse_spec(value)
    except InvalidSpec as exc:
        assert one_line(str(exc)), repr(str(exc))
        assert exc.field == "spec" or exc.field.startswith(("spec.", "spec["))
        return
    assert isinstance(result, TrainingJobSpec)
    assert 1 <= result.replicas.min <= result.replicas.max
    assert result.procs_per_node >= 1 and result.restart_budget >= 0
    assert result.worker.image and result.worker.command and all(result.worker.command)
    snap = result.snapshot
    if snap is not None:
        assert snap.interval_steps >= 1 and 2 <= snap.group_size <= 64 and snap.parity in (1, 2)
        assert snap.group_size >= snap.parity + 1 and snap.persist_every_snapshots >= 0
        assert snap.persist_every_snapshots == 0 or result.persist_directory()


@QUICK
@given(SAFE_JSON)
def test_arbitrary_values_as_spec_give_a_spec_or_one_line_invalid_spec(value: Any) -> None:
    _parse_spec_outcome(value)


@QUICK
@given(st.dictionaries(st.sampled_from(FIELD_NAMES) | safe_keys, SAFE_JSON, max_size=6))
def test_arbitrary_mappings_as_spec_give_a_spec_or_one_line_invalid_spec(value: dict[str, Any]) -> None:
    _parse_spec_outcome(value)


@QUICK
@given(mutated_specs())
def test_mutated_valid_specs_give_a_spec_or_one_line_invalid_spec(value: dict[str, Any]) -> None:
    _parse_spec_outcome(value)


@QUICK
@given(mutated_specs(safe=False))
def test_mutated_specs_with_any_keys_raise_only_invalid_spec(value: dict[str, Any]) -> None:
    try:
        parse_spec(value)
    except InvalidSpec:
        pass


@FAST
@given(st.text())
def test_arbitrary_text_as_manifest_raises_only_invalid_spec(text: str) -> None:
    try:
        job = parse_manifest(text)
    except InvalidSpec as exc:
        assert str(exc)
        return
    assert isinstance(job, TrainingJob)


@QUICK
@given(mutated_specs())
def test_mutated_specs_in_yaml_text_raise_only_one_line_invalid_spec(spec: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(manifest(spec))
    except yaml.YAMLError:
        return
    try:
        parse_manifest(text)
    except InvalidSpec as exc:
        assert one_line(str(exc)), repr(str(exc))


def test_nan_and_inf_counts_are_rejected() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        assert invalid(parse_spec, with_("procsPerNode", bad)).field == "spec.procsPerNode"


@pytest.mark.parametrize("value", [1.5, None, True, [1]])
def test_a_quantity_of_the_wrong_type_names_the_quantity(value: Any) -> None:
    err = invalid(parse_spec, with_("worker.resources", {"limits": {"cpu": value}}))
    assert err.field == "spec.worker.resources.limits.cpu"


@pytest.mark.parametrize("quantity", ["500mi", "1ki", "3ui", "1ni", "2x", "-1", "1.5.2"])
def test_quantities_kubernetes_rejects_are_rejected(quantity: str) -> None:
    spec = {**VALID_SPEC, "worker": {**VALID_SPEC["worker"], "resources": {"limits": {"memory": quantity}}}}
    assert invalid(parse_spec, spec).field == "spec.worker.resources.limits.memory"


@pytest.mark.parametrize("quantity", ["500m", "1Ki", "16Gi", "2", "1e3", "0.5", "1E"])
def test_quantities_kubernetes_accepts_are_accepted(quantity: str) -> None:
    spec = {**VALID_SPEC, "worker": {**VALID_SPEC["worker"], "resources": {"limits": {"memory": quantity}}}}
    parse_spec(spec)


def test_service_account_names_are_dns_subdomains() -> None:
    parse_spec({**VALID_SPEC, "worker": {**VALID_SPEC["worker"], "serviceAccountName": "team.trainer-" + "a" * 60}})


@pytest.mark.parametrize("name", ["llama-3.1", "3d-model", "Upper", "x" * 52])
def test_job_names_that_would_break_pod_or_service_names_are_rejected(name: str) -> None:
    from salamander.api import check_name
    with pytest.raises(InvalidSpec) as err:
        check_name(name)
    assert err.value.field == "metadata.name" and "\n" not in str(err.value)


# --- in-memory snapshots (spec.snapshot) ------------------------------------------------------------

def test_snapshot_defaults() -> None:
    spec = parse_spec(with_("snapshot", {}))
    assert spec.snapshot is not None
    assert (spec.snapshot.interval_steps, spec.snapshot.group_size, spec.snapshot.parity) == (10, 4, 1)
    assert spec.snapshot.persist_every_snapshots == 0 and spec.snapshot.persist_directory is None
    assert spec.persist_directory() is None  # no directory anywhere, and none needed


def test_a_full_snapshot_parses_with_snake_case_attributes() -> None:
    spec = parse_spec(VALID_SPEC)
    assert spec.snapshot is not None
    assert (spec.snapshot.interval_steps, spec.snapshot.group_size, spec.snapshot.parity) == (5, 4, 2)
    assert spec.snapshot.persist_every_snapshots == 10
    assert spec.persist_directory() == "/shared/snapshots"
    assert spec.model_dump(by_alias=True)["snapshot"]["persistEverySnapshots"] == 10
    assert parse_spec(spec.model_dump(by_alias=True)) == spec


@pytest.mark.parametrize("group_size, parity", [(2, 1), (3, 2), (64, 1), (64, 2)])
def test_the_smallest_and_largest_groups(group_size: int, parity: int) -> None:
    spec = parse_spec(with_("snapshot", {"groupSize": group_size, "parity": parity}))
    assert spec.snapshot is not None and (spec.snapshot.group_size, spec.snapshot.parity) == (group_size, parity)


def test_snapshots_persist_to_the_checkpoint_directory_when_theirs_is_unset() -> None:
    raw = {**with_("snapshot", {"persistEverySnapshots": 3}), "checkpoint": {"directory": "/ckpt"}}
    assert parse_spec(raw).persist_directory() == "/ckpt"
    raw["snapshot"]["persistDirectory"] = "/elsewhere"
    assert parse_spec(raw).persist_directory() == "/elsewhere"  # its own directory wins


@pytest.mark.parametrize("persist", ["ckpt", "ckpt/snapshots", "/w/ckpt/s", "./ckpt/x/../y"])
def test_with_a_claim_the_persistent_directory_may_be_on_it(persist: str) -> None:
    raw = {**with_("snapshot", {"persistEverySnapshots": 1, "persistDirectory": persist}),
           "checkpoint": {"directory": "ckpt", "claimName": "pvc"}}  # workingDir /w
    assert parse_spec(raw).persist_directory() == persist


@pytest.mark.parametrize("spec, field, problem", [
    (with_("snapshot", {"intervalSteps": 0}), "spec.snapshot.intervalSteps", "greater than or equal to 1"),
    (with_("snapshot", {"intervalSteps": "5"}), "spec.snapshot.intervalSteps", "integer"),
    (with_("snapshot", {"groupSize": 1}), "spec.snapshot.groupSize", "greater than or equal to 2"),
    (with_("snapshot", {"groupSize": 65}), "spec.snapshot.groupSize", "less than or equal to 64"),
    (with_("snapshot", {"groupSize": True}), "spec.snapshot.groupSize", "integer"),
    (with_("snapshot", {"parity": 0}), "spec.snapshot.parity", "greater than or equal to 1"),
    (with_("snapshot", {"parity": 3}), "spec.snapshot.parity", "less than or equal to 2"),
    (with_("snapshot", {"groupSize": 2, "parity": 2}), "spec.snapshot", "must be at least parity + 1 (3)"),
    (with_("snapshot", {"persistEverySnapshots": -1}), "spec.snapshot.persistEverySnapshots",
     "greater than or equal to 0"),
    (with_("snapshot", {"persistEverySnapshots": 2}), "spec.snapshot",
     "set snapshot.persistDirectory or spec.checkpoint.directory"),
    (with_("snapshot", {"persistDirectory": ""}), "spec.snapshot.persistDirectory", "at least 1 character"),
    (with_("snapshot", {"interval": 5}), "spec.snapshot.interval", "unknown field"),
    (with_("snapshot", "often"), "spec.snapshot", "valid dictionary"),
    ({**with_("snapshot", {"persistDirectory": "/elsewhere"}), "checkpoint": {"directory": "ckpt", "claimName": "pvc"}},
     "spec.snapshot", "is not on checkpoint claim pvc (mounted at /w/ckpt)"),
    ({**with_("snapshot", {"persistDirectory": "ckpt-other"}), "checkpoint": {"directory": "ckpt", "claimName": "pvc"}},
     "spec.snapshot", "is not on checkpoint claim"),
    ({**with_("snapshot", {"persistDirectory": "ckpt/../x"}), "checkpoint": {"directory": "ckpt", "claimName": "pvc"}},
     "spec.snapshot", "is not on checkpoint claim"),
])
def test_bad_snapshot_names_the_field(spec: dict[str, Any], field: str, problem: str) -> None:
    err = invalid(parse_spec, spec)
    assert err.field == field, str(err)
    assert problem in err.problem, str(err)
    assert invalid(parse_manifest, manifest(spec)).field == field


def test_an_invalid_checkpoint_is_reported_not_the_snapshot_that_falls_back_to_it() -> None:
    raw = {**with_("snapshot", {"persistEverySnapshots": 2}), "checkpoint": {"directory": ""}}
    err = invalid(parse_spec, raw)
    assert err.field == "spec.checkpoint.directory" and "more problem" not in err.problem
