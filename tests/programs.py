"""The project's command line run as a process of its own, forked from a server that imported the project once per
test worker (the standard library's ``forkserver``).

Each run is a real process: its own exit code, its own files, and a SIGKILL ends it with nothing flushed and no
``finally`` run. What it saves is the interpreter start and the imports of torch, Lightning and transformers, ~6 s of
CPU a run on this 2-core machine (~15 runs in the suite). Two-process (DDP, FSDP) runs and the few checks of a fresh
``python -m pbkd_lightning`` interpreter still start one (Lightning relaunches rank 1 from the command line)."""

import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import weakref

from conftest import ROOT

# imported once in the server, before it forks: this module first (it notes the environment the server started with),
# the command line, the test helper that kills it, what a fit imports on first use (its TensorBoard writer, the config
# resolvers), and the benchmark runner
PRELOAD = ["programs", "pbkd_lightning.cli", "pbkd_lightning.build", "kill_helpers", "torch.utils.tensorboard", "omegaconf",
           "benchmarks.run"]
_STARTED_WITH = dict(os.environ)
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _program(module: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked child: ``python -m <module> <argv>`` with this environment, folder and output files."""
    for path, fd in ((out, 1), (err, 2)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    # what the preloaded modules set when imported (pbkd_lightning.cli's offline defaults) stays, as in a fresh run
    set_on_import = {k: v for k, v in os.environ.items() if k not in _STARTED_WITH}
    os.environ.clear()
    os.environ.update({**set_on_import, **env})
    os.chdir(cwd)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _stop(process, folder: str) -> None:
    if process.is_alive():  # a test that failed before waiting: no run outlives it
        process.kill()
        process.join()
    shutil.rmtree(folder, ignore_errors=True)


class Program:
    """A started run; ``wait()`` gives its ``subprocess.CompletedProcess`` (a signal's death as ``-signal``)."""

    def __init__(self, args, module="pbkd_lightning", cwd=ROOT, env=None):
        self.args, folder = [module, *args], tempfile.mkdtemp(prefix="program-")
        self._out, self._err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        self._process = _forkserver().Process(target=_program, args=(module, list(args), str(cwd), dict(os.environ if env is None else env),
                                                                     self._out, self._err))
        self._process.start()
        self.pid = self._process.pid
        self._stop = weakref.finalize(self, _stop, self._process, folder)

    def wait(self, timeout=600) -> subprocess.CompletedProcess:
        self._process.join(timeout)
        try:
            out, err = _read(self._out), _read(self._err)
            if self._process.exitcode is None:
                raise subprocess.TimeoutExpired(self.args, timeout, output=out, stderr=err)
            return subprocess.CompletedProcess(self.args, self._process.exitcode, out, err)
        finally:
            self._stop()


def _read(path: str) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()


def run_program(args, module="pbkd_lightning", cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` run to its end, as ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
    return Program(args, module, cwd, env).wait(timeout)
