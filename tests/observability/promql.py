"""A small PromQL parser and label checker for the dashboards' and rules' expressions.

It parses the PromQL subset Grafana dashboards and alert rules use (selectors, range vectors
and subqueries, ``offset``/``@``, functions, aggregations with ``by``/``without``, binary
operators with ``bool``/``on``/``ignoring``/``group_left``/``group_right``) and infers the label
set of every sub-expression from :mod:`salamander.metrics`, so that a test can tell, without a
Prometheus server:

* which series names an expression reads (:func:`metric_names`),
* whether a selector, a matcher, a ``by``/``on`` clause or a ``histogram_quantile`` names a
  label the series does not have, whether ``rate``/``increase`` is applied to a gauge, and
  whether a one-to-one binary operation compares vectors whose label sets differ (such an
  expression returns nothing, silently) (:func:`problems`).

Grafana variables (``$namespace``, ``[$__rate_interval]``) may appear inside strings and
range brackets; anywhere else they are a syntax error, as for Prometheus. Syntax beyond this
subset raises :class:`PromQLSyntaxError`; ``promtool`` remains the judge of full validity.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from salamander.metrics import CATALOG, Metric

__all__ = ["PromQLSyntaxError", "Selector", "parse", "selectors", "metric_names", "problems"]

# Prometheus adds these to every scraped series (the scrape job and the target's address).
TARGET_LABELS = frozenset({"job", "instance"})
# Labels whose values are identifiers, not enumerations: no value check for their matchers.
FREE_LABELS = frozenset({"namespace", "trainingjob", "rank", "reason", "le", "job", "instance"})

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
PRECEDENCE = {"or": 1, "and": 2, "unless": 2, "==": 3, "!=": 3, "<": 3, ">": 3, "<=": 3, ">=": 3,
              "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6}
SET_OPS = frozenset({"and", "or", "unless"})
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
GAUGE_FUNCTIONS = frozenset({"delta", "idelta", "deriv", "predict_linear"})
SCALAR_FUNCTIONS = frozenset({"time", "pi", "scalar", "minute", "hour", "day_of_month", "day_of_week",
                              "day_of_year", "days_in_month", "month", "year"})

_TOKEN = re.compile(r"""
  (?P<ws>\s+|\#[^\n]*)
| (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
| (?P<dur>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w.]))
| (?P<num>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
| (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
| (?P<var>\$\{?\w+\}?)
| (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=,(){}\[\]@:])
""", re.X)


class PromQLSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    pos: int


def tokenize(expr: str) -> list[Tok]:
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise PromQLSyntaxError(f"unexpected character at {pos}: {expr[pos:pos + 20]!r}")
        if m.lastgroup != "ws":
            toks.append(Tok(m.lastgroup or "", m.group(), pos))
        pos = m.end()
    toks.append(Tok("eof", "", len(expr)))
    return toks


# --------------------------------------------------------------------------- AST

@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    name: str | None
    matchers: tuple[Matcher, ...]
    pos: int


@dataclass(frozen=True)
class Literal:
    kind: str  # "num" or "str"
    value: str


@dataclass(frozen=True)
class Range:
    """``expr[range]`` (a range vector) or ``expr[range:step]`` (a subquery); offset/@ too."""

    expr: Node
    text: str


@dataclass(frozen=True)
class Unary:
    op: str
    expr: Node


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Aggregation:
    op: str
    grouping: tuple[str, ...]
    without: bool
    has_clause: bool
    param: Node | None
    expr: Node


@dataclass(frozen=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node
    matching: str | None = None  # "on" or "ignoring"
    matching_labels: tuple[str, ...] = ()
    group: str | None = None  # "group_left" or "group_right"
    group_labels: tuple[str, ...] = ()


Node = Selector | Literal | Range | Unary | Call | Aggregation | Binary


def _unquote(s: str) -> str:
    if s[0] == "`":
        return s[1:-1]
    return re.sub(r"\\(.)", r"\1", s[1:-1])


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr, self.toks, self.i = expr, tokenize(expr), 0

    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def peek(self, n: int = 1) -> Tok:
        return self.toks[min(self.i + n, len(self.toks) - 1)]

    def next(self) -> Tok:
        t = self.tok
        self.i += 1
        return t

    def error(self, what: str) -> PromQLSyntaxError:
        t = self.tok
        return PromQLSyntaxError(f"{what} at {t.pos} ({t.text!r}) in {self.expr!r}")

    def expect(self, text: str) -> Tok:
        if self.tok.text != text:
            raise self.error(f"expected {text!r}")
        return self.next()

    def accept(self, *texts: str) -> Tok | None:
        return self.next() if self.tok.text in texts and self.tok.kind in ("op", "ident") else None

    def parse(self) -> Node:
        node = self.expression(0)
        if self.tok.kind != "eof":
            raise self.error("unexpected token")
        return node

    def label_list(self) -> tuple[str, ...]:
        self.expect("(")
        labels: list[str] = []
        while self.tok.text != ")":
            if self.tok.kind != "ident":
                raise self.error("expected a label name")
            labels.append(self.next().text)
            if not self.accept(","):
                break
        self.expect(")")
        return tuple(labels)

    def binary_op(self) -> str | None:
        t = self.tok
        if (t.kind == "op" or t.kind == "ident") and t.text in PRECEDENCE:
            return t.text
        return None

    def expression(self, min_prec: int) -> Node:
        lhs = self.unary()
        while (op := self.binary_op()) is not None and PRECEDENCE[op] >= min_prec:
            self.next()
            self.accept("bool")
            matching = group = None
            matching_labels: tuple[str, ...] = ()
            group_labels: tuple[str, ...] = ()
            if (m := self.accept("on", "ignoring")) is not None:
                matching, matching_labels = m.text, self.label_list()
            if (g := self.accept("group_left", "group_right")) is not None:
                group = g.text
                if self.tok.text == "(":
                    group_labels = self.label_list()
            rhs = self.expression(PRECEDENCE[op] if op == "^" else PRECEDENCE[op] + 1)
            lhs = Binary(op, lhs, rhs, matching, matching_labels, group, group_labels)
        return lhs

    def unary(self) -> Node:
        if self.tok.text in ("-", "+") and self.tok.kind == "op":
            op = self.next().text
            return Unary(op, self.expression(PRECEDENCE["^"]))
        return self.postfix(self.primary())

    def postfix(self, node: Node) -> Node:
        while True:
            if self.tok.text == "[":
                start = self.next().pos
                while self.tok.text != "]":
                    if self.tok.kind == "eof":
                        raise self.error("unterminated range")
                    self.next()
                text = self.expr[start + 1:self.next().pos]
                node = Range(node, text)
            elif self.tok.text == "offset" and self.tok.kind == "ident":
                self.next()
                self.accept("-")
                if self.tok.kind not in ("dur", "var", "num"):
                    raise self.error("expected a duration")
                self.next()
            elif self.tok.text == "@":
                self.next()
                if self.accept("start", "end"):
                    self.expect("(")
                    self.expect(")")
                elif self.tok.kind in ("num", "var"):
                    self.next()
                else:
                    raise self.error("expected a timestamp")
            else:
                return node

    def primary(self) -> Node:
        t = self.tok
        if t.kind == "num" or t.kind == "dur":
            self.next()
            return Literal("num", t.text)
        if t.kind == "ident" and t.text.lower() in ("inf", "nan") and self.peek().text not in ("{", "("):
            self.next()
            return Literal("num", t.text)
        if t.kind == "str":
            self.next()
            return Literal("str", _unquote(t.text))
        if t.text == "(":
            self.next()
            node = self.expression(0)
            self.expect(")")
            return node
        if t.text == "{":
            return self.selector(None, t.pos)
        if t.kind == "ident":
            if t.text in AGGREGATIONS and (self.peek().text in ("(", "by", "without")):
                return self.aggregation()
            if self.peek().text == "(":
                return self.call()
            self.next()
            return self.selector(t.text, t.pos) if self.tok.text == "{" else Selector(t.text, (), t.pos)
        raise self.error("expected an expression")

    def selector(self, name: str | None, pos: int) -> Selector:
        self.expect("{")
        matchers: list[Matcher] = []
        while self.tok.text != "}":
            if self.tok.kind not in ("ident", "str"):
                raise self.error("expected a label name")
            label = self.next().text
            if self.tok.text not in ("=", "!=", "=~", "!~"):
                raise self.error("expected a matcher operator")
            op = self.next().text
            if self.tok.kind != "str":
                raise self.error("expected a string")
            matchers.append(Matcher(label, op, _unquote(self.next().text)))
            if not self.accept(","):
                break
        self.expect("}")
        if name is None:
            names = [m.value for m in matchers if m.label == "__name__" and m.op == "="]
            name = names[0] if names else None
        return Selector(name, tuple(matchers), pos)

    def call(self) -> Call:
        fn = self.next().text
        self.expect("(")
        args: list[Node] = []
        while self.tok.text != ")":
            args.append(self.expression(0))
            if not self.accept(","):
                break
        self.expect(")")
        return Call(fn, tuple(args))

    def aggregation(self) -> Aggregation:
        op = self.next().text
        grouping: tuple[str, ...] = ()
        without = has_clause = False
        if (kw := self.accept("by", "without")) is not None:
            without, has_clause, grouping = kw.text == "without", True, self.label_list()
        self.expect("(")
        first = self.expression(0)
        param = None
        if self.accept(","):
            param, first = first, self.expression(0)
        self.expect(")")
        if not has_clause and (kw := self.accept("by", "without")) is not None:
            without, has_clause, grouping = kw.text == "without", True, self.label_list()
        return Aggregation(op, grouping, without, has_clause, param, first)


def parse(expr: str) -> Node:
    """The expression's syntax tree; raises :class:`PromQLSyntaxError`."""
    return _Parser(expr).parse()


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, (Range, Unary)):
        yield from _walk(node.expr)
    elif isinstance(node, Call):
        for a in node.args:
            yield from _walk(a)
    elif isinstance(node, Aggregation):
        if node.param is not None:
            yield from _walk(node.param)
        yield from _walk(node.expr)
    elif isinstance(node, Binary):
        yield from _walk(node.lhs)
        yield from _walk(node.rhs)


def selectors(expr: str) -> list[Selector]:
    return [n for n in _walk(parse(expr)) if isinstance(n, Selector)]


def metric_names(expr: str) -> set[str]:
    """Every series name the expression selects (``salamander_*`` or not)."""
    return {s.name for s in selectors(expr) if s.name}


# --------------------------------------------------------------------------- label checking

def _by_series(catalog: tuple[Metric, ...]) -> dict[str, Metric]:
    return {s: m for m in catalog for s in m.series_names()}


ANY = frozenset({"*"})  # the labels of something unknown: every label check passes


def _has(labels: frozenset[str], label: str) -> bool:
    return "*" in labels or label in labels


@dataclass
class _Checker:
    series: Mapping[str, Metric]
    found: list[str] = field(default_factory=list)

    def labels(self, node: Node) -> frozenset[str] | None:
        """The label names of the node's result; ``None`` for scalars and strings."""
        if isinstance(node, Literal):
            return None
        if isinstance(node, Selector):
            return self.selector(node)
        if isinstance(node, (Range, Unary)):
            return self.labels(node.expr)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, Aggregation):
            return self.aggregation(node)
        return self.binary(node)

    def selector(self, s: Selector) -> frozenset[str]:
        metric = self.series.get(s.name or "")
        if metric is None:
            self.found.append(f"{s.name}: not an exported series")
            return ANY
        labels = frozenset(metric.labels) | TARGET_LABELS
        if s.name and s.name.endswith("_bucket") and metric.kind == "histogram":
            labels |= {"le"}
        for m in s.matchers:
            if m.label == "__name__":
                continue
            if m.label not in labels:
                self.found.append(f"{s.name}{{{m.label}{m.op}...}}: {s.name} has no label {m.label!r}")
            elif (m.op == "=" and m.label not in FREE_LABELS and "$" not in m.value
                  and m.value.lower() not in metric.help.lower()):
                self.found.append(f"{s.name}{{{m.label}={m.value!r}}}: {m.value!r} is not a value the "
                                  f"metric's help names")
        return labels

    def call(self, c: Call) -> frozenset[str] | None:
        args = [self.labels(a) for a in c.args]
        if c.fn in COUNTER_FUNCTIONS | GAUGE_FUNCTIONS:
            for n in _walk(c.args[0]) if c.args else ():
                if isinstance(n, Selector) and (m := self.series.get(n.name or "")) is not None:
                    counter = m.kind == "counter" or (m.kind == "histogram" and n.name != m.name)
                    if c.fn in COUNTER_FUNCTIONS and not counter:
                        self.found.append(f"{c.fn}({n.name}): {n.name} is a {m.kind}, not a counter")
                    if c.fn in GAUGE_FUNCTIONS and counter:
                        self.found.append(f"{c.fn}({n.name}): {n.name} is a counter; use rate/increase")
        if c.fn in SCALAR_FUNCTIONS:
            return None
        if c.fn == "vector":
            return frozenset()
        if c.fn == "histogram_quantile":
            v = args[1] if len(args) > 1 else None
            if v is None:
                self.found.append("histogram_quantile without a vector argument")
                return ANY
            if not _has(v, "le"):
                self.found.append(f"histogram_quantile over labels {sorted(v)} without 'le' "
                                  "(aggregate with 'by (..., le)' over a _bucket series)")
            return v - {"le"}
        if c.fn in ("label_replace", "label_join"):
            v = args[0] if args and args[0] is not None else ANY
            dst = c.args[1] if len(c.args) > 1 else None
            for src in c.args[3:4] if c.fn == "label_replace" else c.args[3:]:
                if isinstance(src, Literal) and src.value and not _has(v, src.value):
                    self.found.append(f"{c.fn}: source label {src.value!r} not in {sorted(v)}")
            return v | ({dst.value} if isinstance(dst, Literal) else ANY)
        if c.fn in ("absent", "absent_over_time"):
            return frozenset(m.label for n in _walk(c.args[0]) if isinstance(n, Selector)
                             for m in n.matchers if m.op == "=")
        return next((a for a in args if a is not None), None)

    def aggregation(self, a: Aggregation) -> frozenset[str]:
        if a.param is not None:
            self.labels(a.param)
        inner = self.labels(a.expr)
        if inner is None:
            self.found.append(f"{a.op}(...) over a scalar")
            return ANY
        for label in a.grouping:
            if not _has(inner, label):
                self.found.append(f"{a.op} {'without' if a.without else 'by'} ({label}): no such label "
                                  f"in {sorted(inner - TARGET_LABELS)}")
        if a.op in ("topk", "bottomk", "limitk", "limit_ratio"):
            return inner
        if a.without:
            out = inner - set(a.grouping)
        else:
            out = frozenset(a.grouping)
        if a.op == "count_values" and isinstance(a.param, Literal):
            out |= {a.param.value}
        return out

    def binary(self, b: Binary) -> frozenset[str] | None:
        lhs, rhs = self.labels(b.lhs), self.labels(b.rhs)
        if lhs is None or rhs is None:
            if b.op in SET_OPS:
                self.found.append(f"'{b.op}' needs vectors on both sides")
            return rhs if lhs is None else lhs
        if b.matching == "on":
            for label in b.matching_labels:
                for side, labels in (("left", lhs), ("right", rhs)):
                    if not _has(labels, label):
                        self.found.append(f"on ({label}): not a label of the {side} side {sorted(labels)}")
        if b.op in SET_OPS:
            return lhs | rhs if b.op == "or" else lhs
        if b.group is None and "*" not in lhs | rhs:
            ignored = set(b.matching_labels) if b.matching == "ignoring" else set()
            if b.matching == "on":
                pass  # one-to-one on the listed labels: checked above
            elif lhs - ignored != rhs - ignored:
                self.found.append(f"'{b.op}' matches one-to-one on all labels, but the sides differ: "
                                  f"{sorted(lhs)} vs {sorted(rhs)} (aggregate or use on(...))")
        if b.group == "group_left":
            for label in b.group_labels:
                if not _has(rhs, label):
                    self.found.append(f"group_left ({label}): not a label of the right side")
            return lhs | set(b.group_labels)
        if b.group == "group_right":
            for label in b.group_labels:
                if not _has(lhs, label):
                    self.found.append(f"group_right ({label}): not a label of the left side")
            return rhs | set(b.group_labels)
        return lhs


def problems(expr: str, catalog: tuple[Metric, ...] = CATALOG) -> list[str]:
    """Everything wrong with the expression's names and labels, against the catalog; ``[]`` when
    every series it selects is exported and every label it names exists where it is used.
    Only ``salamander_`` series are checked against the catalog; other names are problems too
    (dashboards read nothing else)."""
    checker = _Checker(_by_series(catalog))
    checker.labels(parse(expr))
    return checker.found


def result_labels(expr: str, catalog: tuple[Metric, ...] = CATALOG) -> frozenset[str] | None:
    """The label names of the expression's result (``None``: a scalar)."""
    return _Checker(_by_series(catalog)).labels(parse(expr))
