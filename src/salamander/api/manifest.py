"""Parse TrainingJob manifests and specs, turning every defect into one line naming the field."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from salamander.api.models import DNS_LABEL, DNS_SUBDOMAIN, ENV_NAME, ObjectMeta, TrainingJob, TrainingJobSpec

PATTERN_HINTS = {
    DNS_LABEL: "must be a lowercase DNS label: a-z, 0-9 and '-', starting with a letter",
    DNS_SUBDOMAIN: "must be a lowercase DNS name: a-z, 0-9, '-' and '.'",
    ENV_NAME: "is not a valid environment variable name",
}


class InvalidSpec(ValueError):
    """A manifest or spec that cannot run. ``field`` is a dotted path such as ``spec.replicas.min``
    (empty when the whole document is wrong); ``str(error)`` is one line for a person."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class _KubeLoader(yaml.SafeLoader):
    """YAML as ``kubectl`` reads it: a date-like scalar (``2024-01-01``) stays a string, as it
    does after Kubernetes' YAML-to-JSON conversion, instead of becoming a datetime."""


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            key = str(item) if str(item).isprintable() else repr(str(item))  # keep it on one line
            parts.append(("." if parts else "") + key)
    return "".join(parts)


def _from_validation(exc: ValidationError, prefix: str) -> InvalidSpec:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = _dotted(((prefix,) if prefix else ()) + tuple(first["loc"]))
    problem = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        problem = "unknown field"
    elif first["type"] == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(str((first.get("ctx") or {}).get("pattern")), "has the wrong form")
        problem = f"{str(first.get('input'))[:80]!r} {hint}"
    elif first["type"] == "missing":
        problem = "required field is missing"
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidSpec(field, problem)


def parse_spec(spec: Any) -> TrainingJobSpec:
    """Validate a ``spec`` mapping as the operator receives it. Raises :class:`InvalidSpec`."""
    if not isinstance(spec, dict):
        raise InvalidSpec("spec", f"must be a mapping, got {type(spec).__name__}")
    try:
        return TrainingJobSpec.model_validate(spec)
    except ValidationError as exc:
        raise _from_validation(exc, "spec") from None


def check_name(name: str) -> None:
    """A job's name must make valid pod host names (``<name>-worker-<i>``) and a service name.
    The API server accepts names (``llama-3.1``) that would make every pod fail to create."""
    try:
        ObjectMeta.model_validate({"name": name})
    except ValidationError as exc:
        raise _from_validation(exc, "metadata") from None


def parse_manifest(source: str | dict[str, Any]) -> TrainingJob:
    """Validate a whole manifest given as YAML text or an already loaded mapping.

    Raises :class:`InvalidSpec` for malformed YAML, several documents, a wrong kind or
    apiVersion, unknown fields and out-of-range values; never anything else.
    """
    if isinstance(source, str):
        try:
            documents = [d for d in yaml.load_all(source, Loader=_KubeLoader) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InvalidSpec("", f"malformed YAML{where}: {problem}") from None
        except RecursionError:
            raise InvalidSpec("", "malformed YAML: nested too deeply") from None
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            # PyYAML's constructors raise these for values like `!!int eight` or huge integers.
            detail = " ".join(str(exc).split())[:200]
            raise InvalidSpec("", f"malformed YAML: a value cannot be read ({type(exc).__name__}: {detail})") from None
        if len(documents) != 1:
            raise InvalidSpec("", f"expected exactly one YAML document, found {len(documents)}")
        source = documents[0]
    if not isinstance(source, dict):
        raise InvalidSpec("", f"a manifest must be a mapping, got {type(source).__name__}")
    try:
        return TrainingJob.model_validate(source)
    except ValidationError as exc:
        raise _from_validation(exc, "") from None
