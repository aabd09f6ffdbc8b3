"""``--where``: a small, safe expression language for cuts on catalogue columns (no ``eval``).

    type != 'PSF' and mag_r < 19
    (mag_g - ...)            rejected: no arithmetic
    shape_r >= 1.5 or not (type == 'PSF' or type == 'DUP')
    type in ('SER', 'DEV') and 17 < mag_z <= 20

The text is parsed with :func:`ast.parse` and every node is checked against a whitelist: comparisons
(``== != < <= > >=``, chained, ``in`` / ``not in`` a tuple of constants), ``and`` / ``or`` / ``not``,
parentheses, column names, numbers (a leading ``-`` allowed), strings, ``True`` / ``False``. Anything else
(calls, attributes, subscripts, arithmetic, lambdas, comprehensions, ...) is refused with a one-line
:class:`~galaxalign_batch.errors.ConfigError` naming it. The checked tree is evaluated on numpy columns
by this module's own interpreter.

Column names are case-insensitive. ``mag_<band>`` (``mag_g``, ``mag_r``, ``mag_z``, ...) is derived from
``flux_<band>`` in nanomaggies: ``22.5 - 2.5 log10(flux)``, NaN where the flux is not positive; a
comparison with NaN is false (so ``mag_r < 19`` leaves out sources without a positive r flux, and
``not mag_r < 19`` keeps them). String columns are compared after stripping blanks (Tractor's ``type``
is ``'PSF '`` in the files).
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from galaxalign_batch.errors import ConfigError

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_SYMBOL = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
           ast.In: "in", ast.NotIn: "not in"}
_MAG = re.compile(r"^mag_([a-z0-9]+)$")
#: the nanomaggy zero point of Legacy Survey fluxes
ZERO_POINT = 22.5
MAX_LENGTH = 2000

_DESCRIBE = {ast.Call: "a function call", ast.Attribute: "an attribute", ast.Subscript: "a subscript",
             ast.BinOp: "arithmetic", ast.Lambda: "a lambda", ast.IfExp: "a conditional expression",
             ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
             ast.GeneratorExp: "a comprehension", ast.Dict: "a dict", ast.Set: "a set", ast.Starred: "a starred value",
             ast.NamedExpr: "an assignment", ast.JoinedStr: "an f-string", ast.Await: "await", ast.Yield: "yield"}


def _what(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp):
        return f"arithmetic ({type(node.op).__name__})"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return "'~' (write 'not')"
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _SYMBOL:
                return f"the operator {type(op).__name__}"
    return _DESCRIBE.get(type(node), type(node).__name__)


@dataclass(frozen=True)
class Where:
    """A checked ``--where`` expression. ``text`` is the canonical form (recorded in the store)."""

    text: str
    tree: ast.Expression
    columns: tuple[str, ...]  # lower-case names as written (mag_X included)

    def needed_columns(self) -> tuple[str, ...]:
        """The catalogue columns to read: ``flux_X`` for ``mag_X``."""
        out = []
        for c in self.columns:
            m = _MAG.match(c)
            out.append(f"flux_{m[1]}" if m else c)
        return tuple(dict.fromkeys(out))

    def evaluate(self, table: Mapping[str, np.ndarray] | object, n: int | None = None) -> np.ndarray:
        """Boolean mask over the rows of ``table`` (a mapping of columns or an astropy Table).

        KeyError-free: a column the table lacks raises ConfigError naming it and the columns there are.
        """
        names = list(table.keys()) if hasattr(table, "keys") else list(table.colnames)
        if n is None:
            n = len(table[names[0]]) if names else 0
        lower = {str(k).lower(): k for k in names}
        cache: dict[str, np.ndarray] = {}

        def column(name: str) -> np.ndarray:
            if name in cache:
                return cache[name]
            if name in lower:
                v = np.asarray(table[lower[name]])
                if v.dtype.kind == "S":
                    v = np.char.decode(v, "ascii", "replace")
                if v.dtype.kind in "UO":
                    v = np.char.strip(v.astype(str))
            elif (m := _MAG.match(name)) and f"flux_{m[1]}" in lower:
                flux = np.asarray(table[lower[f"flux_{m[1]}"]], dtype=np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.where(flux > 0, ZERO_POINT - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
            else:
                have = ", ".join(sorted(lower)[:30])
                raise ConfigError(f"--where {self.text!r}: no column {name!r} in the catalogue (columns: {have}"
                                  f"{', ...' if len(lower) > 30 else ''}; mag_X comes from flux_X)")
            if v.shape != (n,):
                raise ConfigError(f"--where: column {name!r} is not one value per row (shape {v.shape})")
            cache[name] = v
            return v

        out = _eval(self.tree.body, column, self.text)
        if np.ndim(out) == 0:  # a constant expression such as "True"
            return np.full(n, bool(out))
        return np.asarray(out, dtype=bool)


def parse_where(text: str) -> Where:
    """Parse and check a ``--where`` expression; ConfigError (one line) for anything not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--where: empty expression")
    if len(text) > MAX_LENGTH:
        raise ConfigError(f"--where: expression longer than {MAX_LENGTH} characters")
    src = " ".join(text.split())
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"--where {src!r}: not a valid expression ({e.msg} at column {e.offset}); write e.g. "
                          "\"type != 'PSF' and mag_r < 19\"") from None
    columns: list[str] = []
    _check(tree.body, columns, src, top=True)
    return Where(ast.unparse(tree), tree, tuple(dict.fromkeys(columns)))


def _refuse(node: ast.AST, src: str) -> ConfigError:
    return ConfigError(f"--where {src!r}: {_what(node)} is not allowed; only comparisons of columns with "
                       "numbers or strings, combined with and / or / not and parentheses")


def _constant(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, str, bool)) and node.value is not None
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float))


def _check(node: ast.AST, columns: list[str], src: str, top: bool = False) -> None:
    if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
        for v in node.values:
            _check(v, columns, src, top=True)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, columns, src, top=True)
        return
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, right in zip(node.ops, node.comparators):
            if type(op) not in _SYMBOL:
                raise _refuse(node, src)
            if isinstance(op, (ast.In, ast.NotIn)):
                if len(node.ops) > 1:
                    raise ConfigError(f"--where {src!r}: 'in' cannot be chained with another comparison; "
                                      "join them with 'and'")
                if not isinstance(right, (ast.Tuple, ast.List)) or not right.elts \
                        or not all(_constant(e) for e in right.elts):
                    raise ConfigError(f"--where {src!r}: 'in' needs a parenthesised list of numbers or strings, "
                                      "e.g. type in ('SER', 'DEV')")
        for i, operand in enumerate(operands):
            is_list = i > 0 and isinstance(node.ops[i - 1], (ast.In, ast.NotIn))
            if is_list:
                continue
            if isinstance(operand, ast.Name):
                columns.append(operand.id.lower())
            elif not _constant(operand):
                raise _refuse(operand, src)
        return
    if top and isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return
    if top and isinstance(node, ast.Name):
        raise ConfigError(f"--where {src!r}: a bare column ({node.id}) is not a condition; compare it, "
                          f"e.g. {node.id} > 0")
    raise _refuse(node, src)


def _value(node: ast.AST, column):
    if isinstance(node, ast.Name):
        return column(node.id.lower())
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):  # a signed number (checked)
        v = node.operand.value
        return -v if isinstance(node.op, ast.USub) else v
    raise AssertionError("unchecked node")


def _kind(v) -> str:
    if isinstance(v, np.ndarray):
        return "str" if v.dtype.kind in "US" else "num"
    return "str" if isinstance(v, str) else "num"


def _compare(op: ast.cmpop, a, b, src: str) -> np.ndarray:
    if _kind(a) != _kind(b):
        raise ConfigError(f"--where {src!r}: '{_SYMBOL[type(op)]}' compares a string with a number")
    with np.errstate(invalid="ignore"):
        return np.asarray(_COMPARE[type(op)](a, b))


def _eval(node: ast.AST, column, src: str):
    if isinstance(node, ast.BoolOp):
        parts = [_eval(v, column, src) for v in node.values]
        f = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        out = parts[0]
        for p in parts[1:]:
            out = f(out, p)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return np.logical_not(_eval(node.operand, column, src))
    if isinstance(node, ast.Constant):
        return bool(node.value)
    assert isinstance(node, ast.Compare)
    out = True
    left = _value(node.left, column)
    for op, right_node in zip(node.ops, node.comparators):
        if isinstance(op, (ast.In, ast.NotIn)):
            items = [_value(e, column) for e in right_node.elts]
            hit = False
            for item in items:
                hit = np.logical_or(hit, _compare(ast.Eq(), left, item, src))
            res = hit if isinstance(op, ast.In) else np.logical_not(hit)
            out = np.logical_and(out, res)
            continue  # never chained (refused by the check)
        right = _value(right_node, column)
        out = np.logical_and(out, _compare(op, left, right, src))
        left = right
    return out
