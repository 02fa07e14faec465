"""`mea-wheelhouse`: the wheels a GPU node without a network needs to run mea beside what it already has.

    python -m mea.tools.wheelhouse --python 3.12 --have node-packages.txt --out wheelhouse/
    # on the node, from the repository's root:
    pip install --no-index --no-deps --target /tmp/site wheelhouse/*.whl && export PYTHONPATH=/tmp/site

Compute nodes often reach no package index, and a cluster's image brings its own CUDA torch (and often numpy,
scipy, ...) for its own Python. The wheels are mea's dependencies with the `--extras` asked for (`test` by default:
`make gpu-check` runs the CUDA suite), taken at the versions installed here, where the suite passes, and found by
walking the installed packages' requirements for the node's Python (`--python`), so that nothing is resolved
against an index. Left out: torch, which the node's CUDA build provides, with what comes with it (triton, the
nvidia-* libraries), and every package `--have` lists (`pip freeze` or `pip list --format=freeze` there, or bare
names) at a version that meets every requirement here; one it has at a version that does not is fetched, and
the PYTHONPATH above puts it first. Each wheel is fetched for the node's Python and platform (`pip download
--only-binary`); a package published only as source is built into a wheel here (`pip wheel`), which must come out
pure Python. A requirement of the node's Python that nothing installed here meets stops it in one line, before
anything is fetched.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

NODE_PROVIDES = ("torch", "triton")  # the node's CUDA build of torch, with the Triton it was built with
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def node_environment(python: str) -> dict[str, str]:
    """The marker environment of a Linux x86-64 CPython `python` (3.12): the markers requirements are read with."""
    major_minor = ".".join(python.split(".")[:2])
    return {**default_environment(), "python_version": major_minor, "python_full_version": f"{major_minor}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def provided_by_node(name: str) -> bool:
    return name in NODE_PROVIDES or name.startswith("nvidia-")


def closure(root: str, extras: tuple[str, ...], python: str) -> dict[str, tuple[Version, list[Requirement]]]:
    """Every package root[extras] needs on the node's Python, transitively: name -> (the version installed here,
    the requirements on it). Markers are evaluated for the node, each requirement with the extras asked of it.
    What the node's torch provides is neither looked up here nor walked: a CPU install has no Triton (Liger's and
    CCE's requirement), and the node's torch brings its own requirements."""
    environment = node_environment(python)
    found: dict[str, tuple[Version, list[Requirement]]] = {}
    walked: set[tuple[str, frozenset[str]]] = set()
    pending = [(Requirement(f"{root}[{','.join(extras)}]" if extras else root), "")]
    while pending:
        requirement, wanted_by = pending.pop()
        name = canonicalize_name(requirement.name)
        if provided_by_node(name):
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            needed = f"{requirement.name}{requirement.specifier}"
            sys.exit(f"mea-wheelhouse: {needed} (needed by {wanted_by or 'you'} on Python {python}) is not installed here; "
                     f"install it into this environment first (`pip install '{needed}'`), so that its version is one the suite ran with")
        found.setdefault(name, (Version(distribution.version), []))[1].append(requirement)
        if (name, frozenset(requirement.extras)) in walked:
            continue
        walked.add((name, frozenset(requirement.extras)))
        asked = [{**environment, "extra": extra} for extra in ("", *sorted(requirement.extras))]
        pending += [(needed, name) for needed in map(Requirement, distribution.requires or [])
                    if needed.marker is None or any(needed.marker.evaluate(env) for env in asked)]
    return found


def node_has(have_file: Path | None) -> dict[str, Version | None]:
    """The packages the node has (`name==version` lines, or bare names: a version not known)."""
    if have_file is None:
        return {}
    has = {}
    for line in have_file.read_text().splitlines():
        for entry in re.split(r"[\s,]+", line.partition("#")[0]):
            name, _, version = entry.partition("==")
            if name:
                has[canonicalize_name(name)] = Version(version) if version else None
    return has


def wanted(needs: dict[str, tuple[Version, list[Requirement]]], has: dict[str, Version | None], root: str) -> dict[str, Version]:
    """What the node must be given: not mea itself (it runs from the checkout), and not what it has at a version
    every requirement accepts (a version it does not name is taken to do)."""
    def satisfied(name: str) -> bool:
        version = has[name]
        return version is None or all(version in r.specifier for r in needs[name][1])

    return {name: version for name, (version, _) in sorted(needs.items())
            if name != canonicalize_name(root) and not (name in has and satisfied(name))}


def fetch(name: str, version: Version, python: str, out: Path) -> Path:
    """One wheel into out: the published one for the node, else one built here from source (pure Python only).
    A wheel already there from an earlier run is kept (pip download skips it)."""
    pinned = f"{name}=={version}"
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                *(f"--platform={p}" for p in PLATFORMS), "-d", str(out), pinned]
    if subprocess.run(download, capture_output=True, text=True).returncode != 0:
        with tempfile.TemporaryDirectory() as build:
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", build, pinned], capture_output=True, text=True)
            built = list(Path(build).glob("*.whl"))
            if proc.returncode != 0 or not built:
                sys.exit(f"mea-wheelhouse: no wheel of {pinned} for Python {python} on Linux x86-64, and building one here failed "
                         f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]}); fetch it on a machine with the node's Python")
            if not built[0].name.endswith("-py3-none-any.whl"):
                sys.exit(f"mea-wheelhouse: {pinned} is published as source only and built here into {built[0].name}, which holds compiled code "
                         f"for this machine; build it on the node's Python ({python}) instead")
            built[0].rename(out / built[0].name)
    (wheel,) = [path for path in out.glob("*.whl") if parse_wheel_filename(path.name)[:2] == (name, version)]
    return wheel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-wheelhouse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=platform.python_version(), help="the node's Python, e.g. 3.12 (default: this one)")
    parser.add_argument("--have", type=Path, help="what the node has: `pip freeze` there, or names one per line")
    parser.add_argument("--extras", default="test", help="mea's extras to include, comma-separated (default: test; '' for none)")
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"), help="where the wheels go (default: wheelhouse/)")
    parser.add_argument("--list", action="store_true", help="print what would be fetched, and fetch nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+(\.\d+)?", args.python):
        parser.error(f"--python {args.python!r} is not a CPython version; give it as 3.12")
    if args.have is not None and not args.have.is_file():
        parser.error(f"--have {args.have}: no such file; write the node's `pip freeze` to it")
    supported = metadata.distribution("mea").metadata["Requires-Python"]
    if Version(args.python) not in SpecifierSet(supported):
        parser.error(f"--python {args.python}: mea needs Python {supported}; give the node's Python, or install one that meets it there")
    extras = tuple(e for e in args.extras.split(",") if e)
    needs = wanted(closure("mea", extras, args.python), node_has(args.have), "mea")
    if args.list:
        print("\n".join(f"{name}=={version}" for name, version in needs.items()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = 0
    for name, version in needs.items():
        wheel = fetch(name, version, args.python, args.out)
        sizes += wheel.stat().st_size
        print(wheel.name)
    print(f"{len(needs)} wheels, {sizes / 2**20:.1f} MiB, in {args.out}: on the node, "
          f"pip install --no-index --no-deps --target /tmp/site {args.out}/*.whl && export PYTHONPATH=/tmp/site")


if __name__ == "__main__":
    main()
