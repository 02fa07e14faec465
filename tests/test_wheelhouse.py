"""mea-wheelhouse: the wheels a GPU node without a network needs beside what it has, read from the packages
installed here for the node's Python, and fetched (or built from source) as wheels that install there offline."""
import re
import subprocess
import sys
import zipfile

import pytest

from mea.tools.wheelhouse import closure, node_has, wanted

from .conftest import run_cli


def test_requirements_are_read_for_the_nodes_python():
    """huggingface-hub needs tomli below Python 3.11 only: the node's markers decide, not this interpreter's (on 3.10
    the walk may first meet another such package this environment lacks, exceptiongroup say)."""
    assert "tomli" not in closure("huggingface-hub", (), "3.12")
    try:
        assert "tomli" in closure("huggingface-hub", (), "3.10")
    except SystemExit as e:  # what this environment lacks stops it, in one line naming the package and the fix
        assert re.fullmatch(r"mea-wheelhouse: \S+ \(needed by \S+ on Python 3\.10\) is not installed here; install it into this environment first .*", str(e))


def test_the_node_is_given_what_it_lacks_or_has_too_old_and_never_torch(tmp_path):
    have = tmp_path / "freeze.txt"
    have.write_text("numpy==1.0.0\nscipy\nomegaconf==2.3.1, pytest\n# a comment\n")
    assert node_has(have) == {"numpy": node_has(have)["numpy"], "scipy": None, "omegaconf": node_has(have)["omegaconf"], "pytest": None}
    needs = closure("mea", ("test",), "3.12")
    given = wanted(needs, node_has(have), "mea")
    assert {"hydra-core", "antlr4-python3-runtime", "deepspeed", "pydantic", "lm-eval"} <= set(given)  # antlr4 and pydantic: requirements of requirements
    assert "numpy" in given and given["numpy"] == needs["numpy"][0]  # the node's 1.0.0 meets no requirement on it: this one's version is given
    assert not {"scipy", "omegaconf", "pytest", "mea", "torch", "triton"} & set(given) and not any(name.startswith("nvidia-") for name in given)
    assert "lm-eval" not in wanted(closure("mea", (), "3.12"), {}, "mea")  # an extra not asked for


def test_what_the_nodes_torch_brings_is_neither_looked_up_here_nor_walked(tmp_path, monkeypatch):
    """Liger-Kernel and cut-cross-entropy (`--extras liger,cce`) require Triton, which a CPU install lacks and the
    node's CUDA torch brings: a package installed here with their requirements (its metadata on sys.path) is walked
    past them, whatever this environment has, to what the node does need."""
    info = tmp_path / "kernels_probe-1.0.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: kernels-probe\nVersion: 1.0\nRequires-Dist: torch>=2.1.2\nRequires-Dist: triton>=2.3.1\n"
                                         "Requires-Dist: nvidia-cublas; platform_system == \"Linux\"\nRequires-Dist: hjson\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    needs = closure("kernels-probe", (), "3.12")
    assert set(needs) == {"kernels-probe", "hjson"}
    assert set(wanted(needs, {}, "mea")) == {"kernels-probe", "hjson"}


def test_a_python_mea_does_not_run_on_or_a_missing_have_file_is_refused_in_one_line(tmp_path):
    proc = run_cli("-m", "mea.tools.wheelhouse", "--python", "3.9", "--list")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("--python 3.9: mea needs Python >=3.11; give the node's Python, or install one that meets it there")
    proc = run_cli("-m", "mea.tools.wheelhouse", "--have", str(tmp_path / "nothing.txt"), "--list")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith(f"--have {tmp_path / 'nothing.txt'}: no such file; write the node's `pip freeze` to it")


def test_wheels_are_fetched_for_the_node_and_a_source_only_package_is_built_pure(tmp_path):
    """hydra-core's requirement antlr4-python3-runtime 4.9.3 is published as source alone: built here, it must be
    a pure-Python wheel; pydantic-core is a compiled wheel, fetched for the node's CPython 3.12. Run again into the
    same folder, it finds the wheels there."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--retries", "0", "--timeout", "15", "-d", str(tmp_path / "probe"), "hjson==3.1.0"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"needs a package index: pip download hjson failed here ({(probe.stderr.strip().splitlines() or ['no output'])[-1][:120]})")
    have = tmp_path / "freeze.txt"
    needs = closure("mea", (), "3.12")
    have.write_text("\n".join(name for name in needs if name not in ("antlr4-python3-runtime", "pydantic-core")))
    out = tmp_path / "wheels"
    proc = run_cli("-m", "mea.tools.wheelhouse", "--python", "3.12", "--extras", "", "--have", str(have), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    wheels = sorted(p.name for p in out.iterdir())
    assert len(wheels) == 2 and wheels[0].startswith("antlr4_python3_runtime-4.9.3-py3-none-any") and "-cp312-cp312-manylinux" in wheels[1]
    assert proc.stdout.splitlines()[-1].startswith("2 wheels, ") and "pip install --no-index --no-deps --target /tmp/site" in proc.stdout
    with zipfile.ZipFile(out / wheels[0]) as wheel:
        assert "antlr4/__init__.py" in wheel.namelist()
    again = run_cli("-m", "mea.tools.wheelhouse", "--python", "3.12", "--extras", "", "--have", str(have), "--out", str(out), timeout=600)
    assert again.returncode == 0 and again.stdout == proc.stdout and sorted(p.name for p in out.iterdir()) == wheels  # a second run into the same folder
