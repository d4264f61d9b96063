"""Stand-in LSF commands for the LSF profile's submission test (no open LSF is packaged).

The LSF executor plugin reads the cluster's configuration (`badmin showconf mbd`, `lsclusters`,
lsb.params), submits with `bsub` and polls `bjobs`. These stand-ins answer with a one-cluster
configuration; `bsub` records its argument list (one JSON line per submission in `bsub.jsonl`) and
runs nothing; `bjobs` reports every recorded job as EXIT, so Snakemake stops after submitting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["install_fake_lsf", "submissions"]

CLUSTER = "xtra-test"

_BSUB = """#!{python}
import json, sys
from pathlib import Path
log = Path({log!r})
with log.open("a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"Job <{{len(log.read_text().splitlines())}}> is submitted to queue <normal>.")
"""

_BJOBS = """#!{python}
from pathlib import Path
log = Path({log!r})
count = len(log.read_text().splitlines()) if log.exists() else 0
for job in range(1, count + 1):
    print(f"{{job}} EXIT")
"""


def install_fake_lsf(root: Path) -> dict[str, str]:
    """Write the commands into root/bin; returns the environment additions (PATH first)."""
    bin_dir, conf, share = root / "bin", root / "conf", root / "share"
    for folder in (bin_dir, conf / "lsbatch" / CLUSTER / "configdir", share / CLUSTER / "logdir"):
        folder.mkdir(parents=True, exist_ok=True)
    (conf / "lsbatch" / CLUSTER / "configdir" / "lsb.params").write_text(
        "Begin Parameters\nDEFAULT_QUEUE = normal\nEnd Parameters\n"
    )
    (share / CLUSTER / "logdir" / "lsb.events").write_text("")
    log = root / "bsub.jsonl"
    scripts = {
        "bsub": _BSUB.format(python=sys.executable, log=str(log)),
        "bjobs": _BJOBS.format(python=sys.executable, log=str(log)),
        "badmin": f"#!/bin/sh\necho 'MBD configuration at now'\necho 'LSB_SHAREDIR = {share}'\n"
        f"echo 'LSF_CONFDIR = {conf}'\n",
        "lsclusters": f"#!/bin/sh\necho 'CLUSTER_NAME STATUS MASTER_HOST'\necho '{CLUSTER} ok localhost'\n",
        "bhist": "#!/bin/sh\nexit 0\n",
        "bkill": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return {"PATH": str(bin_dir)}


def submissions(root: Path) -> list[list[str]]:
    """The argument lists of every `bsub` call, in order."""
    log = root / "bsub.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
