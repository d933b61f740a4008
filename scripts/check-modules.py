#!/usr/bin/env python3
"""Fails when infergate's modules import each other in a circle.

A module is a file under src/ (src/a/mod.rs and src/a.rs are `a`, src/a/b.rs is `a::b`). An
import is any path in a `use` declaration or in the code that starts at `crate::`, `super::` or
`self::`, resolved to the longest module it names; a name that a module re-exports (`pub use`)
is followed to where it comes from. Unit tests (`#[cfg(test)] mod tests`) are left out: they
belong to their file. Prints every circle found and exits 1; prints the module count and exits 0
when there is none. The same question as `cargo modules dependencies --acyclic`, without
building rust-analyzer on each CI run.

    scripts/check-modules.py [SRC_DIR]
    scripts/check-modules.py --self-test   # shows that it finds circles it must find
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
# Binaries are their own crates (they reach the library as `infergate::`): leave them out.
SKIP = {"main.rs", "bin"}


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip(text):
    """The file without comments, string and char literals, and its unit-test module."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)", text[i:]).group(1)
            close = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if close < 0 else close + 1 + len(hashes)
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^'\\])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^'\\])'", text[i:]).group(0))
            out.append("' '")
        else:
            out.append(c)
            i += 1
    text = "".join(out)
    m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+tests\s*\{", text)
    return text[: m.start()] if m else text


def expand(tree):
    """`a::{b, c::{d, e as f}, self}` -> [[a, b], [a, c, d], [a, c, e], [a]] (as-names kept apart)."""
    out = []

    def walk(prefix, s):
        s = s.strip()
        if not s:
            return
        if "{" in s and s.endswith("}"):
            head, body = s[: s.index("{")], s[s.index("{") + 1 : -1]
            head = [p for p in head.split("::") if p]
            depth, start = 0, 0
            for i, ch in enumerate(body):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "," and depth == 0:
                    walk(prefix + head, body[start:i])
                    start = i + 1
            walk(prefix + head, body[start:])
            return
        path = s.split(" as ")[0].strip()
        segs = [p for p in path.split("::") if p]
        if segs and segs[-1] == "self":
            segs = segs[:-1]
        out.append(prefix + segs)

    walk([], tree)
    return out


def absolute(mod, segs):
    """Segments of a path as written in module `mod`, from the crate root; None if external."""
    if not segs:
        return None
    if segs[0] == "crate":
        return list(segs[1:])
    base = list(mod)
    i = 0
    if segs[0] == "self":
        i = 1
    else:
        while i < len(segs) and segs[i] == "super":
            base = base[:-1]
            i += 1
        if i == 0:
            return None
    return base + list(segs[i:])


def main(src):
    files = {}
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if d not in SKIP]
        for n in names:
            if n.endswith(".rs") and n not in SKIP:
                rel = os.path.relpath(os.path.join(root, n), src)
                files[module_of(rel)] = strip(open(os.path.join(root, n)).read())
    modules = set(files)

    uses = {}  # module -> list of (is_pub, segments)
    for mod, text in files.items():
        found = []
        for m in re.finditer(r"(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text):
            for segs in expand(m.group(2)):
                found.append((bool(m.group(1)), segs))
        for m in re.finditer(r"\b(?:crate|super|self)(?:::\w+)+", text):
            found.append((False, m.group(0).split("::")))
        # A bare path into a child module (`codec::decode(..)`) names that child.
        for m in re.finditer(r"(?<![\w:])(\w+)(?:::\w+)+", text):
            if tuple(mod) + (m.group(1),) in modules:
                found.append((False, ["self"] + m.group(0).split("::")))
        uses[mod] = found

    # Re-exports: (module, name) -> absolute path it stands for.
    reexport = {}
    for mod, found in uses.items():
        for is_pub, segs in found:
            if not is_pub:
                continue
            a = absolute(mod, segs)
            if a is None and segs and tuple(mod) + (segs[0],) in modules:
                a = list(mod) + segs
            if a:
                reexport[(mod, a[-1])] = a

    def resolve(path, seen=0):
        for k in range(len(path), -1, -1):
            head = tuple(path[:k])
            if head in modules:
                if k < len(path) and (head, path[k]) in reexport and seen < 8:
                    target = reexport[(head, path[k])]
                    if target != path[: k + 1]:
                        return resolve(target + path[k + 1 :], seen + 1)
                return head
        return ()

    edges = {m: set() for m in modules}
    for mod, found in uses.items():
        for _, segs in found:
            a = absolute(mod, segs)
            # A plain `use child::X` inside a module names its own child.
            if a is None and segs and tuple(mod) + (segs[0],) in modules:
                a = list(mod) + segs
            if a is None:
                continue
            t = resolve(a)
            if t != mod and t != ():
                edges[mod].add(t)

    # Circles: strongly connected components of more than one module (Tarjan).
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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
                comps.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            strong(v)
    name = lambda m: "::".join(m) or "crate"
    if comps:
        for comp in comps:
            members = set(comp)
            print("import circle: " + ", ".join(sorted(name(m) for m in comp)))
            for m in sorted(comp):
                for t in sorted(edges[m] & members):
                    print(f"  {name(m)} -> {name(t)}")
        return 1
    print(f"modules: {len(modules)}, import edges: {sum(len(e) for e in edges.values())}, circles: 0")
    return 0


def self_test():
    """Trees that hold a circle (or none), each written to a scratch folder and checked."""
    import contextlib
    import io
    import tempfile

    cases = [
        ("use in both directions", {"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;",
                                    "b.rs": "pub struct X; use crate::a::Y;"}, 1),
        ("through a re-export", {"lib.rs": "mod m; mod c;", "m/mod.rs": "mod v; pub use v::I;",
                                 "m/v.rs": "use crate::c::K;", "c.rs": "use crate::m::I;"}, 1),
        ("child and parent", {"lib.rs": "mod p;", "p/mod.rs": "mod q; fn f() { q::g(); } pub struct S;",
                              "p/q.rs": "use super::S; pub fn g() {}"}, 1),
        ("a string and a comment are not imports", {"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;",
                                                    "b.rs": 'const T: &str = "crate::a::Y"; // crate::a::Z'}, 0),
        ("a unit-test module is left out", {"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;",
                                            "b.rs": "#[cfg(test)]\nmod tests { use crate::a::Y; }"}, 0),
    ]
    failed = 0
    for name, tree, want in cases:
        with tempfile.TemporaryDirectory() as d:
            for path, text in tree.items():
                os.makedirs(os.path.dirname(os.path.join(d, path)), exist_ok=True)
                open(os.path.join(d, path), "w").write(text)
            with contextlib.redirect_stdout(io.StringIO()):
                got = main(d)
        if got != want:
            print(f"self-test failed: {name}: exit {got}, expected {want}")
            failed += 1
    print(f"self-test: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else SRC))
