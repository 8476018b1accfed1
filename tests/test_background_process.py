"""The tests' own child-process helper (tests/helpers.BackgroundProcess): reading its output loses none of it."""

import sys

from helpers import BackgroundProcess

WRITER = "import sys\nfor n in range(3000):\n    print(f'line {n}', flush=True)\n"


def test_reading_a_childs_output_while_it_writes_loses_none_of_it(tmp_path):
    # The child writes through the file it was given while the test reads what it wrote so far: the reads
    # must not move where the child's next line goes (a shared file offset overwrote its first lines).
    child = BackgroundProcess([sys.executable, "-c", WRITER], None, tmp_path)
    try:
        while child.process.poll() is None:
            child.stdout()
        child.process.wait(timeout=10)
        lines = child.stdout().splitlines()
        assert len(lines) == 3000 and lines[0] == "line 0" and lines[-1] == "line 2999", lines[:3]
    finally:
        child.close()
