"""Run inside ``unshare -m`` by tests/test_faults.py: a search whose disk fills up mid-search.

    python full_disk.py WORK MOUNT  (argv after: the CLI's arguments)

Mounts a small tmpfs on MOUNT (this mount namespace only), runs the CLI with its output
dir there, fills the tmpfs once round 0 is told, waits for the CLI to exit, inspects the
run dir, frees the space and runs the same command again. Prints one JSON object with what
it saw; the tmpfs vanishes with the namespace.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

work, mount, cli = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
mount.mkdir(parents=True, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
out = mount / "run"
command = [sys.executable, "-m", "flows.autofinetune", *cli, "--output-dir", str(out)]


def state():
    try:
        return json.loads((out / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


first = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
deadline = time.monotonic() + 180
while (state() or {}).get("next_round", 0) < 1 and time.monotonic() < deadline and first.poll() is None:
    time.sleep(0.05)
filler = mount / "filler"
with open(filler, "wb", buffering=0) as f:  # everything that is left
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
first_log, _ = first.communicate(timeout=180)
after_first = {"code": first.returncode, "log": first_log[-6000:], "state": state(),
               "temp_files": [str(p) for p in out.rglob("*.tmp-*")],
               "pid_files": [str(p) for p in out.rglob(".pid-*")]}
filler.unlink()
second = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
print(json.dumps({"first": after_first,
                  "second": {"code": second.returncode, "log": (second.stdout + second.stderr)[-6000:],
                             "resumed": "Resuming the search" in second.stdout + second.stderr,
                             "state": state()}}))
