"""Load a YAML file into a pydantic model, reporting mistakes by file, line and key."""

import typing
from pathlib import Path
from typing import TypeVar

import pydantic
import yaml

from builder.errors import UserError

Model = TypeVar("Model", bound=pydantic.BaseModel)


def _to_python(node: yaml.Node, file: Path, loc: tuple, lines: dict[tuple, int]) -> object:
    """Turn a composed YAML node into plain data, noting the line of every key path."""
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            line = key_node.start_mark.line + 1
            if key in result:
                raise UserError(f"{file}:{line}: key '{key}' appears twice", "keep one of them")
            lines[loc + (key,)] = line
            result[key] = _to_python(value_node, file, loc + (key,), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, file, loc + (i,), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int:
    """The line of the deepest known part of a validation error's location."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def load_model(path: Path, model: type[Model]) -> Model:
    """Parse and validate `path` as `model`; every mistake becomes one UserError line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file", "give a YAML file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it: {err.strerror}") from None

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        raise UserError(f"{path}:{line}: malformed YAML: {err.problem}",
                        "fix the syntax at that line") from None
    if root is None:
        raise UserError(f"{path}: the file is empty")

    lines: dict[tuple, int] = {}
    data = _to_python(root, path, (), lines)

    if not isinstance(data, dict):
        raise UserError(f"{path}:1: expected keys and values (a YAML mapping), found "
                        f"{type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        # A misspelt key also makes the key it was meant to be missing: name the misspelling.
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc, message = tuple(first["loc"]), first["msg"].removeprefix("Value error, ")
        # A check across several keys (a model validator) names the key it is about as
        # "@a.b.c: ..." at the start of its message.
        if not loc and message.startswith("@"):
            where, message = message[1:].split(": ", 1)
            loc = tuple(where.split("."))
        key = ".".join(str(part) for part in loc) or "(top level)"
        line = _line_of(loc, lines)
        if first["type"] == "extra_forbidden":
            known = ", ".join(sorted(_fields_at(model, loc[:-1])))
            raise UserError(f"{path}:{line}: unknown key '{key}'",
                            f"known keys here: {known}" if known else None) from None
        raise UserError(f"{path}:{line}: {key}: {message}") from None


def _fields_at(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """The field names a model accepts at a location, for the unknown-key hint. The location
    may pass through lists (an index) and dicts (a key), as in nodes.backend."""
    current: object = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        elif typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        else:
            current = _model_in(current)
            if current is None or str(part) not in current.model_fields:
                return []
            current = current.model_fields[str(part)].annotation
    found = _model_in(current)
    return list(found.model_fields) if found else []


def _model_in(annotation: object) -> object:
    """The pydantic model inside an annotation such as `dict[str, Node]` or `Vrrp | None`."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in reversed(getattr(annotation, "__args__", ())):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
