"""Static preflight of the GPU check: does every import it will make resolve on the lent machine?

The device has no network and a fixed package set (benchmarks/device_packages.txt) plus what travels as
wheels in .whl/ (benchmarks/gpu_wheels.sh). This reads benchmarks/gpu_check.sh, takes every Python
script and `-m redi.cli <stage>` it runs as a root, follows their imports (`ast`, no code runs, the
repository's own modules transitively, function-level imports included) and resolves each third-party
top-level module against those packages. It fails naming each missing module and where it is imported,
so a broken check is caught here before a lease is spent. Python 3.12's standard library counts as present.

    python benchmarks/gpu_preflight.py                       # device list + .whl/
    python benchmarks/gpu_preflight.py --packages my_list.txt --wheels path/to/wheels
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# removed from the standard library by 3.12 (the device's python), still in this interpreter's list
REMOVED_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}
# distribution name -> top-level import names, where they differ from the name itself
IMPORT_NAMES = {
    "pyyaml": ["yaml"], "pillow": ["PIL"], "scikit-learn": ["sklearn"], "scikit-image": ["skimage"],
    "opencv-python-headless": ["cv2"], "python-dateutil": ["dateutil"], "py-cpuinfo": ["cpuinfo"],
    "nvidia-ml-py": ["pynvml"], "protobuf": ["google"], "attrs": ["attr", "attrs"],
    "setuptools": ["setuptools", "pkg_resources", "_distutils_hack"], "pytest": ["pytest", "_pytest"],
    "typing-extensions": ["typing_extensions"], "msgpack": ["msgpack"], "tensorboard": ["tensorboard"],
    "lightning-utilities": ["lightning_utilities"], "pytorch-lightning": ["pytorch_lightning"],
    "cupy-cuda13x": ["cupy", "cupyx"], "jax-cuda13-plugin": ["jax_cuda13_plugin"],
    "pytest-benchmark": ["pytest_benchmark"], "pytest-xdist": ["xdist"], "pytest-cov": ["pytest_cov"],
    "pytest-mock": ["pytest_mock"], "pytest-timeout": ["pytest_timeout"], "ml-dtypes": ["ml_dtypes"],
    "huggingface-hub": ["huggingface_hub"], "hf-xet": ["hf_xet"], "rpds-py": ["rpds"],
}
# imported inside a function only, on paths the check never takes (a module-level import still counts)
LAZY_NOT_RUN = {
    "diffusers": "SD-VAE / stand-in VAE loading (redi.encoders.vae.load_vae, the tiny-VAE test fixture); "
                 "the check builds no VAE",
    "webdataset": "shard reading and writing (redi.data.reader, redi.sample.write_shard); the check "
                  "writes no shards",
}


def read_packages(path: Path) -> list[str]:
    """Distribution names, one a line, '#' comments."""
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def import_names(dist: str) -> list[str]:
    key = dist.lower().replace("_", "-")
    return IMPORT_NAMES.get(key, [key.replace("-", "_").replace(".", "_")])


def wheel_modules(wheel: Path) -> tuple[str, list[str]]:
    """(distribution name, top-level modules) of a wheel, from its RECORD-listed files."""
    dist = wheel.name.split("-")[0].lower().replace("_", "-")
    tops = set()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            first = name.split("/")[0]
            if first.endswith((".dist-info", ".data")):
                continue
            tops.add(first.split(".")[0] if "/" not in name else first)
    return dist, sorted(tops)


def wheel_problems(wheels: list[Path]) -> list[str]:
    """Wheels that cannot install on the device: not for CPython 3.12 x86-64 Linux, or a name twice."""
    problems, seen = [], {}
    for w in wheels:
        parts = w.name[:-4].split("-")
        py, abi, plat = parts[-3], parts[-2], parts[-1]
        pys = py.split(".")
        ok_py = "py3" in pys or "cp312" in pys or (abi == "abi3" and any(p.startswith("cp3") for p in pys))
        ok_plat = plat == "any" or ("x86_64" in plat and "linux" in plat)
        if not (ok_py and ok_plat):
            problems.append(f"{w.name}: not installable on CPython 3.12 x86-64 Linux")
        dist = parts[0].lower().replace("_", "-")
        if dist in seen:
            problems.append(f"{w.name} and {seen[dist]}: two versions of {dist} stop the --no-index install")
        seen[dist] = w.name
    return problems


def check_roots(script: Path) -> tuple[list[Path], list[str]]:
    """Python files gpu_check.sh runs (benchmarks/*.py, tests/*.py) and the `redi.cli` stages it calls."""
    text = "\n".join(ln.split("#")[0] if not ln.lstrip().startswith("#") else "" for ln in
                     script.read_text().splitlines())
    files = {REPO / m for m in re.findall(r"\b((?:benchmarks|tests)/[\w/]+\.py)\b", text)}
    stages = set(re.findall(r"-m redi\.cli\s+([\w-]+)", text))
    for f in [f for f in files if f.is_file()]:  # the `redi <stage>` subprocesses a script starts
        stages |= set(re.findall(r"""["']-m["'],\s*["']redi\.cli["'],\s*["']([\w-]+)["']""", f.read_text()))
        if f.parent.name == "tests" and (f.parent / "conftest.py").is_file():
            files.add(f.parent / "conftest.py")  # pytest imports it first
    return sorted(files), sorted(stages)


def stage_runner(stage: str) -> str:
    """Module of a `redi <stage>` runner, read from redi/stages.py's Stage entries (not imported)."""
    tree = ast.parse((REPO / "redi" / "stages.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stage" and len(node.args) >= 4:
            name, runner = node.args[0], node.args[3]  # Stage(name, help, paths, runner, ...)
            if isinstance(name, ast.Constant) and name.value == stage:
                return ast.literal_eval(runner).split(":")[0]
    raise SystemExit(f"preflight: gpu_check.sh runs unknown stage `redi {stage}` (not in redi/stages.py)")


def module_file(name: str, base: Path) -> Path | None:
    """File of module `name` (dotted) under folder `base`, or None."""
    path = base.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict) -> bool:
    """In `try: ... except ImportError` (optional by design) or under `if TYPE_CHECKING:`."""
    while node in parents:
        child, node = node, parents[node]
        if isinstance(node, ast.If) and child in node.body and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
        if isinstance(node, ast.Try) and child in node.body:
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                caught = {n.id for n in names if isinstance(n, ast.Name)}
                if caught & {"ImportError", "ModuleNotFoundError"}:
                    return True
    return False


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module, line, at module level) of each import in a file; relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = None  # the dotted package a relative import starts from, as a list
    if path.is_relative_to(REPO / "redi"):
        package = list(path.relative_to(REPO).parts[:-1])
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _guarded(node, parents):
            continue
        top_level = not any(isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                            for p in _ancestors(node, parents))
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, top_level) for a in node.names]
            continue
        if node.level:
            if package is None:
                raise SystemExit(f"preflight: relative import outside redi/ at {path}:{node.lineno}")
            base = package[: len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module
        found.append((module, node.lineno, top_level))
        found += [(f"{module}.{a.name}", node.lineno, top_level) for a in node.names if a.name != "*"]
    return found


def _ancestors(node, parents):
    while node in parents:
        node = parents[node]
        yield node


def preflight(script: Path, packages: list[str], wheels: list[Path]) -> tuple[list[str], dict]:
    """(problems, summary): every import reachable from the check's roots, resolved."""
    stdlib = (set(sys.stdlib_module_names) - REMOVED_IN_312) | {"__future__"}
    present = {n: f"device: {d}" for d in packages for n in import_names(d)}
    for w in wheels:
        dist, tops = wheel_modules(w)
        present.update({t: f"wheel: {w.name}" for t in tops})
    files, stages = check_roots(script)
    problems = [f"{f.relative_to(REPO)}: gpu_check.sh runs it but it does not exist" for f in files
                if not f.is_file()]
    problems += wheel_problems(wheels)
    queue = [f for f in files if f.is_file()]
    queue += [module_file("redi.cli", REPO)] + [module_file(stage_runner(s), REPO) for s in stages]
    seen, third_party, missing = set(), {}, {}
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, line, top_level in imports_of(path):
            where = f"{path.relative_to(REPO)}:{line}"
            top = module.split(".")[0]
            local = module_file(module, path.parent) if not path.is_relative_to(REPO / "redi") else None
            if local is not None or (top != "redi" and module_file(top, path.parent) is not None):
                if local is not None:
                    queue.append(local)
                continue
            if top == "redi":
                target = module_file(module, REPO)
                if target is not None:
                    queue.append(target)
                    parent = module_file(module.rsplit(".", 1)[0], REPO)
                    if parent is not None:
                        queue.append(parent)  # importing a.b imports a first
                elif module_file(module.rsplit(".", 1)[0], REPO) is None:
                    problems.append(f"{module}: no such module in the repository ({where})")
                continue
            if top in stdlib:
                continue
            if top in present:
                third_party.setdefault(top, present[top])
            elif not top_level and top in LAZY_NOT_RUN:
                continue
            else:
                missing.setdefault(top, []).append(where + ("" if top_level else " (in a function)"))
    for top, wheres in sorted(missing.items()):
        problems.append(f"missing module {top!r} (imported at {', '.join(wheres[:3])}"
                        f"{' ...' if len(wheres) > 3 else ''}): not on the device image nor in the wheels")
    return problems, {"roots": [str(f.relative_to(REPO)) for f in files] + [f"redi {s}" for s in stages],
                      "files": len(seen), "third_party": third_party}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", type=Path, default=REPO / "benchmarks" / "gpu_check.sh")
    p.add_argument("--packages", type=Path, default=REPO / "benchmarks" / "device_packages.txt",
                   help="the device image's distributions, one a line")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="folder of the carried wheels")
    args = p.parse_args(argv)
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    problems, summary = preflight(args.script, read_packages(args.packages), wheels)
    print(f"preflight: {len(summary['roots'])} roots ({', '.join(summary['roots'])}), {summary['files']} "
          f"files, {len(wheels)} wheels in {args.wheels}")
    print("preflight: third-party imports: " + ", ".join(
        f"{k} ({v})" for k, v in sorted(summary["third_party"].items())))
    for problem in problems:
        print(f"preflight: FAIL: {problem}")
    print("preflight: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
