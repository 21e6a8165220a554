"""Files a role reads from its workspace, given at submit as `--input NAME=FILE`.

The role table (roles.yaml) says which inputs a role takes (a Fed-BioMed researcher's experiment
script, a node's dataset descriptions), where each goes in the deployment's directory, and which
content check it gets. Everything is checked when the plan is built - names, files, contents -
so a bad description fails at `submit` (exit 3), not in the job after the queue wait. At submit
the files are copied into the deployment's directory: a snapshot, so editing or deleting the
file afterwards changes nothing, and a requeued or rejoined job finds the same copy.

A check may also name directories the container must see (a dataset description names its
data file on the cluster): they are mounted read-only at the same path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from hpcfed.container.apptainer import bind_path
from hpcfed.errors import ConfigError, NotFound
from hpcfed.frameworks import Input, Role

MAX_INPUT_BYTES = 1 << 20  # descriptions and scripts, not data: data stays where it is


@dataclass(frozen=True)
class InputFile:
    name: str  # the role's input it is
    source: str  # absolute path where hpcfed runs
    dest: str  # relative to the deployment's directory


def parse_specs(specs: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--input {spec!r}: expected NAME=FILE")
        out.append((name, path))
    return out


def resolve(
    role: Role, specs: Sequence[str], data_on_this_machine: bool, own_command: bool = False
) -> Tuple[Tuple[InputFile, ...], Tuple[str, ...]]:
    """(input files, read-only bind specs) for `--input` specs, or ConfigError/NotFound naming
    the flag, file and key. `data_on_this_machine`: paths inside the files (a dataset's data)
    can be checked here (the site's scheduler is local). `own_command`: --command runs instead
    of the role, so nothing is required."""
    known: Dict[str, Input] = {i.name: i for i in role.inputs}
    given = parse_specs(specs)
    files: List[InputFile] = []
    binds: List[str] = []
    for name, path in given:
        spec = known.get(name)
        if spec is None:
            takes = ", ".join(known) or "none"
            raise ConfigError(
                f"--input {name}={path}: the {role.framework} {role.name} takes no input "
                f"{name!r} (inputs: {takes})"
            )
        source = os.path.abspath(os.path.expanduser(path))
        data = _read(source, f"--input {name}={path}")
        if spec.check:
            for directory in CHECKS[spec.check](source, data, data_on_this_machine):
                bind = f"{directory}:{directory}:ro"
                if bind not in binds:
                    binds.append(bind)
        dest = spec.dest + os.path.basename(source) if spec.multiple else spec.dest
        if any(f.dest == dest for f in files):
            raise ConfigError(
                f"--input {name}={path}: another --input {name} has the same file name "
                f"({os.path.basename(source)}); each lands in {spec.dest} under its own name"
            )
        files.append(InputFile(name, source, dest))
    for spec in role.inputs:
        count = sum(1 for f in files if f.name == spec.name)
        if spec.required and count == 0 and not own_command:
            raise ConfigError(
                f"--input {spec.name}=FILE: the {role.framework} {role.name} needs its "
                f"{spec.name} (copied to {spec.dest} in its workspace)"
            )
        if count > 1 and not spec.multiple:
            raise ConfigError(f"--input {spec.name}: given {count} times; the role takes one")
    return tuple(files), tuple(binds)


def _read(source: str, what: str) -> bytes:
    try:
        size = os.path.getsize(source)
        if size > MAX_INPUT_BYTES:
            raise ConfigError(
                f"{what}: {size} bytes; inputs are scripts and descriptions (at most "
                f"{MAX_INPUT_BYTES} bytes), data stays on the cluster"
            )
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from None


# Fed-BioMed's non-interactive `dataset add --file` (6.4.1): these keys; tags one comma-separated
# string (a JSON list becomes the single tag "['t']"); name, description and each tag at least 3
# characters. A missing key is only printed by Fed-BioMed, then it fails with a traceback.
FEDBIOMED_DATASET_KEYS = ("name", "description", "tags", "data_type", "path")


def check_fedbiomed_dataset(source: str, data: bytes, data_on_this_machine: bool) -> List[str]:
    """A Fed-BioMed dataset description; returns the directory its data is in (to mount)."""
    try:
        desc = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{source}: not JSON ({exc})") from None
    if not isinstance(desc, dict):
        raise ConfigError(f"{source}: a dataset description is a JSON object")
    missing = [k for k in FEDBIOMED_DATASET_KEYS if k not in desc]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)} (Fed-BioMed needs them all)")
    for key in FEDBIOMED_DATASET_KEYS:
        if not isinstance(desc[key], str):
            hint = ' (one string: "a,b", not a list)' if key == "tags" else ""
            raise ConfigError(f"{source}: {key} must be a string{hint}")
    for key in ("name", "description"):
        if len(desc[key].strip()) < 3:
            raise ConfigError(f"{source}: {key} {desc[key]!r}: at least 3 characters")
    for tag in desc["tags"].split(","):
        if len(tag.strip()) < 3:
            raise ConfigError(f"{source}: tags: {tag!r}: each tag at least 3 characters")
    data_path = desc["path"]
    if not os.path.isabs(data_path):
        raise ConfigError(f"{source}: path {data_path!r}: an absolute path on the cluster")
    if data_on_this_machine and not os.path.exists(data_path):
        raise NotFound(f"{source}: path {data_path}: no such file or directory")
    directory = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    bind_path(directory, f"{source}: path")
    return [directory]


CHECKS: Dict[str, Callable[[str, bytes, bool], List[str]]] = {
    "fedbiomed-dataset": check_fedbiomed_dataset,
}
