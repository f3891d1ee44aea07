"""A small reader for our Dockerfile: stages, their instructions, and the heredoc files they create.

Enough for tests on a machine without Docker: it handles line continuations, comments, `FROM x AS y`
and `COPY <<'EOF' dest` heredocs, which is all our Dockerfile uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE_PATH = Path(__file__).resolve().parents[2] / "Dockerfile"

_HEREDOC = re.compile(r"<<-?(['\"]?)(?P<tag>[A-Za-z_]+)\1")


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the logical line, continuations joined
    heredoc: str = ""  # the body of a `<<EOF` heredoc, if any


@dataclass(slots=True)
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name). Raises ValueError for an instruction before any FROM
    other than ARG, or an unterminated heredoc."""
    lines = text.splitlines()
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if not nxt.startswith("#"):
                line = line[:-1].rstrip() + " " + nxt
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        heredoc = ""
        m = _HEREDOC.search(args)
        if m:
            end = lines.index(m["tag"], i) if m["tag"] in lines[i:] else -1
            if end < 0:
                raise ValueError(f"unterminated heredoc {m['tag']}")
            heredoc = "\n".join(lines[i:end]) + "\n"
            i = end + 1
        if keyword == "FROM":
            base, *alias = re.split(r"\s+as\s+", args, flags=re.IGNORECASE)
            current = Stage(name=alias[0] if alias else base, base=base)
            stages[current.name] = current
        elif current is None:
            if keyword != "ARG":
                raise ValueError(f"{keyword} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            current.instructions.append(Instruction(keyword, args, heredoc))
    return global_args, stages


def load(path: Path = DOCKERFILE_PATH) -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(path.read_text())


def lineage(stages: dict[str, Stage], name: str, variant: str) -> list[Stage]:
    """The chain of our stages that `--target name --build-arg VARIANT=variant` builds, target first
    (stops at an external base image)."""
    chain: list[Stage] = []
    while name in stages:
        stage = stages[name]
        chain.append(stage)
        name = stage.base.replace("${VARIANT}", variant)
    return chain
