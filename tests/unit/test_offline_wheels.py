"""The GPU-check wheelhouse: which distributions an image lacks, and Ray's slim repack."""

from __future__ import annotations

import tarfile
import zipfile

import pytest
from packaging.requirements import Requirement

from devtools.offline_wheels import SLIM_DROP, missing_closure, read_names, slim


def test_the_closure_follows_extras_and_markers_and_stops_at_what_the_image_has(tmp_path):
    plain = missing_closure([Requirement("ray")], set(), "3.12.3")
    train = missing_closure([Requirement("ray[train]")], set(), "3.12.3")
    assert {"tensorboardx", "pyarrow", "pydantic"} <= set(train) - set(plain)  # ray[train]'s extra
    have = tmp_path / "have.txt"
    have.write_text("# an image\nnumpy\nsix==1.16\nabsl-py  # comment\n")
    assert read_names(have) == {"numpy", "six", "absl-py"}
    rouge = missing_closure([Requirement("rouge-score")], read_names(have), "3.12.3")
    assert {"rouge-score", "nltk"} <= set(rouge) and not {"numpy", "six", "absl-py"} & set(rouge)
    assert rouge["rouge-score"] == "0.1.2"  # the version installed here (constraints.txt)
    # a requirement whose marker fails for the target is not followed, one whose marker holds must be installed
    assert "exceptiongroup" not in missing_closure([Requirement('exceptiongroup; python_version < "3.11"')],
                                                   set(), "3.12.3")
    with pytest.raises(LookupError, match=r"no-such-distribution \(needed by pyproject.toml\) is not installed"):
        missing_closure([Requirement("no-such-distribution")], set(), "3.12.3")


def test_slim_drops_the_listed_folders_and_keeps_file_modes(tmp_path):
    wheel = tmp_path / "ray-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, mode in (("ray/__init__.py", 0o644), ("ray/core/raylet", 0o755), ("ray/jars/big.jar", 0o644),
                           ("ray/rllib/x.py", 0o644), ("ray/dashboard/client/build/a.js", 0o644),
                           ("ray/dashboard/head.py", 0o644), ("ray-1.0.dist-info/RECORD", 0o644)):
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, name)
    target = tmp_path / "ray-slim.tar.xz"
    slim(wheel, SLIM_DROP["ray"], target)
    assert not wheel.exists()
    with tarfile.open(target) as tar:
        members = {m.name: m.mode for m in tar.getmembers() if m.isfile()}
    assert members == {"ray/__init__.py": 0o644, "ray/core/raylet": 0o755, "ray/dashboard/head.py": 0o644,
                       "ray-1.0.dist-info/RECORD": 0o644}
