"""What a PromQL expression reads: the series selectors (metric name and label matchers) and the
labels its aggregations group by. A small tokenizer for the dashboard's expressions
(placement/grafana.py), not a PromQL parser: range selectors, grouping clauses, function calls,
numbers and operators are skipped; `label_values(selector, label)` (a Grafana variable query)
reads `label` of the selector's series."""

from __future__ import annotations

import re
from dataclasses import dataclass

KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"})
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[a-zA-Z_:][a-zA-Z0-9_:]*|\d+(?:\.\d+)?(?:e[+-]?\d+)?|\S')
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


@dataclass(frozen=True)
class Reads:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]  # labels named by by (...) / on (...), or by label_values


def matchers(block: str) -> tuple[tuple[str, str, str], ...]:
    """The matchers of a `{...}` block's inside; anything else in it is an error."""
    found, pos = [], 0
    while pos < len(block):
        m = MATCHER.match(block, pos)
        if m is None:
            if block[pos:].strip():
                raise ValueError(f"cannot read the label matchers {block!r} at {block[pos:]!r}")
            break
        found.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return tuple(found)


def reads(expr: str) -> Reads:
    variable = LABEL_VALUES.match(expr)
    if variable is not None:
        inner = reads(variable.group(1))
        return Reads(inner.selectors, inner.grouping | {variable.group(2)})
    text = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors: [5m], [$__rate_interval]
    grouping = frozenset(label.strip() for m in GROUPING.finditer(text) for label in m.group(1).split(",") if label.strip())
    text = GROUPING.sub(" ", text)
    selectors, pos = [], 0
    while (m := TOKEN.search(text, pos)) is not None:
        token, pos = m.group(0), m.end()
        if not re.match(r"[a-zA-Z_:]", token) or token in KEYWORDS:
            continue
        rest = text[pos:].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if rest.startswith("{"):
            start = text.index("{", pos)
            end = text.index("}", start)
            selectors.append(Selector(token, matchers(text[start + 1 : end])))
            pos = end + 1
        else:
            selectors.append(Selector(token, ()))
    return Reads(tuple(selectors), grouping)


def legend_labels(legend: str) -> set[str]:
    """The labels a Grafana legend format names ({{arm}})."""
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))
