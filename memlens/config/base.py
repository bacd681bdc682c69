"""The base of every config model, and reading, validating and merging YAML files.

All models forbid unknown keys, so a typo in a config is an error naming the key rather than a
silently ignored setting. :func:`load_yaml` turns validation errors into a one-line
:class:`~memlens.errors.MemlensError` naming every problem with its key path and YAML line.
"""

from __future__ import annotations

import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator

from memlens.errors import MemlensError
from memlens.io import prepare_output_dir, read_json, write_json

SUBSETS = ("S_S", "S_C", "S_I", "S_E")
Subset = Literal["S_S", "S_C", "S_I", "S_E"]
FRAMEWORKS = ("mae", "simclr", "simsiam", "dino", "supervised")
Framework = Literal["mae", "simclr", "simsiam", "dino", "supervised"]

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# The augmentation sets of memlens.data.augment (named here so that validating a config never imports torch).
AUGMENTATIONS = ("weak", "normal", "strong", "independent", "mae", "none")


def check_augmentation(name: str | None) -> str | None:
    """Field validator: None or the name of an augmentation set."""
    if name is not None and name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation set '{name}'; valid: {', '.join(AUGMENTATIONS)}")
    return name


def _count(v: int | str) -> int | str:
    """Field validator of workers/threads: 'auto' or a count (threads at least 1)."""
    if isinstance(v, int) and v < 0:
        raise ValueError("must be 'auto' or a number >= 0")
    return v


# ----------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def partial_model(model: type[BaseModel], *, drop: set[str], name: str) -> type[Strict]:
    """``model`` without the fields in ``drop``: the same types, defaults, descriptions and field
    validators, none of its model validators (those need the dropped fields; they run when the full
    model is built from the partial one). For a section of a file whose other fields its owner sets
    (a pipeline's ``train:`` and ``audit:``)."""
    fields = {k: (f.annotation, f) for k, f in model.model_fields.items() if k not in drop}
    validators = {}
    for vname, dec in model.__pydantic_decorators__.field_validators.items():
        keep = [f for f in dec.info.fields if f not in drop]
        if keep:  # dec.func is bound to model: a one-argument wrapper keeps pydantic from passing it info
            validators[vname] = field_validator(*keep, mode=dec.info.mode)(lambda v, _check=dec.func: _check(v))
    return create_model(name, __base__=Strict, __module__=model.__module__, __validators__=validators,
                        __doc__=f"{model.__name__} without {', '.join(sorted(drop))}", **fields)


def _model_at(model: type[BaseModel] | None, path: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``path`` (through nested models, lists and dicts)."""

    def models_in(tp) -> list[type[BaseModel]]:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [tp]
        out = []
        for arg in typing.get_args(tp):
            out += models_in(arg)
        return out

    current = model
    for part in path:
        if current is None:
            return None
        if isinstance(part, int) or part not in current.model_fields:
            continue  # a list index or a dict key: stay with the element type found below
        found = models_in(current.model_fields[part].annotation)
        current = found[0] if found else None
    return current


def yaml_lines(text: str) -> dict[tuple, int]:
    """Line numbers (1-based) of every key and list item of a YAML document, by key path."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = path + (key.value,)
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def format_validation_error(exc: ValidationError, *, source: str, model: type[BaseModel] | None = None,
                            lines: dict[tuple, int] | None = None) -> str:
    """Every problem at once, on one line: each with its key path, its YAML line where known, and a
    close match for a mistyped key."""

    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p not in ("function-after", "function-before"))
        # pydantic names union members in the path ("int", "literal['auto']"): not keys of the file
        loc = tuple(p for p in loc if not (isinstance(p, str) and (p in ("int", "float", "str", "bool", "list")
                                                                     or p.startswith(("literal[", "function")))))
        where = ".".join(str(p) for p in loc) or "(top level)"
        kind = err.get("type", "")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1]) if model else None
            word = getattr(parent, "unknown_word", "key") if parent else "key"
            msg = f"unknown {word}"
            if parent is not None and isinstance(loc[-1], str):
                fields = list(parent.model_fields)
                close = difflib.get_close_matches(loc[-1], fields, n=2, cutoff=0.6) or \
                    [f for f in fields if loc[-1].lower() in f.lower()][:2]
                if close:
                    msg += f"; did you mean {' or '.join(close)}?"
        elif kind == "missing":
            msg = "required"
        elif "input" in err and kind.startswith(("literal", "enum")):
            msg = f"{msg} (got {err['input']!r})"
        line = None
        if lines:
            for k in range(len(loc), 0, -1):
                if loc[:k] in lines:
                    line = lines[loc[:k]]
                    break
        problems.append((line or 10**9, f"{where}: {msg}" + (f" (line {line})" if line else "")))
    problems = list(dict.fromkeys(text for _, text in sorted(problems, key=lambda p: p[0])))
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems: " + "; ".join(problems)


def claim_resumable_dir(path: str | Path, *, marker: str, config: M, what: str, force: bool) -> Path:
    """Open the output directory of a resumable job (sweep, pipeline) for ``config``.

    A directory that already holds a record of the same job is resumed as is; one that holds a
    record of a different config, or files that are not ours, is refused unless ``force``
    (which starts afresh), so a rerun never mixes the outputs of two configs.

    Args:
        path: the output directory.
        marker: file name of the job record inside it (``sweep.json``, ``pipeline.json``).
        config: the validated config of the job; written to the record.
        what: name of the job in error messages.
        force: delete what is there and start again.

    Raises:
        MemlensError: the directory holds another config's output or foreign files.
    """

    out = Path(path)
    record = out / marker
    if not force:
        if record.is_file():
            previous = validate(type(config), read_json(record, what=f"{what} record")["config"], source=str(record))
            if previous != config:
                raise MemlensError(f"{out} holds a {what} with a different config; pass --force to start it again")
        elif out.is_dir() and any(out.iterdir()):
            raise MemlensError(f"{out} already holds other files; pass --force to overwrite it")
    prepare_output_dir(out, force=force, resume=not force, marker=marker)
    write_json(record, {"version": 1, "config": config.model_dump(mode="json")})
    return out


def validate(model: type[M], data: Any, *, source: str, lines: dict[tuple, int] | None = None) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MemlensError(format_validation_error(exc, source=source, model=model, lines=lines)) from None


MAX_YAML_VALUES = 100_000  # values of a settings file once its aliases are expanded


def expanded_size(root: Any, *, limit: int = MAX_YAML_VALUES) -> int:
    """Number of values a composed YAML document holds with every alias expanded, counted without
    expanding (each node's size memoised: aliases make the tree a DAG). Stops at ``limit`` + 1."""
    memo: dict[int, int] = {}

    def size(node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        memo[key] = limit + 1  # a cycle counts as unbounded
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        memo[key] = min(total, limit + 1)
        return memo[key]

    return size(root) if root is not None else 0


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        # aliases expand by multiplication: a nine-level "billion laughs" document is a few hundred bytes and
        # would exhaust memory in validation; refuse it before anything walks it
        if expanded_size(yaml.compose(text)) > MAX_YAML_VALUES:
            raise MemlensError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values (an alias "
                               f"bomb?); write the settings out without nested aliases")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise MemlensError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    except RecursionError:
        raise MemlensError(f"{path}: nested too deeply to be a settings file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MemlensError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MemlensError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_yaml(model: type[M], path: str | Path, *, overrides: dict[str, Any] | None = None) -> M:
    data = read_yaml(path)
    if overrides:
        data = deep_update(data, overrides)
    return validate(model, data, source=str(path), lines=yaml_lines(Path(path).read_text(encoding="utf-8")))


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a copy of ``base``; dotted keys ("dp.epsilon") address nested fields."""
    out = dict(base)
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            sub = out.get(head)
            out[head] = deep_update(sub if isinstance(sub, dict) else {}, {rest: value})
        elif isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = deep_update(out[head], value)
        else:
            out[head] = value
    return out


def parse_epsilon(v: Any) -> float:
    if isinstance(v, str) and v.strip().lower() in ("inf", "infinity", "+inf", "none", "non-private"):
        return math.inf
    try:
        eps = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon {v!r} is not a number or 'inf'") from None
    if not eps > 0:
        raise ValueError(f"epsilon must be positive, got {v!r}")
    return eps


def epsilon_list(v: Any) -> list[float]:
    if not isinstance(v, list):
        v = [v]
    out = [parse_epsilon(x) for x in v]
    if len(set(out)) != len(out):
        raise ValueError("epsilons are repeated")
    return out


def format_epsilon(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


