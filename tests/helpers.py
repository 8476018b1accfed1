"""Small helpers shared by the tests."""

import signal
import subprocess
import time

import gevent


def wait_until(condition, timeout=5.0, what="condition"):
    """Poll *condition* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        gevent.sleep(0.01)


class BackgroundProcess:
    """A child process left running, its stdout and stderr in files under *directory*, so a test can read them
    while it runs; :meth:`close` kills it if it still runs."""

    def __init__(self, command, env, directory, cwd=None):
        directory.mkdir(parents=True, exist_ok=True)
        self._out_path, self._err_path = directory / "stdout", directory / "stderr"
        # Append mode, and read through files of their own: the child's writes always go to the end, whatever
        # reading does (a file shared with the child shares its offset, and a read seeking back to the start
        # made the child's next lines overwrite its first ones).
        self._out = open(self._out_path, "a")
        self._err = open(self._err_path, "a")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._out,
                                        stderr=self._err, text=True)
        self.pid = self.process.pid

    def stdout(self):
        return self._out_path.read_text()

    def stderr(self):
        return self._err_path.read_text()

    def terminate(self, timeout=10):
        """SIGTERM, then wait up to *timeout* seconds (then kill and fail); the return code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError(f"the process did not stop within {timeout} s:\n{self.stderr()}") from None

    def kill(self):
        """SIGKILL and wait: nothing runs in the process any more, nothing is cleaned up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=5)

    def close(self):
        if self.process.poll() is None:
            self.kill()
        self._out.close()
        self._err.close()

