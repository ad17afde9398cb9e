"""Reading Kubernetes objects field by field: each reader checks one value and, when it is
wrong, raises a RegistryError naming the document, the object and the field's path.

Shared by every kind amesh reads (registry/kubefile.py for the core kinds, registry/policies.py
for Istio's security policies), so all errors read alike.
"""

from __future__ import annotations

from typing import Any, Mapping

from registry.model import RegistryError, is_ipv4

CLUSTER_SCOPED = ("Namespace", "Node")  # the kinds amesh reads that have no namespace


class KubeObject:
    """One Kubernetes object being read, with its identity and where it came from for errors."""

    def __init__(self, raw: dict[Any, Any], where: str) -> None:
        self.raw = raw
        # "document 3", or "document 3 items[1]" inside a List; "" for an object from the API
        # server, which its kind, namespace and name identify alone
        self.where = where
        self.key: tuple[str, str, str] | None = None  # (kind, namespace, name) once read
        kind = raw.get("kind")
        self.label = kind if isinstance(kind, str) and kind else "object"  # until the name is known
        self.kind = string_field(self, kind, "kind", required=True)
        string_field(self, raw.get("apiVersion"), "apiVersion", required=True)
        self.metadata = mapping_field(self, raw.get("metadata"), "metadata", required=True)
        self.name = string_field(self, self.metadata.get("name"), "metadata.name", required=True)
        if self.kind in CLUSTER_SCOPED:
            self.namespace = ""
            self.label = f"{self.kind} {self.name}"
        else:
            namespace = string_field(self, self.metadata.get("namespace"), "metadata.namespace")
            self.namespace = namespace or "default"
            self.label = f"{self.kind} {self.namespace}/{self.name}"
        self.key = (self.kind, self.namespace, self.name)

    def fail(self, path: str, problem: str) -> RegistryError:
        where = f"{self.where} ({self.label})" if self.where else self.label
        error = RegistryError(f"{where}: {path}: {problem}")
        # Which object is at fault, for a source that skips that object rather than the state.
        error.object_key = self.key  # type: ignore[attr-defined]
        return error


def show(value: object) -> str:
    """A value as the YAML author wrote it, for "got ..." in an error."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def string_field(obj: KubeObject, value: object, path: str, *, required: bool = False) -> str:
    if value is None or value == "":
        if required:
            raise obj.fail(path, "required")
        return ""
    if not isinstance(value, str):
        raise obj.fail(path, f"must be a string, got {show(value)}")
    return value


def mapping_field(obj: KubeObject, value: object, path: str, *, required: bool = False) -> dict[Any, Any]:
    if value is None:
        if required:
            raise obj.fail(path, "required")
        return {}
    if not isinstance(value, dict):
        raise obj.fail(path, f"must be a mapping, got {show(value)}")
    return value


def list_field(obj: KubeObject, value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise obj.fail(path, f"must be a list, got {show(value)}")
    return value


def port_field(obj: KubeObject, value: object, path: str) -> int:
    # bool is an int in Python, but `port: true` is a mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise obj.fail(path, f"must be an integer 1-65535, got {show(value)}")
    return value


def ipv4_field(obj: KubeObject, value: object, path: str) -> str:
    """An IPv4 address, or "" when the field is absent."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not is_ipv4(value):
        raise obj.fail(path, f"must be an IPv4 address, got {show(value)}")
    return value


def labels_field(obj: KubeObject, value: object, path: str) -> dict[str, str]:
    labels = mapping_field(obj, value, path)
    for key, text in labels.items():
        if not isinstance(key, str):
            raise obj.fail(path, f"keys must be strings, got {show(key)}")
        if not isinstance(text, str):
            problem = f"must be a string, got {show(text)} (quote it in YAML)"
            raise obj.fail(f'{path}["{key}"]', problem)
    return labels


def known_fields(obj: KubeObject, raw: Mapping[str, Any], path: str, known: tuple[str, ...]) -> None:
    """Raise on the first field (by name) not in `known`, as a CRD's structural schema would."""
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise obj.fail(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(known)})")
