"""YAML reading that remembers where every key came from.

Validation errors must name file, line and key path; PyYAML's composed node tree
carries the marks, so documents are built from it instead of ``yaml.safe_load``.
Duplicate keys, which PyYAML silently accepts, are reported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError, ConfigProblem

Loc = tuple[str | int, ...]
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


def format_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class SourceMap:
    """Maps key paths of a loaded document to 1-based line numbers."""

    file: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_for(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def problem(self, loc: Loc, message: str) -> ConfigProblem:
        return ConfigProblem(self.file, self.line_for(loc), format_path(loc), message)


class _Builder:
    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.loader = yaml.SafeLoader("")
        self.problems: list[ConfigProblem] = []

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.source.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool):
                    self.problems.append(
                        self.source.problem(loc, f"unsupported mapping key {key!r}")
                    )
                    continue
                child = (*loc, key if isinstance(key, str | int) else str(key))
                line = key_node.start_mark.line + 1
                if key in result:
                    first = self.source.lines.get(child)
                    self.problems.append(
                        ConfigProblem(
                            self.source.file, line, format_path(child),
                            f"duplicate key (first defined on line {first})",
                        )
                    )
                    continue
                self.source.lines[child] = line
                result[key] = self.build(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)


def load_yaml_text(text: str, file: str) -> tuple[Any, SourceMap]:
    source = SourceMap(file)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError.single(file, f"YAML syntax error: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(file, f"YAML error: {exc}") from None
    if node is None:
        raise ConfigError.single(file, "the file is empty", 1)
    builder = _Builder(source)
    try:
        data = builder.build(node, ())
    except yaml.YAMLError as exc:
        raise ConfigError.single(file, f"YAML error: {exc}") from None
    if builder.problems:
        raise ConfigError(builder.problems)
    return data, source


def load_yaml_file(path: Path) -> tuple[Any, SourceMap]:
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ConfigError.single(str(path), f"file is {size} bytes, over the 4 MiB limit")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError.single(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(str(path), f"cannot read: {exc}") from None
    return load_yaml_text(text, str(path))
