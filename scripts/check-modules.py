#!/usr/bin/env python3
"""Fails when infergate's modules import each other in a circle, or a folder imports upward.

A module is a file under src/ (src/a/mod.rs and src/a.rs are `a`, src/a/b.rs is `a::b`). An
import is any path in a `use` declaration or in the code that starts at `crate::`, `super::` or
`self::`, resolved to the longest module it names; a name that a module re-exports (`pub use`)
is followed to where it comes from. Unit tests (`#[cfg(test)] mod tests`) are left out: they
belong to their file. Prints every circle found and exits 1; prints the module count and exits 0
when there is none. The same question as `cargo modules dependencies --acyclic`, without
building rust-analyzer on each CI run.

Then the same at the folder level: each top-level module (`tasks`, with everything under
src/tasks/) is one node, and the graph of those must hold no circle either. And each top-level
module sits in a layer (LAYERS below, lowest first); it may import its own layer and those below,
never one above: base modules import no feature, features import no edge, nothing imports the
wiring. A top-level module in no layer is an error, so a new one is placed on purpose. And no
source file is longer than MAX_LINES.

    scripts/check-modules.py [SRC_DIR]
    scripts/check-modules.py --self-test   # shows that it finds circles it must find
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
# Binaries are their own crates (they reach the library as `infergate::`): leave them out.
SKIP = {"main.rs", "bin"}

# A source file longer than this is split (a newcomer reads a file whole).
MAX_LINES = 700

# Top-level modules by layer, lowest first. A module imports its own layer and lower ones only.
LAYERS = [
    # base: the call, the model, the wire types, errors, config sections, telemetry core
    ("base", {"error", "call", "model", "proto", "tensor", "grpc_wire", "section", "telemetry",
              "tls", "redis_conn", "breaker", "spread"}),
    # the sync path's core: Triton, batching, the broker, who is calling
    ("core", {"backend", "batch", "queue", "auth", "loadgen"}),
    # features the sync service plugs in, and the fleet of Triton endpoints
    ("sync features", {"cache", "routes", "fleet"}),
    ("service", {"infer"}),
    # features built on the service: streams of decoupled models
    ("stream features", {"streams"}),
    # features of the async path and the platform
    ("task features", {"tasks", "scaler", "health"}),
    # fronts: other APIs over the service and its features (OpenAI's)
    ("fronts", {"openai"}),
    # edges: what clients and brokers call
    ("edges", {"api", "worker"}),
    # wiring: the list of sections and the parts started in order
    ("wiring", {"config", "server"}),
]


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


def main(src, layers=None):
    layers = LAYERS if layers is None else layers
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

    # Circles: strongly connected components of more than one module.
    sys.setrecursionlimit(10000)
    comps = circles(edges)
    name = lambda m: "::".join(m) or "crate"
    failed = False
    for comp in comps:
        failed = True
        members = set(comp)
        print("import circle: " + ", ".join(sorted(name(m) for m in comp)))
        for m in sorted(comp):
            for t in sorted(edges[m] & members):
                print(f"  {name(m)} -> {name(t)}")

    # The folder level: one node per top-level module.
    folders = {m[0] for m in modules if m}
    up = {f: {} for f in folders}  # folder -> {folder it imports: an example edge}
    for m, targets in edges.items():
        for t in targets:
            if m and t and m[0] != t[0]:
                up[m[0]].setdefault(t[0], (name(m), name(t)))
    for comp in circles({f: set(t) for f, t in up.items()}):
        failed = True
        members = set(comp)
        print("folder import circle: " + ", ".join(sorted(comp)))
        for f in sorted(comp):
            for t in sorted(set(up[f]) & members):
                print(f"  {f} -> {t} ({up[f][t][0]} -> {up[f][t][1]})")
    rank = {}
    for i, (_, members) in enumerate(layers):
        for f in members:
            rank[f] = i
    for f in sorted(folders):
        if f not in rank:
            failed = True
            print(f"module `{f}` is in no layer: add it to LAYERS in check-modules.py")
    for f in sorted(folders):
        for t, (a, b) in sorted(up[f].items()):
            if f in rank and t in rank and rank[t] > rank[f]:
                failed = True
                print(f"upward import: {f} ({layers[rank[f]][0]}) -> {t} ({layers[rank[t]][0]}): {a} -> {b}")
    for root, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if d not in SKIP]
        for n in sorted(names):
            path = os.path.join(root, n)
            if n.endswith(".rs") and n not in SKIP:
                lines = sum(1 for _ in open(path))
                if lines > MAX_LINES:
                    failed = True
                    print(f"{os.path.relpath(path, src)}: {lines} lines, over {MAX_LINES}: split it")
    if failed:
        return 1
    print(
        f"modules: {len(modules)}, import edges: {sum(len(e) for e in edges.values())}, circles: 0; "
        f"folders: {len(folders)}, folder edges: {sum(len(t) for t in up.values())}, circles: 0, upward imports: 0"
    )
    return 0


def circles(graph):
    """Strongly connected components of more than one node (Tarjan), for a small graph."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


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
        ("folders in a circle, the modules not", {"lib.rs": "mod a; mod b;", "a/mod.rs": "mod x; pub struct Z;",
                                                  "a/x.rs": "use crate::b::y::Y;", "b/mod.rs": "pub mod y;",
                                                  "b/y.rs": "pub struct Y; use crate::a::Z;"}, 1),
        ("a base module imports a feature", {"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;",
                                             "b.rs": "pub struct X;"}, 1, [("base", {"a"}), ("feature", {"b"})]),
        ("a feature imports the base", {"lib.rs": "mod a; mod b;", "a.rs": "pub struct X;",
                                        "b.rs": "use crate::a::X;"}, 0, [("base", {"a"}), ("feature", {"b"})]),
        ("a module in no layer", {"lib.rs": "mod a; mod b;", "a.rs": "", "b.rs": ""}, 1, [("base", {"a"})]),
    ]
    failed = 0
    for name, tree, want, *layers in cases:
        # Unless a case says, every top-level module of its tree is in one layer.
        tops = {p.split("/")[0].removesuffix(".rs") for p in tree} - {"lib"}
        layers = layers[0] if layers else [("all", tops)]
        with tempfile.TemporaryDirectory() as d:
            for path, text in tree.items():
                os.makedirs(os.path.dirname(os.path.join(d, path)), exist_ok=True)
                open(os.path.join(d, path), "w").write(text)
            with contextlib.redirect_stdout(io.StringIO()):
                got = main(d, layers)
        if got != want:
            print(f"self-test failed: {name}: exit {got}, expected {want}")
            failed += 1
    print(f"self-test: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        sys.exit(self_test())
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else SRC))
