"""--cluster ray's tests (tests/cluster_checks.py) run in a pytest process of their own.

Ray's driver leaves native threads and state in the process that started it. Once, in CI, the
pytest process aborted (SIGABRT, no Python traceback) in an FFmpeg encode of tests/test_codecs.py
seconds after the Ray tests had shut Ray down cleanly; that test passes alone and 15 times in a
row, and the abort never came without Ray before it. So the Ray tests get a process of their own,
and a failure there still fails this test, with the child's output.
"""

import os
import subprocess
import sys
from pathlib import Path


def test_the_cluster_checks_pass_in_a_process_of_their_own():
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "cluster_checks.py")],
                       cwd=here.parent, capture_output=True, text=True, timeout=1800, env=os.environ.copy())
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0 and " passed" in summary and "failed" not in summary, \
        f"{r.stdout[-12000:]}\n{r.stderr[-4000:]}"
    print(summary)
