"""Code that runs inside a pre-started ("warm") interpreter until it gets a program.

The server starts ``python -u -c <this source> FD`` ahead of time, as the
program user, with the run's pipes already attached. The interpreter blocks on
FD until the server writes the program's details, then makes itself look like
``python -u SCRIPT ARGS...`` started fresh in that directory with that
environment, and runs the script as ``__main__``. Everything is inside one
function so the ``__main__`` namespace the script sees holds nothing of ours,
and only modules the interpreter loaded at start-up are used before the script
runs. The message is NUL-separated: cwd, script, argument count, arguments,
then ``KEY=VALUE`` environment entries.

While it waits, the interpreter is not dumpable (PR_SET_DUMPABLE 0): no other
process of the account may ptrace it or read its memory and so take over the
next learner's run. It gives up if something attached before that took
effect, and becomes dumpable again, as a fresh interpreter is, once it has
its program; ctypes, loaded only for this, is then unloaded again.
"""


def _further_link_warm_start() -> None:
    import os
    import sys

    channel = int(sys.argv[1])
    loaded = set(sys.modules)
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE: 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("TracerPid:") and line.split()[1] != "0":
                os._exit(1)
    chunks = []
    while True:
        chunk = os.read(channel, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(channel)
    if not chunks:  # the server retired this interpreter unused
        os._exit(0)
    prctl(4, 1, 0, 0, 0)  # dumpable again, as a fresh interpreter is
    del prctl, ctypes
    for name in set(sys.modules) - loaded:
        del sys.modules[name]
    fields = [os.fsdecode(field) for field in b"".join(chunks).split(b"\0")]
    cwd, script, count = fields[0], fields[1], int(fields[2])
    arguments = fields[3 : 3 + count]
    try:
        os.chdir(cwd)
    except OSError as error:  # as a fresh interpreter that cannot reach its script says it
        message = f"can't open file {script!r}: [Errno {error.errno}] {error.strerror}"
        print(f"{sys.executable}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.clear()
    for entry in fields[3 + count :]:
        key, _, value = entry.partition("=")
        os.environ[key] = value
    # The import path a fresh `python SCRIPT` would have: the script's directory,
    # then PYTHONPATH, then the interpreter's own entries (ours began with '').
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.realpath(script)), *python_path, *sys.path[1:]]
    sys.argv[:] = [script, *arguments]

    main = sys.modules["__main__"]
    namespace = main.__dict__
    builtins = namespace["__builtins__"]
    loader_type = sys.modules["_frozen_importlib_external"].SourceFileLoader
    namespace.clear()
    namespace.update(
        __name__="__main__",
        __doc__=None,
        __package__=None,
        __spec__=None,
        __annotations__={},
        __builtins__=builtins,
        __file__=script,
        __cached__=None,
        __loader__=loader_type("__main__", script),
    )
    try:
        with open(script, "rb") as source_file:
            source = source_file.read()
        code = compile(source, script, "exec", dont_inherit=True)
    except SyntaxError as error:
        sys.excepthook(type(error), error.with_traceback(None), None)
        raise SystemExit(1) from None
    except OSError as error:
        message = f"can't open file {script!r}: [Errno {error.errno}] {error.strerror}"
        print(f"{sys.executable}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as error:
        # Report it as the interpreter would: traceback from the script's frame on.
        traceback = error.__traceback__.tb_next if error.__traceback__ else None
        sys.excepthook(type(error), error.with_traceback(traceback), traceback)
        if isinstance(error, KeyboardInterrupt):
            # A fresh interpreter ends itself by SIGINT here, after clean-up.
            import atexit
            import signal

            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                try:  # noqa: SIM105 - contextlib is not loaded in a fresh interpreter
                    stream.flush()
                except (OSError, ValueError):
                    pass
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(1) from None


_further_link_warm_start()
