#!/usr/bin/env python3
"""Reports import cycles between the files of a Rust crate.

Usage: scripts/import-cycles.py CRATE_SRC_DIR...  (e.g. controller/src)

A file depends on another when it names an item of that file's module through
`crate::`, `super::`, `self::` or child-module paths (in `use` lines or inline). Test code
(`#[cfg(test)]` modules, inline or in their own file) is left out: tests may
reach anywhere. Cycles are looked for among the siblings of every directory (a subdirectory
counts as one node), so a cycle through a subdirectory is found, while a
`mod.rs` re-exporting its own children is not one. Exits 1 and prints every cycle
(each strongly connected group of two or more siblings) when there is one.
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
PATH_RE = re.compile(rf"\b(crate|super|self)((?:::{IDENT})+)")


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("lib", "mod"):
        parts.pop()
    return tuple(parts)


def test_modules(src: Path, files: list[Path]) -> set[tuple[str, ...]]:
    """Modules declared as `#[cfg(test)] mod name;` (their own file)."""
    tests = set()
    for file in files:
        text = file.read_text()
        for match in re.finditer(rf"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+({IDENT})\s*;", text):
            tests.add(module_of(src, file) + (match.group(1),))
    return tests


def strip(text: str) -> str:
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # Inline test modules sit at the end of a file by convention.
    match = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod\s+\w+\s*\{", text)
    return text[: match.start()] if match else text


def expand_use(tree: str) -> list[str]:
    """`a::{b, c::{d, self}}` -> [`a::b`, `a::c::d`, `a::c`]."""
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        return [tree.split(" as ")[0].strip()]
    prefix = tree[:brace].rstrip(":")
    inner = tree[brace + 1 : tree.rindex("}")]
    items, depth, start = [], 0, 0
    for index, char in enumerate(inner):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(inner[start:index])
            start = index + 1
    items.append(inner[start:])
    paths = []
    for item in filter(str.strip, items):
        for path in expand_use(item):
            if path == "self":
                paths.append(prefix)
            elif prefix:
                paths.append(f"{prefix}::{path}")
            else:
                paths.append(path)
    return paths


def referenced_paths(text: str) -> list[str]:
    paths = []
    for match in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text, flags=re.M):
        paths.extend(expand_use(match.group(1)))
    paths.extend(match.group(0) for match in PATH_RE.finditer(text))
    return paths


def resolve(path: str, here: tuple[str, ...], is_mod_file: bool) -> list[str]:
    parts = path.split("::")
    # `self`/`super` are relative to the file's module; in `a/b.rs` that is `a::b`.
    current = list(here)
    head = parts.pop(0)
    if head == "crate":
        current = []
    elif head == "super":
        current = current[:-1]
        while parts and parts[0] == "super":
            parts.pop(0)
            current = current[:-1]
    return current + parts


def main() -> int:
    cycles_found = False
    for src_arg in sys.argv[1:]:
        src = Path(src_arg)
        files = [file for file in src.rglob("*.rs") if "bin" not in file.relative_to(src).parts and file.name != "main.rs"]
        tests = test_modules(src, files)
        modules = {module_of(src, file): file for file in files}
        modules = {module: file for module, file in modules.items() if not any(module[: len(test)] == test for test in tests)}
        # Cycles are looked for among siblings at every level: the files and
        # subdirectories of one directory, each subdirectory counting as one
        # node. An edge between a directory's `mod.rs` and something inside
        # it is the module's own structure (re-exports, shared items).
        edges: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        for module, file in modules.items():
            for path in referenced_paths(strip(file.read_text())):
                first = path.split("::")[0]
                if first not in ("crate", "super", "self"):
                    # A 2018-style relative path: only a child module of this file counts.
                    if module + (first,) not in modules:
                        continue
                    path = "self::" + path
                target = resolve(path, module, file.name == "mod.rs")
                # The longest prefix that is a file of this crate.
                for length in range(len(target), -1, -1):
                    owner = tuple(target[:length])
                    if owner in modules:
                        break
                common = 0
                while common < min(len(module), len(owner)) and module[common] == owner[common]:
                    common += 1
                if common in (len(module), len(owner)):
                    continue
                source_node, target_node = module[: common + 1], owner[: common + 1]
                edges.setdefault(source_node, set()).add(target_node)
                edges.setdefault(target_node, set())
        for component in strongly_connected(edges):
            if len(component) > 1:
                cycles_found = True
                names = sorted("::".join(node) for node in component)
                print(f"import cycle in {src}: " + " <-> ".join(names))
    if not cycles_found:
        print("no import cycles in " + ", ".join(sys.argv[1:]))
    return 1 if cycles_found else 0


def strongly_connected(edges: dict) -> list[list]:
    """Tarjan's algorithm, iterative."""
    index, lowlink, on_stack, stack, result = {}, {}, set(), [], []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                result.append(component)
    return result


if __name__ == "__main__":
    sys.exit(main())
