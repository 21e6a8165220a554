"""Plan -> sbatch script text, through the Jinja2 templates in hpcfed/sbatch_templates/.

Pure and strict: an undefined variable is an error, and a value that would break out of its
`#SBATCH` line (a newline) is refused rather than rendered.
"""

from __future__ import annotations

import shlex
from functools import lru_cache

from hpcfed import paths
from hpcfed.errors import ConfigError
from hpcfed.plan import Plan
from hpcfed.profiles.units import slurm_time


def _opt(value) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"sbatch option value {text!r}: must be one line")
    return text


def _bytecode_cache():
    """Compiled templates kept in the user's cache (0700: it holds code that will run).

    Compiling the template was ~10 ms of every submit (issue 17); jinja2 keys each entry by the
    template's source checksum and its own and Python's versions, so a changed template or an
    upgrade recompiles. A cache never fails a render: without a usable directory (read-only
    home, a file in the way) each submit compiles.
    """
    import jinja2

    class Cache(jinja2.FileSystemBytecodeCache):
        def dump_bytecode(self, bucket) -> None:
            try:
                super().dump_bytecode(bucket)
            except OSError:
                pass

    try:
        return Cache(str(paths.private_mkdir(paths.cache_dir() / "jinja2")))
    except OSError:
        return None


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.sbatch_templates_dir())),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["opt"] = _opt
    env.filters["slurm_time"] = slurm_time
    env.filters["shell_quote"] = shlex.quote
    return env


def render(plan: Plan) -> str:
    """The sbatch script for `plan`."""
    import jinja2

    try:
        template = _environment().get_template(plan.template)
    except jinja2.TemplateNotFound:
        raise ConfigError(
            f"sbatch template {plan.template!r} not found in {paths.sbatch_templates_dir()}"
        ) from None
    return template.render(plan=plan, r=plan.resources, plan_json=plan.to_json())
