"""A wheelhouse for running the project on an offline machine that already has PyTorch.

GPU machines are often images with CUDA, PyTorch and the usual scientific stack preinstalled but no
network. This collects, here, the wheels of every runtime dependency such an image lacks (for the
image's Python version and manylinux), so that ``devtools/gpu_check.sh`` can install them there with
``pip --no-index``. Which packages the image has is a text file of distribution names, one per line
(``devtools/cuda_image_packages.txt`` is the PyTorch CUDA image the GPU checks were written for).

The closure is computed from this environment's installed metadata (the versions of
``constraints.txt``): starting at the project's dependencies, every requirement whose markers hold
for the target Python is followed, except into packages the image has (it has their dependencies
too). Each missing distribution is then downloaded with ``--no-deps`` at the version installed here.

For transfers with a size cap, ``--skip`` leaves out distributions the project imports only on
request (``datasets``: Hugging Face dataset folders as training data) and ``--slim`` repacks Ray's
and Prefect's wheels, as ``NAME-slim.tar.xz``, without what a flow run never loads (``SLIM_DROP``:
Ray's Java jars, RLlib, Serve, LLM library and dashboard web client; Prefect's web UI, so the
Prefect server must run with ``PREFECT_UI_ENABLED=false``): Ray 79 → 29 MB, Prefect 7 → 2 MB.
``gpu_check.sh`` unpacks them beside the wheels.

    .venv/bin/python -m devtools.offline_wheels --have devtools/cuda_image_packages.txt \
        --python-version 3.12.3 --skip datasets --slim --out .whl
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Folders of these wheels that a flow run with Ray Train never loads.
SLIM_DROP = {
    "ray": ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/"),
    "prefect": ("prefect/server/ui/", "prefect/server/ui-v2/"),
}


def read_names(path: Path) -> set[str]:
    """Canonical distribution names from a file: one per line, ``#`` comments and ``name==ver`` allowed."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(Requirement(line).name))
    return names


def project_requirements(pyproject: Path) -> list[Requirement]:
    """The ``[project] dependencies`` of ``pyproject``."""
    import tomllib

    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def missing_closure(roots: list[Requirement], have: set[str], python_version: str) -> dict[str, str]:
    """{canonical name: installed version} of every distribution reachable from ``roots`` through
    requirements whose markers hold for ``python_version`` (major.minor.micro) on Linux, not entering packages in
    ``have``. Raises LookupError naming a required distribution not installed here."""
    major_minor = ".".join(python_version.split(".")[:2])
    env = {**default_environment(), "python_version": major_minor,
           "python_full_version": python_version, "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64"}
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(r, "pyproject.toml") for r in roots if r.marker is None or r.marker.evaluate(env)]
    while queue:
        req, needed_by = queue.pop()
        name = canonicalize_name(req.name)
        if name in have or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise LookupError(f"{req} (needed by {needed_by}) is not installed in {sys.prefix}; "
                              "run `make setup` first") from None
        found[name] = dist.version
        extras = {""} | set(req.extras)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras):
                queue.append((sub, req.name))
    return found


def download(pins: dict[str, str], out: Path, python_version: str) -> None:
    """Binary wheels of each ``name==version`` for the target (``pip download --no-deps``); a
    distribution published only as an sdist is built into a wheel here, which must then be pure
    Python (``py3-none-any``) to install on the target. Raises RuntimeError naming one that is not."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(out), "-q"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    for name, version in sorted(pins.items()):
        if subprocess.run(cmd + [f"{name}=={version}"], capture_output=True).returncode == 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp,
                            f"{name}=={version}"], check=True)
            built = list(Path(tmp).glob("*.whl"))
            if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
                raise RuntimeError(f"{name}=={version} has no wheel for CPython {python_version} on "
                                   f"manylinux x86_64 and does not build as pure Python: {built}")
            print(f"{name}=={version}: no published wheel, built {built[0].name}")
            shutil.move(str(built[0]), out / built[0].name)


def slim(wheel: Path, drop: tuple[str, ...], target: Path) -> None:
    """Unpack ``wheel`` without the members under ``drop`` into the tarball ``target`` (xz), keeping
    file modes; removes the wheel."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            if not member.filename.startswith(drop):
                zf.extract(member, tmp)
                mode = member.external_attr >> 16
                if mode:
                    Path(tmp, member.filename).chmod(mode & 0o777)
        partial = target.with_name(target.name + ".tmp")
        with tarfile.open(partial, "w:xz") as tar:
            for entry in sorted(Path(tmp).iterdir()):
                tar.add(entry, arcname=entry.name)
        partial.replace(target)
    wheel.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--have", type=Path, required=True,
                        help="file of distribution names the target already has, one per line")
    parser.add_argument("--python-version", default="3.12.3", help="the target's Python, major.minor.micro")
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="wheelhouse folder (replaced)")
    parser.add_argument("--skip", default="", help="comma-separated distributions to leave out")
    parser.add_argument("--slim", action="store_true",
                        help="repack Ray and Prefect without what a flow run never loads (SLIM_DROP)")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)

    have = read_names(args.have) | {canonicalize_name(n) for n in args.skip.split(",") if n.strip()}
    pins = missing_closure(project_requirements(args.pyproject), have, args.python_version)
    print(f"{len(pins)} distributions the target lacks: "
          + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    download(pins, partial, args.python_version)
    if args.slim:
        for name, drop in SLIM_DROP.items():
            for wheel in partial.glob(f"{name}-*.whl"):
                print(f"repacking {wheel.name} without {', '.join(drop)}")
                slim(wheel, drop, partial / f"{name}-slim.tar.xz")
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{args.out}: {len(list(args.out.iterdir()))} files, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
