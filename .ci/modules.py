#!/usr/bin/env python3
"""Module boundaries of every package (ARCHITECTURE.md, "Parts"): no import cycle between modules, and the "uses"
directions of the proxy's policy layers and leaves.

An edge A -> B is any `use crate::`/`super::`/`self::` path or inline `crate::`/`super::` path in A's file that
names module B (the longest prefix of the path that is a module). Test code is left out: files named `tests.rs`
and the item after each `#[cfg(test)]`. Edges between a module and its own ancestors are not counted (a folder's
`mod.rs` declares its children; a child may name its parent's items). Cycles are looked for between modules and
between top-level parts (the folders and files directly under `src/`).

Usage: .ci/modules.py [ROOT]   (exit 1 with every violation listed)
"""

import os
import re
import sys

# (package, source folder) of every package of the workspace.
PACKAGES = [
    ("ferry", "src"),
    ("ferry-api", "xds/api/src"),
    ("ferry-control", "xds/control/src"),
    ("ferryctl", "xds/ctl/src"),
    ("ferry-test-support", "tests/support/src"),
]

# The proxy's leaves: they use nothing of the crate but other leaves.
LEAVES = {"body", "direction", "errors", "settings", "util"}
# What each part of the proxy may use besides itself and the leaves (only the parts named here are checked).
USES = {
    "ferry": {
        # A policy layer knows requests, its own config and the leaves (and records its metrics); never how
        # connections are accepted (listen), where config comes from (discovery), or how stacks are composed.
        "policy": {"telemetry"},
    },
}


def strip(text):
    """The code without comments, string and char literals (their contents could look like paths)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'":
            # A char literal ('a', '\n', '\u{..}') or a lifetime ('a): only the former is skipped.
            m = re.match(r"'(\\.[^']*|[^'\\])'", text[i:])
            if m:
                i += len(m.group(0))
                out.append("' '")
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_item(code, i):
    """The index just past the item that starts at or after `i` (a `;`-terminated item or a braced block)."""
    depth = 0
    while i < len(code):
        c = code[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == ";" and depth == 0:
            return i + 1
        i += 1
    return i


def without_tests(code):
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < i:
            continue
        out.append(code[i:m.start()])
        i = skip_item(code, m.end())
    out.append(code[i:])
    return "".join(out)


def use_paths(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e'] (`self` inside braces names the prefix)."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+\w+", "", tree))  # renames (`X as Y`) name the same module
    if "{" not in tree:
        return [re.sub(r"::\*$", "", tree)]
    prefix, _, rest = tree.partition("{")
    inner = rest[: rest.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    paths = []
    for p in filter(None, parts):
        if p == "self":
            paths.append(prefix.rstrip(":"))
        else:
            paths.extend(use_paths(prefix + p))
    return paths


def modules_of(src):
    """{module path (tuple) -> file} for every non-test file of the package, the crate root as ()."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if "tests" in parts[:-1] or parts[0] == "bin":
                continue
            if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
                parts = parts[:-1]
            mods[tuple(parts)] = os.path.join(dirpath, f)
    return mods


def edges_of(mod, path, mods):
    code = without_tests(strip(open(path, encoding="utf-8").read()))
    here, parent = mod, mod[:-1]  # `self` and `super` relative to the file's module
    raw = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        raw.extend(use_paths(m.group(1)))
    code_no_use = re.sub(r"\buse\s+[^;]+;", "", code)
    raw.extend(re.findall(r"\b(?:crate|super|self)(?:::\w+)+", code_no_use))
    targets = set()
    for p in raw:
        segs = [s for s in p.split("::") if s]
        if not segs:
            continue
        if segs[0] == "crate":
            base, segs = (), segs[1:]
        elif segs[0] == "super":
            base = parent
            segs = segs[1:]
            while segs and segs[0] == "super":
                base, segs = base[:-1], segs[1:]
        elif segs[0] == "self":
            base, segs = here, segs[1:]
        else:
            # A child module named directly (`use body::X` after `mod body;` in a parent) resolves below `here`.
            if here + (segs[0],) in mods:
                base = here
            else:
                continue
        best = None
        for k in range(len(segs), -1, -1):
            cand = base + tuple(segs[:k])
            if cand in mods:
                best = cand
                break
        if best is not None:
            targets.add(best)
    related = lambda a, b: a[: len(b)] == b or b[: len(a)] == a  # noqa: E731
    return {t for t in targets if not related(mod, t)}


def sccs(graph):
    """Tarjan's strongly connected components with more than one node."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycle_in(graph, comp):
    """One cycle through the component, as a list of nodes (for the message)."""
    members, start = set(comp), comp[0]
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path)) + [start]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def name(mod):
    return "::".join(mod) or "crate"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems = []
    for package, src in PACKAGES:
        mods = modules_of(os.path.join(root, src))
        graph = {m: edges_of(m, f, mods) for m, f in mods.items()}
        for comp in sccs(graph):
            members = ", ".join(map(name, comp))
            problems.append(f"{package}: import cycle among {len(comp)} modules ({members}), e.g. " + " -> ".join(map(name, cycle_in(graph, comp))))
        parts = {}
        for m, targets in graph.items():
            for t in targets:
                if m and t and m[0] != t[0]:
                    parts.setdefault(m[0], set()).add(t[0])
        for comp in sccs(parts):
            path = cycle_in(parts, comp)
            why = []
            for a, b in zip(path, path[1:]):
                via = next(f"{name(m)} -> {name(t)}" for m in sorted(graph) for t in sorted(graph[m]) if m and t and m[0] == a and t[0] == b)
                why.append(via)
            problems.append(f"{package}: cycle between parts {' -> '.join(path)} ({'; '.join(why)})")
        if package != "ferry":
            continue
        for m, targets in sorted(graph.items()):
            if not m:
                continue
            for t in sorted(targets):
                if not t:
                    continue
                if m[0] in LEAVES and t[0] not in LEAVES:
                    problems.append(f"{package}: leaf {name(m)} uses {name(t)} (a leaf uses only leaves: {sorted(LEAVES)})")
                allowed = USES.get(package, {}).get(m[0])
                if allowed is not None and t[0] != m[0] and t[0] not in LEAVES and t[0] not in allowed:
                    problems.append(f"{package}: {name(m)} uses {name(t)} ({m[0]}/ may use only itself, the leaves and {sorted(allowed)})")
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} module boundary violation(s)")
        return 1
    print("modules: no import cycles; policy/ and the leaves keep their directions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
