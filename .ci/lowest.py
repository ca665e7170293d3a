"""Print ``name==X`` for every dependency pyproject.toml declares as ``name>=X`` (torch aside:
the matrix holds torch at the CPU wheel), plus those of the extras named on the command line.

The "lowest" environment of the version matrix installs with these as constraints, so the
declared lower bounds are exactly what CI tests.

    python .ci/lowest.py pyproject.toml [EXTRA ...]
"""

import re
import sys

import tomllib

with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[2:]:
    requirements += project["optional-dependencies"][extra]
for requirement in requirements:
    m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*$", requirement)
    if m is None:
        sys.exit(f"{requirement!r}: every dependency needs a plain lower bound (name>=X)")
    if m.group(1) != "torch":
        print(f"{m.group(1)}=={m.group(3)}")
