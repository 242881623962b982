"""The generated CustomResourceDefinition: committed copy up to date, structural, and in agreement
with the pydantic models it is generated from."""

from __future__ import annotations

import copy
import datetime
import re
from typing import Any

import pytest
import yaml
from hypothesis import given

from salamander.api import (GROUP, KIND, PLURAL, SHORT_NAME, VERSION, Condition, InvalidSpec, Phase, RestoreRecord,
                            TrainingJobSpec, TrainingJobStatus, parse_manifest, parse_spec)
from salamander.api.crd import CRD_FILE, build_crd, render_crd
from tests.unit._support import CRD_PATH, EXAMPLE, QUICK
from tests.unit.test_api import VALID_SPEC, mutated_specs

FORBIDDEN_KEYS = {"$ref", "$defs", "definitions", "anyOf", "allOf", "oneOf", "not", "title", "const",
                  "discriminator", "prefixItems"}


def root_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    (version,) = (crd or build_crd())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node under ``node`` (properties, items, additionalProperties), with its path."""
    out = [(path or ".", node)]
    for name, sub in (node.get("properties") or {}).items():
        out += schema_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += schema_nodes(node["additionalProperties"], f"{path}.*")
    return out


def all_dicts(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        return [node] + [d for v in node.values() for d in all_dicts(v)]
    if isinstance(node, list):
        return [d for v in node for d in all_dicts(v)]
    return []


# --- a tiny validator with the API server's structural semantics ------------------------------------

def k8s_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What the API server (with strict field validation, kubectl's default) would reject.

    Implements exactly the keywords the generated schema uses, with Kubernetes' meaning:
    ``nullable``, ``x-kubernetes-int-or-string``, unknown fields rejected. CEL rules are not run.
    """
    where = path or "."
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: must not be null"]
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return [f"{where}: must be an integer or a string"]
        return []
    type_ = schema.get("type")
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    if type_ is not None and not checks[type_](value):
        return [f"{where}: must be of type {type_}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: must be one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: must be >= {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: must be <= {schema['maximum']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(f"{where}: too short")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{where}: too long")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: must match {schema['pattern']}")
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{where}: too few items")
    if type_ == "array" and "items" in schema:
        for i, item in enumerate(value):
            errors += k8s_errors(schema["items"], item, f"{path}[{i}]")
    if type_ == "object":
        props = schema.get("properties")
        for name in schema.get("required", ()):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        for name, item in value.items():
            if props is not None and name in props:
                errors += k8s_errors(props[name], item, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += k8s_errors(schema["additionalProperties"], item, f"{path}.{name}")
            elif props is not None:
                errors.append(f"{path}.{name}: unknown field")
    return errors


def k8s_default(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: missing properties with a ``default`` get
    it (and its own nested defaults), recursively."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = k8s_default(sub, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for name in value:
                value[name] = k8s_default(schema["additionalProperties"], value[name])
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [k8s_default(schema["items"], v) for v in value]
    return value


SPEC_SCHEMA = root_schema()["properties"]["spec"]
STATUS_SCHEMA = root_schema()["properties"]["status"]


# --- the committed file --------------------------------------------------------------------------

def test_committed_crd_is_up_to_date() -> None:
    assert CRD_PATH.name == CRD_FILE
    assert CRD_PATH.exists(), f"{CRD_PATH} is missing: run `salamander crd --write crds`"
    committed = CRD_PATH.read_text()
    if committed != render_crd():
        pytest.fail("crds/ is stale: the CRD generated from salamander.api.models differs from "
                    f"{CRD_PATH.relative_to(CRD_PATH.parents[1])}. Run `salamander crd --write crds` and "
                    "commit the result.", pytrace=False)


def test_render_is_deterministic_and_parses_back() -> None:
    assert render_crd() == render_crd()
    text = render_crd()
    assert text.startswith("# Generated from salamander.api.models")
    assert yaml.safe_load(text) == build_crd()


# --- structural ----------------------------------------------------------------------------------

def test_schema_has_no_non_structural_constructs() -> None:
    for node in all_dicts(root_schema()):
        bad = FORBIDDEN_KEYS & node.keys()
        assert not bad, f"non-structural keys {bad} in {node}"
        assert node.get("additionalProperties", True) is not False, node


def test_every_node_with_properties_is_an_object() -> None:
    for path, node in schema_nodes(root_schema()):
        if "properties" in node:
            assert node.get("type") == "object", path
        assert not ("properties" in node and isinstance(node.get("additionalProperties"), dict)), \
            f"{path}: properties and additionalProperties are mutually exclusive"


def test_every_node_has_a_type_or_is_int_or_string() -> None:
    for path, node in schema_nodes(root_schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), f"{path}: arrays need items"


def test_defaults_are_valid_against_their_own_schema() -> None:
    for path, node in schema_nodes(root_schema()):
        if "default" in node:
            assert not k8s_errors(node, node["default"], path), (path, node["default"])


def test_identity_names_and_status_subresource() -> None:
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}" == "trainingjobs.salamander.dev"
    spec = crd["spec"]
    assert spec["group"] == GROUP == "salamander.dev"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == KIND == "TrainingJob"
    assert names["plural"] == "trainingjobs"
    assert names["singular"] == "trainingjob"
    assert names["listKind"] == "TrainingJobList"
    assert names["shortNames"] == [SHORT_NAME] == ["tj"]
    (version,) = spec["versions"]
    assert version["name"] == VERSION == "v1alpha1"
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}
    root = root_schema(crd)
    assert root["type"] == "object"
    assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


def test_printer_columns() -> None:
    (version,) = build_crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    for name in ("Phase", "Ready", "Desired", "Step", "Restarts", "Goodput", "Age"):
        assert name in columns
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    # every column points at a status field that exists and has the column's type
    status_props = STATUS_SCHEMA["properties"]
    for column in columns.values():
        if column["jsonPath"].startswith(".status."):
            schema = {"properties": status_props}
            for part in column["jsonPath"].removeprefix(".status.").split("."):  # nested: .status.goodput.ratio
                assert part in schema.get("properties", {}), column
                schema = schema["properties"][part]
            assert schema["type"] == column["type"], column


def test_spec_defaults_are_in_the_schema() -> None:
    props = SPEC_SCHEMA["properties"]
    assert SPEC_SCHEMA["required"] == ["worker"]
    assert props["procsPerNode"]["default"] == 1
    assert props["restartBudget"]["default"] == 100
    assert props["replicas"]["default"] == {}
    assert props["replicas"]["properties"]["min"]["default"] == 1
    assert props["replicas"]["properties"]["max"]["default"] == 1
    assert props["worker"]["properties"]["env"]["items"]["properties"]["value"]["default"] == ""
    assert set(props["worker"]["required"]) == {"image", "command"}


def test_status_phase_is_an_enum_of_the_phases() -> None:
    assert set(STATUS_SCHEMA["properties"]["phase"]["enum"]) == {p.value for p in Phase}


def test_snapshot_carries_the_cel_rule_that_pydantic_also_enforces() -> None:
    snapshot = SPEC_SCHEMA["properties"]["snapshot"]
    assert snapshot["nullable"] is True and "default" not in snapshot  # no snapshots unless asked for
    (rule,) = snapshot["x-kubernetes-validations"]
    assert rule["rule"] == "self.groupSize >= self.parity + 1"
    props = snapshot["properties"]
    assert {name: props[name].get("default") for name in props} == {
        "intervalSteps": 10, "groupSize": 4, "parity": 1, "persistEverySnapshots": 0, "persistDirectory": None}
    assert (props["groupSize"]["minimum"], props["groupSize"]["maximum"]) == (2, 64)
    assert (props["parity"]["minimum"], props["parity"]["maximum"]) == (1, 2)
    with pytest.raises(InvalidSpec) as info:
        parse_spec({**VALID_SPEC, "snapshot": {"groupSize": 2, "parity": 2}})
    assert info.value.field == "spec.snapshot"
    # what the API server defaults an empty snapshot to parses to the model's defaults
    assert parse_spec(k8s_default(SPEC_SCHEMA, {**VALID_SPEC, "snapshot": {}})) == \
        parse_spec({**VALID_SPEC, "snapshot": {}})


def test_the_restore_tier_is_an_enum_of_the_wire_tiers() -> None:
    from salamander.wire import RESTORE_TIERS
    tier = STATUS_SCHEMA["properties"]["lastRestore"]["properties"]["tier"]
    assert tier["enum"] == list(RESTORE_TIERS) == ["memory", "peers", "persistent", "none"]


def test_replicas_carry_the_cel_rule_that_pydantic_also_enforces() -> None:
    rules = SPEC_SCHEMA["properties"]["replicas"]["x-kubernetes-validations"]
    assert {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max"} in rules
    with pytest.raises(InvalidSpec) as info:
        parse_spec({**VALID_SPEC, "replicas": {"min": 3, "max": 2}})
    assert info.value.field == "spec.replicas"


# --- the models and the CRD agree -------------------------------------------------------------------

def test_the_example_manifest_is_accepted_by_the_crd() -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    assert k8s_errors(root_schema(), {k: v for k, v in manifest.items() if k != "metadata"}) == []
    assert k8s_errors(SPEC_SCHEMA, manifest["spec"]) == []


def test_a_full_spec_and_its_dump_are_accepted_by_the_crd() -> None:
    assert k8s_errors(SPEC_SCHEMA, VALID_SPEC) == []
    dumped = parse_spec(VALID_SPEC).model_dump(mode="json", by_alias=True)
    assert k8s_errors(SPEC_SCHEMA, dumped) == []


def test_crd_defaults_agree_with_model_defaults() -> None:
    minimal = {"worker": {"image": "i", "command": ["c"], "env": [{"name": "A"}]}}
    defaulted = k8s_default(SPEC_SCHEMA, minimal)
    assert defaulted["procsPerNode"] == 1 and defaulted["restartBudget"] == 100
    assert defaulted["replicas"] == {"min": 1, "max": 1}
    assert defaulted["worker"]["env"] == [{"name": "A", "value": ""}]
    # what the operator receives after the API server defaulted it parses to the same spec
    assert parse_spec(defaulted) == parse_spec(minimal)
    assert parse_spec(k8s_default(SPEC_SCHEMA, VALID_SPEC)) == parse_spec(VALID_SPEC)


def test_the_status_the_operator_writes_is_accepted_by_the_crd() -> None:
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    statuses = [
        TrainingJobStatus(),
        TrainingJobStatus(phase=Phase.RUNNING, desired_workers=4, ready_workers=2, world_size=16, step=10,
                          loss=0.5, restarts=1, start_time=now, observed_generation=3,
                          conditions=[Condition(type="Ready", status="True", reason="EnoughWorkers",
                                                message="2 of 2..4 workers ready", last_transition_time=now,
                                                observed_generation=3)]),
        TrainingJobStatus(phase=Phase.FAILED, completion_time=now, loss=None),
        TrainingJobStatus(phase=Phase.RUNNING, step=40, restarts=2,
                          last_restore=RestoreRecord(tier="peers", step=30, at=now, restart_count=2)),
        TrainingJobStatus(last_restore=RestoreRecord(tier="none", at=now)),
    ]
    for status in statuses:
        body = status.model_dump(mode="json", by_alias=True)  # as the operator patches it
        assert k8s_errors(STATUS_SCHEMA, body) == [], body
        # and it reads back to the same status
        assert TrainingJobStatus.model_validate(body) == status


@QUICK
@given(mutated_specs())
def test_every_spec_the_models_accept_dumps_to_what_the_crd_accepts(raw: dict[str, Any]) -> None:
    try:
        spec = parse_spec(raw)
    except InvalidSpec:
        return
    assert isinstance(spec, TrainingJobSpec)
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert k8s_errors(SPEC_SCHEMA, dumped) == []
    assert parse_spec(k8s_default(SPEC_SCHEMA, dumped)) == spec


@pytest.mark.parametrize("path, value", [("procsPerNode", "2"), ("restartBudget", True),
                                         ("replicas", {"min": "1", "max": True})])
def test_models_and_crd_both_reject_integers_written_as_strings_or_booleans(path: str, value: Any) -> None:
    raw = {**VALID_SPEC, path: value}
    with pytest.raises(InvalidSpec):
        parse_spec(raw)  # rejected locally ...
    assert k8s_errors(SPEC_SCHEMA, raw)  # ... as the cluster rejects it


def test_the_crd_rejects_what_the_models_reject_for_types() -> None:
    for path, value in [("procsPerNode", "many"), ("worker", {"image": "i", "command": "python"})]:
        raw = {**VALID_SPEC, path: value}
        assert k8s_errors(SPEC_SCHEMA, raw)
        with pytest.raises(InvalidSpec):
            parse_spec(raw)


def test_manifest_parser_and_crd_agree_on_the_example() -> None:
    job = parse_manifest(EXAMPLE.read_text())
    dumped = job.spec.model_dump(mode="json", by_alias=True)
    assert k8s_errors(SPEC_SCHEMA, dumped) == []


def test_jsonschema_accepts_the_example_spec() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    # OpenAPI 3.0 schemas use draft 4's keywords (exclusiveMinimum is a boolean beside minimum)
    validator = jsonschema.Draft4Validator(SPEC_SCHEMA)
    validator.validate(spec)
    validator.validate(parse_spec(VALID_SPEC).model_dump(mode="json", by_alias=True, exclude_none=True))
    with pytest.raises(jsonschema.ValidationError, match="less than or equal to the minimum"):
        validator.validate({**spec, "scheduling": {"weight": 0}})
