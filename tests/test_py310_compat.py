"""The device side stays on Python 3.10: JetPack 6 ships TensorRT's bindings for 3.10 only.

Every device-side module must parse as Python 3.10 and use no name that only 3.11+ has
(osteofy.compat has the replacements), and must not import the training side, which may
need 3.11+. Runs on every Python, so a 3.11-only feature cannot creep back in unnoticed
between runs of the 3.10 leg (``pytest -m device`` on a 3.10 interpreter).
"""

from __future__ import annotations

import ast
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from osteofy import cli
from osteofy.compat import UTC, parse_iso
from osteofy.errors import Unavailable

ROOT = Path(__file__).resolve().parent.parent

# What a device installs and runs: the runtime, the bridge, the wire contract
# (edge/messages.py, edge/result.py) and the device commands of osteofy/cli.py (screen,
# edge serve, doctor, build-engine, bridge, sbom).
DEVICE_PACKAGES = ("edge", "firmware_bridge")
DEVICE_FILES = (
    "osteofy/__init__.py",
    "osteofy/cli.py",
    "osteofy/compat.py",
    "osteofy/config.py",
    "osteofy/errors.py",
    "osteofy/fsutil.py",
    "osteofy/mosquitto.py",
    "osteofy/sbom.py",
    "quantize/__init__.py",
    "quantize/engine.py",
)
OWN_PACKAGES = ("osteofy", "edge", "firmware_bridge", "quantize", "model", "cohort", "dashboard")
# osteofy/cli.py is the one entry point of both sides: it imports the training side only
# inside the functions of training commands.
LAZY_TRAINING_IMPORTS = ("osteofy/cli.py",)

# Dotted names that Python 3.10 lacks (module, or module.attribute), with the replacement.
FORBIDDEN: dict[str, str] = {
    "datetime.UTC": "osteofy.compat.UTC",
    "tomllib": "PyYAML (the configuration is YAML) or tomli",
    "typing.Self": "a TypeVar bound to the class",
    "typing.NotRequired": "total=False on a separate TypedDict",
    "typing.Required": "total=False on a separate TypedDict",
    "typing.LiteralString": "str",
    "typing.Never": "typing.NoReturn",
    "typing.assert_never": "an explicit raise",
    "typing.assert_type": "nothing at run time",
    "typing.reveal_type": "nothing at run time",
    "typing.dataclass_transform": "nothing",
    "typing.TypeVarTuple": "nothing",
    "typing.Unpack": "nothing",
    "typing.override": "nothing",
    "ExceptionGroup": "one exception",
    "BaseExceptionGroup": "one exception",
    "enum.StrEnum": "class X(str, Enum)",
    "enum.ReprEnum": "Enum",
    "enum.verify": "a test",
    "enum.EnumCheck": "a test",
    "enum.FlagBoundary": "nothing",
    "enum.global_enum": "nothing",
    "enum.member": "nothing",
    "enum.nonmember": "nothing",
    "asyncio.TaskGroup": "asyncio.gather",
    "asyncio.timeout": "asyncio.wait_for",
    "asyncio.Runner": "asyncio.run",
    "hashlib.file_digest": "osteofy.fsutil's chunked sha256",
    "itertools.batched": "a slice loop",
    "contextlib.chdir": "an explicit os.chdir",
    "sys.exception": "sys.exc_info()[1]",
    "logging.getLevelNamesMapping": "logging.getLevelName",
    "operator.call": "a direct call",
    "math.exp2": "2.0 ** x",
    "math.cbrt": "x ** (1 / 3)",
    "wsgiref.types": "typing.Any",
}
# Attribute names that mean a 3.11+ method whatever the object (receivers can't be resolved).
FORBIDDEN_METHODS: dict[str, str] = {
    "fromisoformat": "osteofy.compat.parse_iso (3.10 reads only what isoformat writes)",
    "add_note": "a longer message",
}


def device_files() -> list[Path]:
    files = [ROOT / f for f in DEVICE_FILES]
    for pkg in DEVICE_PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def _module_exists(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return (path / "__init__.py").exists() or path.with_suffix(".py").exists()


def _device_module_names() -> set[str]:
    names = set()
    for path in device_files():
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.add(".".join(parts))
    return names


class _Finder(ast.NodeVisitor):
    """Collects uses of FORBIDDEN names and FORBIDDEN_METHODS, and own-package imports."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.problems: list[tuple[int, str, str]] = []
        self.imports: list[tuple[int, str, bool]] = []  # (line, module, at module level)
        self._depth = 0
        self._type_only = False

    def _use(self, node: ast.AST, dotted: str) -> None:
        for name, instead in FORBIDDEN.items():
            if dotted == name or dotted.startswith(name + "."):
                self.problems.append((getattr(node, "lineno", 0), name, instead))

    def _own(self, node: ast.AST, module: str) -> None:
        if module.split(".")[0] in OWN_PACKAGES and not self._type_only:
            self.imports.append((getattr(node, "lineno", 0), module, self._depth == 0))

    def _scope(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _scope

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            before, self._type_only = self._type_only, True
            for stmt in node.body:
                self.visit(stmt)
            self._type_only = before
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._use(node, alias.name)
            self._own(node, alias.name)
            local = alias.asname or alias.name.split(".")[0]
            self.aliases[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        self._use(node, node.module)
        for alias in node.names:
            dotted = f"{node.module}.{alias.name}"
            self._use(node, dotted)
            self._own(node, dotted if _module_exists(dotted) else node.module)
            self.aliases[alias.asname or alias.name] = dotted

    def visit_Name(self, node: ast.Name) -> None:
        self._use(node, self.aliases.get(node.id, node.id))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FORBIDDEN_METHODS:
            self.problems.append((node.lineno, f".{node.attr}", FORBIDDEN_METHODS[node.attr]))
        chain: list[str] = [node.attr]
        base: ast.expr = node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name):
            head = self.aliases.get(base.id, base.id)
            self._use(node, ".".join([head, *reversed(chain)]))
        self.generic_visit(node)

    def visit_Try(self, node: ast.stmt) -> None:
        if type(node).__name__ == "TryStar":
            self.problems.append((node.lineno, "except*", "one except clause per exception"))
        self.generic_visit(node)

    visit_TryStar = visit_Try


def _scan(path: Path) -> _Finder:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 10))
    finder = _Finder()
    finder.visit(tree)
    return finder


def test_the_device_side_is_a_known_set_of_files() -> None:
    missing = [str(p) for p in device_files() if not p.exists()]
    assert not missing, f"listed device-side files that no longer exist: {missing}"
    assert len(device_files()) > 40


@pytest.mark.parametrize("path", device_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_device_module_uses_only_python_310(path: Path) -> None:
    problems = _scan(path).problems
    if path.name == "compat.py" and path.parent.name == "osteofy":
        problems = [p for p in problems if p[1] != ".fromisoformat"]
    assert not problems, "\n".join(
        f"{path.relative_to(ROOT)}:{line}: {name} is Python 3.11+; use {instead}"
        for line, name, instead in problems
    )


@pytest.mark.parametrize("path", device_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_device_module_imports_only_the_device_side(path: Path) -> None:
    device = _device_module_names()
    rel = str(path.relative_to(ROOT))
    outside = [
        (line, module)
        for line, module, top in _scan(path).imports
        if (top or rel not in LAZY_TRAINING_IMPORTS)
        and not any(module == d or module.startswith(d + ".") for d in device)
        and module not in {"quantize", "osteofy"}
    ]
    assert not outside, "\n".join(
        f"{rel}:{line}: imports {module}, which is not device-side (may need Python 3.11+)"
        for line, module in outside
    )


def test_the_checker_finds_what_it_should() -> None:
    src = (
        "import datetime as dt\n"
        "from datetime import UTC\n"
        "import tomllib\n"
        "from typing import Self\n"
        "import enum\n"
        "class E(enum.StrEnum): pass\n"
        "x = dt.UTC\n"
        "y = dt.datetime.fromisoformat('2025-01-01T00:00:00Z')\n"
        "def f(p):\n"
        "    return list(p.walk())\n"
    )
    finder = _Finder()
    finder.visit(ast.parse(src, feature_version=(3, 10)))
    found = {name for _, name, _ in finder.problems}
    assert {"datetime.UTC", "tomllib", "typing.Self", "enum.StrEnum", ".fromisoformat"} <= found
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))


def test_compat_utc_is_the_utc_timezone() -> None:
    assert UTC is timezone.utc
    assert datetime.now(UTC).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-01T12:00:00Z", datetime(2025, 6, 1, 12, tzinfo=UTC)),
        ("2025-06-01T12:00:00.123Z", datetime(2025, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)),
        ("2025-06-01T12:00:00.1234567z", datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2025-06-01T12:00:00+00:00", datetime(2025, 6, 1, 12, tzinfo=UTC)),
        (
            "2025-06-01T14:00:00+0200",
            datetime(2025, 6, 1, 14, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2025-06-01 12:00:00", datetime(2025, 6, 1, 12)),
        ("2025-06-01", datetime(2025, 6, 1)),
    ],
)
def test_parse_iso_reads_what_311_fromisoformat_reads(text: str, expected: datetime) -> None:
    assert parse_iso(text) == expected
    assert parse_iso(text).tzinfo == expected.tzinfo


@pytest.mark.parametrize("text", ["", "yesterday", "2025-13-01T00:00:00Z", "Z"])
def test_parse_iso_refuses_what_is_not_iso(text: str) -> None:
    with pytest.raises(ValueError):
        parse_iso(text)


@pytest.mark.parametrize("what", cli.NEEDS_PYTHON_311)
def test_training_side_commands_say_they_need_311(what: str) -> None:
    with pytest.raises(Unavailable, match=f"^{what} needs Python 3.11 or newer; this is 3.10"):
        cli._need_python_311(what, (3, 10, 13))
    cli._need_python_311(what, (3, 11, 0))


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="what Python 3.10 answers")
def test_the_dashboard_refuses_python_310_with_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dashboard", "serve"]) == 4
    assert "dashboard serve needs Python 3.11 or newer" in capsys.readouterr().err
