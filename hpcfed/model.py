"""Frozen, typed, checked records: what the site profile schema and the plan are made of.

Why not pydantic: `hpcfed submit` is a process on a login node, and importing pydantic and
building its validators cost ~70 ms of every submit (issue 17: a submit should feel like
sbatch). The schema needs a small part of it, kept here with the same names (model_validate,
model_dump, model_dump_json, field_validator, Field(ge=...)) so that the schema reads as before:

- fields are class annotations, in declaration order, bases first; a default makes one optional;
- unknown keys are refused; instances are frozen (compared and hashed by value);
- `strict=True` (class keyword) takes values only as written: no "22" for an int, no 1 for a bool;
  otherwise a JSON form is read back (lists for tuples, dicts for records and dataclasses);
- checks run in pydantic's order: "before" validators, the type, Field bounds, "after" validators,
  then model validators; every field is checked and each problem is reported with its key path
  (ValidationError.errors(), the shape the profile loader turns into one line).

Types understood: str, int, bool, float, None, Optional/Union, Literal, List, Tuple (fixed and
`...`), Dict, nested Model subclasses and frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple, Type, TypeVar

__all__ = ["Model", "Field", "ValidationError", "field_validator", "model_validator"]

_MISSING: Any = object()


class ValidationError(ValueError):
    """Values a record refused; errors() lists each with its key path (loc) and kind (type)."""

    def __init__(self, title: str, errors: List[Dict[str, Any]]):
        self.title = title
        self._errors = errors
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{title}: {where + ': ' if where else ''}{first.get('msg', '')}{more}")

    def errors(self) -> List[Dict[str, Any]]:
        return list(self._errors)


class _Invalid(Exception):
    """Problems inside one field's value, their key paths relative to that field."""

    def __init__(self, errors: List[Dict[str, Any]]):
        self.errors = errors

    def under(self, key: Any) -> _Invalid:
        """The same problems seen from one level up (key prepended to each path)."""
        return _Invalid([dict(e, loc=(key,) + tuple(e["loc"])) for e in self.errors])


def _err(kind: str, msg: str, value: Any, loc: Tuple[Any, ...] = (), **ctx: Any) -> Dict[str, Any]:
    error = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx:
        error["ctx"] = ctx
    return error


def _invalid(kind: str, msg: str, value: Any, **ctx: Any) -> _Invalid:
    return _Invalid([_err(kind, msg, value, **ctx)])


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    default: Any = _MISSING
    ge: Optional[float] = None
    le: Optional[float] = None


def Field(
    default: Any = _MISSING, *, ge: Optional[float] = None, le: Optional[float] = None
) -> Any:
    """A field's default and bounds (`ge`/`le`: inclusive), as in `port: int = Field(22, ge=1)`."""
    return FieldInfo(default, ge, le)


@dataclasses.dataclass(frozen=True)
class _Validator:
    fields: Tuple[str, ...]  # empty: a model validator
    mode: str  # "before" or "after"
    func: Callable[..., Any]


def field_validator(*fields: str, mode: str = "after") -> Callable[[Any], Any]:
    """A check of named fields: a classmethod (cls, value) -> value that raises ValueError."""

    def mark(func: Any) -> Any:
        return _Validator(fields, mode, func.__func__ if isinstance(func, classmethod) else func)

    return mark


def model_validator(*, mode: str = "after") -> Callable[[Any], Any]:
    """A check of the whole record once its fields are valid: (self) -> self, or ValueError."""
    if mode != "after":
        raise ValueError("only mode='after' model validators are supported")

    def mark(func: Any) -> Any:
        return _Validator((), mode, func)

    return mark


class Model:
    """A frozen record with checked fields (see the module's docstring)."""

    __strict__: ClassVar[bool] = False
    __annotated__: ClassVar[Tuple[str, ...]] = ()  # own and inherited field names, in order
    __defaults__: ClassVar[Dict[str, FieldInfo]] = {}
    __validators__: ClassVar[Tuple[_Validator, ...]] = ()
    __types__: ClassVar[Optional[Dict[str, Any]]] = None  # resolved on first use
    _own_fields: ClassVar[Dict[str, FieldInfo]] = {}
    _own_checks: ClassVar[Tuple[_Validator, ...]] = ()

    def __init_subclass__(cls, strict: Optional[bool] = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if strict is not None:
            cls.__strict__ = strict
        own: Dict[str, FieldInfo] = {}
        for name in cls.__dict__.get("__annotations__", {}):
            if not name.startswith("_"):
                value = cls.__dict__.get(name, _MISSING)
                own[name] = value if isinstance(value, FieldInfo) else FieldInfo(value)
        checks = [v for v in cls.__dict__.values() if isinstance(v, _Validator)]
        # The class attributes become the record's fields and checks; instances hold the values.
        for attr in [a for a, v in cls.__dict__.items() if a in own or isinstance(v, _Validator)]:
            delattr(cls, attr)
        cls._own_fields, cls._own_checks = own, tuple(checks)
        infos: Dict[str, FieldInfo] = {}
        validators: List[_Validator] = []
        for klass in reversed(cls.__mro__):
            infos.update(klass.__dict__.get("_own_fields", {}))
            validators.extend(klass.__dict__.get("_own_checks", ()))
        cls.__annotated__ = tuple(infos)
        cls.__defaults__ = infos
        cls.__validators__ = tuple(validators)
        cls.__types__ = None

    # -- construction ----------------------------------------------------------------------

    def __init__(self, **values: Any) -> None:
        try:
            checked = type(self)._check(values)
        except _Invalid as exc:
            raise ValidationError(type(self).__name__, exc.errors) from None
        object.__setattr__(self, "__dict__", checked.__dict__)

    @classmethod
    def model_validate(cls: Type[M], data: Any) -> M:
        """A record from a mapping (a profile's YAML, a plan's JSON); ValidationError if refused."""
        try:
            return cls._convert(data)
        except _Invalid as exc:
            raise ValidationError(cls.__name__, exc.errors) from None

    @classmethod
    def model_validate_json(cls: Type[M], text: str) -> M:
        try:
            data = json.loads(text)
        except ValueError as exc:
            error = _err("json_invalid", f"Invalid JSON: {exc}", text)
            raise ValidationError(cls.__name__, [error]) from None
        return cls.model_validate(data)

    @classmethod
    def _convert(cls: Type[M], value: Any) -> M:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise _invalid(
                "model_type", f"Input should be a mapping of {cls.__name__}'s keys", value
            )
        return cls._check(value)

    @classmethod
    def _types(cls) -> Dict[str, Any]:
        if cls.__types__ is None:  # annotations are strings until a record is first checked
            hints = typing.get_type_hints(cls)
            cls.__types__ = {name: hints[name] for name in cls.__annotated__}
        return cls.__types__

    @classmethod
    def _check(cls: Type[M], data: Dict[str, Any]) -> M:
        errors = _unknown_keys(data, cls.__defaults__)
        types = cls._types()
        values: Dict[str, Any] = {}
        for name in cls.__annotated__:
            info = cls.__defaults__[name]
            if name not in data:
                if info.default is _MISSING:
                    errors.append(_err("missing", "Field required", data, (name,)))
                else:
                    values[name] = _copy_default(info.default)
                continue
            try:
                values[name] = cls._field(name, data[name], types[name], info)
            except _Invalid as exc:
                errors.extend(exc.under(name).errors)
        if errors:
            raise _Invalid(errors)
        record = object.__new__(cls)
        object.__setattr__(record, "__dict__", values)
        for check in cls.__validators__:
            if not check.fields:
                try:
                    record = check.func(record)
                except ValueError as exc:
                    raise _value_error(exc, data) from None
        return record

    @classmethod
    def _field(cls, name: str, value: Any, tp: Any, info: FieldInfo) -> Any:
        checks = [v for v in cls.__validators__ if name in v.fields]
        value = _run_checks(cls, checks, "before", value)
        value = _convert(value, tp, cls.__strict__)
        if info.ge is not None and value is not None and value < info.ge:
            msg = f"Input should be greater than or equal to {info.ge}"
            raise _invalid("greater_than_equal", msg, value, ge=info.ge)
        if info.le is not None and value is not None and value > info.le:
            msg = f"Input should be less than or equal to {info.le}"
            raise _invalid("less_than_equal", msg, value, le=info.le)
        return _run_checks(cls, checks, "after", value)

    # -- reading -----------------------------------------------------------------------------

    def model_dump(
        self, mode: str = "python", exclude: Optional[Iterable[str]] = None
    ) -> Dict[str, Any]:
        """The fields as plain data (mode="json": lists for tuples, as JSON reads back)."""
        skip = set(exclude or ())
        as_json = mode == "json"
        return {n: _dump(getattr(self, n), as_json) for n in self.__annotated__ if n not in skip}

    def model_dump_json(
        self, indent: Optional[int] = None, exclude: Optional[Iterable[str]] = None
    ) -> str:
        data = self.model_dump(mode="json", exclude=exclude)
        separators = (",", ": ") if indent is not None else (",", ":")
        return json.dumps(data, indent=indent, ensure_ascii=False, separators=separators)

    def model_copy(self: M, update: Optional[Dict[str, Any]] = None) -> M:
        """A copy with some fields replaced, unchecked (as pydantic's): for tests and repairs."""
        record = object.__new__(type(self))
        object.__setattr__(record, "__dict__", dict(self.__dict__, **(update or {})))
        return record

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self),) + tuple(_hashable(getattr(self, n)) for n in self.__annotated__))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__annotated__)
        return f"{type(self).__name__}({inner})"


M = TypeVar("M", bound=Model)

# -- one value against its declared type ------------------------------------------------------

_SCALARS = {str: "a valid string", int: "a valid integer", bool: "a valid boolean"}
_LAX_BOOLS = {"true": True, "false": False, "1": True, "0": False, 1: True, 0: False}


def _run_checks(cls: type, checks: List[_Validator], mode: str, value: Any) -> Any:
    try:
        for check in checks:
            if check.mode == mode:
                value = check.func(cls, value)
    except ValueError as exc:
        raise _value_error(exc, value) from None
    return value


def _value_error(exc: ValueError, value: Any) -> _Invalid:
    return _invalid("value_error", f"Value error, {exc}", value, error=exc)


def _unknown_keys(data: Dict[str, Any], known: Iterable[str]) -> List[Dict[str, Any]]:
    msg = "Extra inputs are not permitted"
    return [_err("extra_forbidden", msg, data[k], (k,)) for k in data if k not in known]


def _scalar(value: Any, tp: Any, strict: bool) -> Any:
    """str, int and bool; lax (strict=False) also takes their JSON-ish spellings ("22", "true")."""
    if tp not in _SCALARS:
        raise TypeError(f"hpcfed.model: unsupported type {tp!r}")
    if type(value) is tp:
        return value
    if not strict and tp is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if not strict and tp is bool and isinstance(value, (str, int)) and value in _LAX_BOOLS:
        return _LAX_BOOLS[value]
    raise _invalid(f"{tp.__name__}_type", f"Input should be {_SCALARS[tp]}", value)


def _convert(value: Any, tp: Any, strict: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _union(value, args, strict)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = " or ".join(repr(a) for a in args)
        raise _invalid("literal_error", f"Input should be {choices}", value, expected=choices)
    if origin is list:
        if not isinstance(value, list) and (strict or not isinstance(value, tuple)):
            raise _invalid("list_type", "Input should be a valid list", value)
        return [_item(i, v, args[0], strict) for i, v in enumerate(value)]
    if origin is tuple:
        return _tuple(value, args, strict)
    if origin is dict:
        if not isinstance(value, dict):
            raise _invalid("dict_type", "Input should be a valid dictionary", value)
        return {
            _item(k, k, args[0], strict): _item(k, v, args[1], strict) for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, Model):
        return tp._convert(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, strict)
    return _scalar(value, tp, strict)


def _union(value: Any, options: Tuple[Any, ...], strict: bool) -> Any:
    if value is None and type(None) in options:
        return None
    first: Optional[_Invalid] = None
    for option in options:
        if option is not type(None):
            try:
                return _convert(value, option, strict)
            except _Invalid as exc:
                first = first or exc
    raise first or _invalid("none_required", "Input should be None", value)


def _tuple(value: Any, args: Tuple[Any, ...], strict: bool) -> Tuple[Any, ...]:
    # strict or not, a tuple is stored as a JSON list: both are taken
    if not isinstance(value, (list, tuple)):
        raise _invalid("tuple_type", "Input should be a valid tuple", value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_item(i, v, args[0], strict) for i, v in enumerate(value))
    if len(value) != len(args):
        raise _invalid("too_short", f"Tuple should have {len(args)} items", value)
    return tuple(_item(i, v, a, strict) for i, (v, a) in enumerate(zip(value, args)))


def _item(key: Any, value: Any, tp: Any, strict: bool) -> Any:
    try:
        return _convert(value, tp, strict)
    except _Invalid as exc:
        raise exc.under(key) from None


def _dataclass(tp: type, value: Any, strict: bool) -> Any:
    """A frozen dataclass inside a record (e.g. the plan's input files), read from its dict."""
    if isinstance(value, tp):
        return value
    if strict or not isinstance(value, dict):
        raise _invalid(
            "dataclass_type", f"Input should be a mapping of {tp.__name__}'s keys", value
        )
    hints = typing.get_type_hints(tp)
    fields = dataclasses.fields(tp)
    errors = _unknown_keys(value, [f.name for f in fields])
    out: Dict[str, Any] = {}
    for f in fields:
        if f.name in value:
            try:
                out[f.name] = _convert(value[f.name], hints[f.name], strict)
            except _Invalid as exc:
                errors.extend(exc.under(f.name).errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(_err("missing", "Field required", value, (f.name,)))
    if errors:
        raise _Invalid(errors)
    return tp(**out)


def _copy_default(default: Any) -> Any:
    # a list or dict default is the class's: each record gets its own
    return type(default)(default) if isinstance(default, (list, dict)) else default


def _dump(value: Any, as_json: bool) -> Any:
    if isinstance(value, Model):
        return value.model_dump(mode="json" if as_json else "python")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _dump(getattr(value, f.name), as_json) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _dump(v, as_json) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_dump(v, as_json) for v in value]
        return items if as_json or isinstance(value, list) else tuple(items)
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value
