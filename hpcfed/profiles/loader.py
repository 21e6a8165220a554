"""Find, read, merge and validate site profiles, remembering where every value came from.

Precedence, lowest first: schema defaults < bundled profile < user profile
($XDG_CONFIG_HOME/hpcfed/sites/NAME.yaml) < environment (HPCFED_SITE__KEY__PATH=value) < flags.
Dicts merge key by key; lists and scalars are replaced whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from hpcfed import paths
from hpcfed.errors import ConfigError, NotFound
from hpcfed.names import check_name
from hpcfed.yamlfile import YamlError, safe_load

if TYPE_CHECKING:
    from hpcfed.profiles.schema import SiteProfile

ENV_PREFIX = "HPCFED_SITE__"
DEFAULT = "default"


@dataclass(frozen=True)
class Layer:
    source: str  # a file path, "environment" or "flags"
    data: Mapping[str, Any]


@dataclass(frozen=True)
class LoadedSite:
    name: str
    profile: SiteProfile
    provenance: Dict[str, str] = field(default_factory=dict)  # dotted key -> source
    files: Tuple[str, ...] = ()

    def source_of(self, dotted: str) -> str:
        """Where a value came from: the nearest recorded key, else the schema default."""
        key = dotted
        while key:
            if key in self.provenance:
                return self.provenance[key]
            key = key.rpartition(".")[0]
        return DEFAULT

    def rows(self) -> List[Tuple[str, Any, str]]:
        """(dotted key, value, source) for every leaf of the merged profile."""
        out: List[Tuple[str, Any, str]] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k in sorted(value):
                    walk(f"{prefix}.{k}" if prefix else k, value[k])
            else:
                out.append((prefix, value, self.source_of(prefix)))

        walk("", self.profile.model_dump())
        return out


def bundled_path(name: str) -> Path:
    return paths.bundled_site_profiles_dir() / f"{name}.yaml"


def user_path(name: str) -> Path:
    return paths.user_sites_dir() / f"{name}.yaml"


def site_names() -> Dict[str, List[str]]:
    """Every known site name -> the files defining it (bundled first)."""
    names: Dict[str, List[str]] = {}
    for d in (paths.bundled_site_profiles_dir(), paths.user_sites_dir()):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                names.setdefault(p.stem, []).append(str(p))
    return dict(sorted(names.items()))


def read_yaml(path: Path) -> Dict[str, Any]:
    """A profile file as a dict; a syntax error names the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = safe_load(text)
    except YamlError as exc:
        line = f":{exc.line}" if exc.line else ""
        raise ConfigError(f"{path}{line}: {exc.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a site profile must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def env_layer(environ: Mapping[str, str]) -> Optional[Layer]:
    """HPCFED_SITE__ACCOUNT=x, HPCFED_SITE__TIME__DEFAULT=2h ... (values parsed as YAML scalars)."""
    data: Dict[str, Any] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or len(var) == len(ENV_PREFIX):
            continue
        raw_keys = var[len(ENV_PREFIX) :].split("__")
        keys = [k.lower() for k in raw_keys]
        if keys[:2] == ["scheduler", "env"]:  # variable names keep their case
            keys = keys[:2] + raw_keys[2:]
        try:
            value = safe_load(raw) if raw.strip() else None
        except YamlError:
            value = raw
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"environment {var}: conflicts with another HPCFED_SITE__ variable"
                )
        node[keys[-1]] = value
    return Layer("environment", data) if data else None


def merge(layers: List[Layer]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Deep-merge layers (later wins); return the data and dotted key -> source of each value."""
    merged: Dict[str, Any] = {}
    provenance: Dict[str, str] = {}

    def into(dst: Dict[str, Any], src: Mapping[str, Any], prefix: str, source: str) -> None:
        for k, v in src.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                into(dst[k], v, key, source)
            else:
                dst[k] = _copy(v)
                # a replaced subtree now comes wholly from this source
                for old in [p for p in provenance if p.startswith(key + ".")]:
                    del provenance[old]
                _record(provenance, key, v, source)

    for layer in layers:
        into(merged, layer.data, "", layer.source)
    return merged, provenance


def _copy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _record(provenance: Dict[str, str], key: str, v: Any, source: str) -> None:
    provenance[key] = source
    if isinstance(v, Mapping):
        for k, x in v.items():
            _record(provenance, f"{key}.{k}", x, source)


def _layers_for(name: str, seen: Tuple[str, ...] = ()) -> List[Layer]:
    """Bundled then user layer for `name`, preceded by the layers of what it `extends`."""
    check_name("site", name)
    if name in seen:
        raise ConfigError(f"site {name!r}: `extends` loops: {' -> '.join(seen + (name,))}")
    layers: List[Layer] = []
    for p in (bundled_path(name), user_path(name)):
        try:
            exists = p.is_file()
        except OSError as exc:  # e.g. a config directory this user cannot enter
            raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
        if exists:
            layers.append(Layer(str(p), read_yaml(p)))
    if not layers:
        known = ", ".join(site_names()) or "none"
        raise NotFound(f"unknown site {name!r} (known: {known}; add {user_path(name)})")
    base = None
    for layer in layers:
        if isinstance(layer.data.get("extends"), str):
            base = layer.data["extends"]
    if base:
        return _layers_for(base, seen + (name,)) + layers
    return layers


def load_site(
    name: str,
    overrides: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> LoadedSite:
    """The merged, validated profile for site `name`; `overrides` are flag values (dotted keys)."""
    from hpcfed.profiles.schema import SiteProfile  # the schema is built only when needed

    layers = _layers_for(name)
    env = env_layer(os.environ if environ is None else environ)
    if env:
        layers.append(env)
    if overrides:
        data: Dict[str, Any] = {}
        for dotted, value in overrides.items():
            node = data
            keys = dotted.split(".")
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        layers.append(Layer("flags", data))
    merged, provenance = merge(layers)
    try:
        profile = SiteProfile.model_validate(merged)
    except Exception as exc:  # hpcfed.model.ValidationError
        raise ConfigError(_one_line(exc, provenance, [layer.source for layer in layers])) from None
    files = tuple(layer.source for layer in layers if layer.source not in ("environment", "flags"))
    return LoadedSite(name=name, profile=profile, provenance=provenance, files=files)


def _one_line(exc: Exception, provenance: Mapping[str, str], order: List[str]) -> str:
    fallback = order[-1]
    errors = getattr(exc, "errors", None)
    if not errors:
        return f"{fallback}: {exc}"
    err = errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    dotted = ".".join(loc)
    source = fallback
    key = dotted
    while key:
        if key in provenance:
            source = provenance[key]
            break
        key = key.rpartition(".")[0]
    # An error about a whole section (e.g. two keys that disagree) names the latest file in it.
    inner = [provenance[k] for k in provenance if k.startswith(dotted + ".")] if dotted else []
    if inner:
        source = max(inner, key=lambda src: order.index(src) if src in order else -1)
    kind = err.get("type", "")
    value = err.get("input")
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err.get("msg")))
    else:
        msg = f"{err.get('msg', 'invalid')} (got {value!r})"
    more = len(errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    where = f"{source}: {dotted}" if dotted else source
    return f"{where}: {msg}{tail}"
