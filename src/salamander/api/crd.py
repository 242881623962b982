"""Generate the TrainingJob CustomResourceDefinition from the pydantic models.

The output is a *structural* openAPIV3Schema: every ``$ref`` inlined, no ``anyOf`` at the
top of a property, ``nullable`` instead of ``null`` types, exclusive bounds as OpenAPI 3.0's
booleans, ``x-kubernetes-int-or-string``
for quantities, defaults kept, and cross-field rules as CEL ``x-kubernetes-validations``.
``crds/trainingjobs.salamander.dev.yaml`` is this module's output; a test fails when it is stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from salamander.api.models import GROUP, KIND, PLURAL, SHORT_NAME, VERSION, TrainingJobSpec, TrainingJobStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"

def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one JSON-schema node (pydantic's dialect) into Kubernetes' structural dialect."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        nullable = len(variants) < len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(variants) != 1:
            raise ValueError(f"cannot express a union of {len(variants)} types structurally: {node}")
        out = _structural({**variants[0], **rest}, defs)
        if nullable:
            out["nullable"] = True
            if out.get("default", ...) is None:
                del out["default"]
        return out
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties" and value is False:
            continue  # the API server prunes unknown fields; `false` is not allowed beside properties
        if key == "properties":
            required = set(node.get("required", ()))
            out[key] = {name: _defaulted(_structural(sub, defs), name in required)
                        for name, sub in value.items()}
        elif key == "description":
            out[key] = " ".join(value.replace("``", "`").split())
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020-12 (a number) to OpenAPI v3.0 (a bound plus a boolean)
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = _structural(value, defs)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if out.get("format") == "date-time":
        out["type"] = "string"
    return out


def _defaulted(prop: dict[str, Any], required: bool) -> dict[str, Any]:
    """Give an optional object property ``default: {}`` so the API server fills in its fields'
    defaults even when the user leaves the whole object out (structural defaulting is per field).
    Only where ``{}`` is itself valid: an object with required fields gets no default."""
    if (not required and prop.get("type") == "object" and "properties" in prop and "default" not in prop
            and not prop.get("required") and not prop.get("nullable")):
        prop["default"] = {}
    return prop


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural schema of one pydantic model, as the CRD embeds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def printer_columns() -> list[dict[str, Any]]:
    col = lambda name, type_, path, **kw: {"name": name, "type": type_, "jsonPath": path, **kw}  # noqa: E731
    return [
        col("Phase", "string", ".status.phase"),
        col("Ready", "integer", ".status.readyWorkers", description="Ready worker nodes"),
        col("Desired", "integer", ".status.desiredWorkers", description="Desired worker nodes"),
        col("World", "integer", ".status.worldSize", description="Training processes in the group",
            priority=1),
        col("Step", "integer", ".status.step"),
        col("Restarts", "integer", ".status.restarts"),
        col("Goodput", "number", ".status.goodput.ratio", description="Productive time over wall time since submission"),
        col("Age", "date", ".metadata.creationTimestamp"),
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest, deterministic for a given set of models."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "salamander"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": KIND.lower(), "shortNames": [SHORT_NAME],
                      "listKind": f"{KIND}List", "categories": ["all", "salamander"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": printer_columns(),
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A distributed PyTorch training job that Salamander keeps running "
                                   "through failures.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": openapi_schema(TrainingJobSpec),
                        "status": openapi_schema(TrainingJobStatus),
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    header = "# Generated from salamander.api.models by `salamander crd --write`. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def write_crd(directory: Path) -> Path:
    path = directory / CRD_FILE
    path.write_text(render_crd())
    return path
