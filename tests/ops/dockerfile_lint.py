"""A small Dockerfile checker for this project's images (hadolint is not installable here).

    python -m tests.ops.dockerfile_lint docker/Dockerfile.cpu docker/Dockerfile.cuda

Rules (each finding names the rule and the instruction's line):
  PD001 a FROM exists;  PD002 every base image has a pinned tag (no ``latest``, no bare name);
  PD003 the final USER is set and is not root;  PD004 no ``curl|wget ... | sh``;
  PD005 constraints.txt is copied before the first ``pip install`` and every ``pip install`` uses
  ``-c constraints.txt``;  PD006 ``apt-get install`` uses ``--no-install-recommends`` and removes
  /var/lib/apt/lists;  PD007 no ADD of a URL;  PD008 no model download at build time.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined; ``line`` is 1-based."""

    line: int
    keyword: str
    args: str


@dataclass(frozen=True)
class Finding:
    rule: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.rule} line {self.line}: {self.message}"


def parse(text: str) -> list[Instruction]:
    """Instructions in order; comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        keyword, _, args = " ".join(buf).partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = []
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _base_images(instructions: Sequence[Instruction]) -> Iterator[tuple[Instruction, str]]:
    """(FROM instruction, image with global ARG defaults substituted)."""
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    for ins in instructions:
        if ins.keyword == "ARG" and not any(i.keyword == "FROM" for i in instructions[: instructions.index(ins)]):
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = _substitute(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2])
            if image not in stages:
                yield ins, image


def _is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.split(":", 1)[1] not in ("", "latest") and "$" not in image


def lint(text: str) -> list[Finding]:
    """Every finding for one Dockerfile's text (empty when clean)."""
    ins = parse(text)
    found: list[Finding] = []
    froms = [i for i in ins if i.keyword == "FROM"]
    if not froms:
        found.append(Finding("PD001", 1, "no FROM instruction"))
    for i, image in _base_images(ins):
        if not _is_pinned(image):
            found.append(Finding("PD002", i.line, f"base image {image!r} is not pinned to a tag or digest"))
    users = [i for i in ins if i.keyword == "USER"]
    if not users:
        found.append(Finding("PD003", 1, "no USER: the image would run as root"))
    elif users[-1].args.split(":")[0] in ("root", "0"):
        found.append(Finding("PD003", users[-1].line, "the final USER is root"))
    copied_constraints = False
    for i in ins:
        if i.keyword in ("COPY", "ADD") and "constraints.txt" in i.args.split():
            copied_constraints = True
        if i.keyword == "ADD" and re.search(r"\bhttps?://", i.args):
            found.append(Finding("PD007", i.line, "ADD of a URL: download in a RUN step with a checksum instead"))
        if i.keyword != "RUN":
            continue
        if re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(ba|z|da)?sh\b", i.args):
            found.append(Finding("PD004", i.line, "piping a download into a shell"))
        for cmd in re.split(r"&&|;|\|\|", i.args):
            if re.search(r"\bpip3?\s+install\b", cmd):
                if not copied_constraints:
                    found.append(Finding("PD005", i.line, "pip install before constraints.txt is copied"))
                elif not re.search(r"(-c|--constraint)[ =]constraints\.txt", cmd):
                    found.append(Finding("PD005", i.line, "pip install without -c constraints.txt"))
        if re.search(r"\bapt-get\s+install\b", i.args):
            if "--no-install-recommends" not in i.args:
                found.append(Finding("PD006", i.line, "apt-get install without --no-install-recommends"))
            if "/var/lib/apt/lists" not in i.args:
                found.append(Finding("PD006", i.line, "apt lists not removed in the same RUN"))
        if re.search(r"from_pretrained|huggingface-cli\s+download|\bhf\s+download|snapshot_download|"
                     r"prepare-quickstart|build-tiny", i.args):
            found.append(Finding("PD008", i.line, "model download or build at image build time"))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Lint each file; print findings; exit 1 when any."""
    paths = list(sys.argv[1:] if argv is None else argv)
    bad = 0
    for path in paths:
        for f in lint(Path(path).read_text()):
            print(f"{path}: {f}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
