"""Code that runs inside a pre-started ("warm") interpreter until it gets a program.

The server starts ``python -u -c <this source> CHANNEL STATUS PATH [MODULE...]``
ahead of time, as the program user, with the run's pipes already attached.
The interpreter imports the preload MODULEs, searching PATH (``os.pathsep``
separated) first, and reports each on the STATUS pipe (``-1`` for none); then
it blocks on CHANNEL until the server writes the
program's details. It then makes itself look like ``python -u SCRIPT ARGS...``
started fresh in that directory with that environment (argv, ``sys.orig_argv``,
``/proc/self/cmdline`` and ``/proc/self/environ`` included), and hands the file
to the interpreter's own C entry point for ``python FILE``
(``PyRun_AnyFileExFlags``): the same reading, encoding detection, compiling and
error printing as a fresh interpreter, so every odd source (NUL bytes, BOMs,
UTF-16, deep nesting, ...) fails or succeeds exactly as it would there.

Everything is inside one function so the ``__main__`` namespace the script sees
holds nothing of ours. The channel message is NUL-separated: cwd, script,
argument count, arguments, then ``KEY=VALUE`` environment entries. Status lines
are ``begin NAME``, ``ok NAME``, ``missing NAME``, ``fail NAME: WHY`` and finally
``ready``.

While it waits, the interpreter is not dumpable (PR_SET_DUMPABLE 0): no other
process of the account may ptrace it or read its memory and so take over the
next learner's run. It gives up if something attached before that took
effect, and becomes dumpable again, as a fresh interpreter is, once it has
its program.

A preloaded interpreter ends a program that finished (normally or with a
traceback) the way the interpreter's own shutdown does as far as a program
can see: it runs the preloaded libraries' ``atexit`` handlers, clears
``__main__`` (so ``__del__`` methods of its objects run) and flushes the
standard streams; then it exits at once instead of tearing down the
preloaded libraries one object at a time (numpy and Pillow: 25-60 ms here,
far more on a Raspberry Pi), which nothing of the program could see but
the wait. A program that registered ``atexit`` handlers of its own, or
leaves a non-daemon thread running, gets the interpreter's own shutdown.
"""


def _further_link_warm_start() -> None:
    import os
    import sys

    channel = int(sys.argv[1])
    status = int(sys.argv[2])
    preload_path = [entry for entry in sys.argv[3].split(os.pathsep) if entry]
    preload = sys.argv[4:]
    base_path = sys.path[1:]  # without the '' that -c put first
    exit_now = os._exit  # before a program can replace it
    modules_before = set(sys.modules)
    finders_before = set(sys.path_importer_cache)
    import ctypes

    # Finders the import left behind ('' for the -c working directory, ctypes'
    # package) are not a fresh interpreter's; nor are its modules (hidden below).
    for entry in set(sys.path_importer_cache) - finders_before:
        del sys.path_importer_cache[entry]
    api = ctypes.pythonapi
    run_file = api.PyRun_AnyFileExFlags
    run_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    run_file.restype = ctypes.c_int
    get_importer = api.PyImport_GetImporter
    get_importer.argtypes = [ctypes.py_object]
    get_importer.restype = ctypes.py_object
    libc = ctypes.CDLL(None, use_errno=True)
    fopen = libc.fopen
    fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    fopen.restype = ctypes.c_void_p
    fclose = libc.fclose
    fclose.argtypes = [ctypes.c_void_p]
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.sbrk.restype = ctypes.c_void_p
    libc.fileno.argtypes = [ctypes.c_void_p]
    libc.malloc.restype = ctypes.c_void_p
    libc.prctl.argtypes = [
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    # Not dumpable while waiting: no process of the account may ptrace this
    # interpreter or read its memory, and so take over the next learner's run.
    libc.prctl(4, 0, None, 0, 0)  # PR_SET_DUMPABLE
    with open("/proc/self/status") as proc_status:
        for line in proc_status:
            if line.startswith("TracerPid:") and line.split()[1] != "0":
                os._exit(1)  # attached before that took effect

    # (Annotations in quotes: this also runs on Python 3.9, which cannot evaluate `X | None`.)
    def recursion_counter(limit: int) -> "tuple[ctypes.c_int, int] | None":
        """The thread state's recursion counter and the value a fresh interpreter has
        when it starts a script, when the counter can be found for sure.

        CPython 3.11 to 3.13 count the depth left, as an int right before the
        limit a few words into ``PyThreadState``: the pair is searched for and
        checked (limit equal, a handful of frames in use) rather than assumed.
        3.9 and 3.10 count the depth used, right after the frame pointer. The
        call into ``run_file`` itself counts as one level before 3.12.
        """
        get_state = api.PyThreadState_Get
        get_state.restype = ctypes.c_void_p
        state = get_state()
        word = ctypes.sizeof(ctypes.c_void_p)
        if sys.version_info < (3, 11):
            counter = ctypes.c_int.from_address(state + 4 * word)
            return (counter, -1) if 0 < counter.value < 20 else None
        fresh = limit + 1 if sys.version_info < (3, 12) else limit
        for offset in range(3 * word, 3 * word + 48, 4):
            counter = ctypes.c_int.from_address(state + offset)
            if (
                ctypes.c_int.from_address(state + offset + 4).value == limit
                and 0 < limit - counter.value < 20
            ):
                return counter, fresh
        return None

    def hidden_import(name: str):  # type: ignore[no-untyped-def]  # (typing is not loaded)
        """A built-in module, kept out of sys.modules if a fresh interpreter has not loaded it."""
        loaded = name in sys.modules
        module = __import__(name)
        if not loaded:
            del sys.modules[name]
        return module

    def say(line: str) -> None:
        if status >= 0:
            os.write(status, (line + "\n").encode("utf-8", "replace"))

    def quiet_import(name: str) -> None:
        # Whatever a module prints while preloaded would reach the program's
        # output: it is caught here and makes the module unfit for preloading.
        sink_read, sink_write = os.pipe()
        saved = (os.dup(1), os.dup(2))
        os.dup2(sink_write, 1)
        os.dup2(sink_write, 2)
        os.close(sink_write)
        try:
            __import__(name)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        os.set_blocking(sink_read, False)
        try:
            noise = os.read(sink_read, 200)
        except BlockingIOError:
            noise = b""
        os.close(sink_read)
        if noise:
            raise RuntimeError(f"it writes output when imported: {noise[:80]!r}")

    if preload:
        sys.path[:] = preload_path + base_path
        for name in preload:
            say(f"begin {name}")
            try:
                quiet_import(name)
            except ModuleNotFoundError as error:
                missing = error.name == name.partition(".")[0]
                say(f"missing {name}" if missing else f"fail {name}: {error!r}")
                os._exit(0)
            except BaseException as error:
                say(f"fail {name}: {type(error).__name__}: {error}")
                os._exit(0)
            say(f"ok {name}")
    say("ready")
    if status >= 0:
        os.close(status)

    chunks = []
    while True:
        chunk = os.read(channel, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(channel)
    if not chunks:  # the server retired this interpreter unused
        os._exit(0)
    libc.prctl(4, 1, None, 0, 0)  # dumpable again, as a fresh interpreter is
    fields = [os.fsdecode(field) for field in b"".join(chunks).split(b"\0")]
    cwd, script, count = fields[0], fields[1], int(fields[2])
    arguments = fields[3 : 3 + count]
    environment = fields[3 + count :]
    command_line = [sys.orig_argv[0] if hasattr(sys, "orig_argv") else sys.executable, "-u"]
    command_line += [script, *arguments]
    try:
        os.chdir(cwd)
    except OSError as error:  # as a fresh interpreter that cannot reach its script says it
        message = f"can't open file {script!r}: [Errno {error.errno}] {error.strerror}"
        print(f"{sys.executable}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.clear()
    for entry in environment:
        key, _, value = entry.partition("=")
        os.environ[key] = value

    # /proc/self/cmdline and environ (so `ps`) show what a fresh start shows:
    # the kernel lets a process point them at new memory of its own.
    block = b"".join(os.fsencode(part) + b"\0" for part in command_line + environment)
    area = libc.malloc(len(block) or 1)  # never freed: the kernel reads it until exit
    ctypes.memmove(area, block, len(block))
    arguments_end = area + sum(len(os.fsencode(part)) + 1 for part in command_line)
    with open("/proc/self/stat", "rb") as stat_file:
        stat = stat_file.read()
    numbers = [int(value) for value in stat[stat.rindex(b")") + 2 :].split()[1:]]

    def field(number: int) -> int:  # proc(5) numbering
        return numbers[number - 4]

    class MemoryMap(ctypes.Structure):
        _fields_ = [
            *((name, ctypes.c_uint64) for name in (
                "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv",
            )),
            ("auxv_size", ctypes.c_uint32),
            ("exe_fd", ctypes.c_int32),
        ]  # fmt: skip

    new_map = MemoryMap(
        field(26), field(27), field(45), field(46), field(47), libc.sbrk(0), field(28),
        area, arguments_end, arguments_end, area + len(block), 0, 0, -1,
    )  # fmt: skip
    pr_set_mm, pr_set_mm_map = 35, 14
    if libc.prctl(pr_set_mm, pr_set_mm_map, ctypes.addressof(new_map), ctypes.sizeof(new_map), 0):
        # Kernels without checkpoint/restore: overwrite our own argv area in place.
        old = field(49) - field(48)
        wanted = block[: arguments_end - area]
        if len(wanted) <= old:
            ctypes.memset(field(48), 0, old)
            ctypes.memmove(field(48), wanted, len(wanted))
    if hasattr(sys, "orig_argv"):
        sys.orig_argv[:] = command_line
    sys.argv[:] = [script, *arguments]
    if not preload:  # a preloaded module may hold on to ctypes; then it stays
        for name in set(sys.modules) - modules_before:
            del sys.modules[name]

    # What `python SCRIPT` does before running the file (Modules/main.c): a
    # directory or zip file holding __main__.py is run as a package instead.
    importer = get_importer(script)
    # The import path a fresh `python SCRIPT` would have: the script's directory,
    # then PYTHONPATH, then the interpreter's own entries.
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    first = script if importer is not None else os.path.dirname(os.path.realpath(script))
    sys.path[:] = [first, *python_path, *base_path]
    for name in preload:  # a module of the program's own shadows a preloaded one
        top = name.partition(".")[0]
        for entry in sys.path[: 1 + len(python_path)]:
            try:
                shadowing = any(n == top or n.startswith(top + ".") for n in os.listdir(entry))
            except OSError:
                shadowing = False
            if shadowing:
                for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                    del sys.modules[loaded]
                break

    namespace = sys.modules["__main__"].__dict__
    builtins = namespace["__builtins__"]
    loader = namespace["__loader__"]
    if preload:
        collector = hidden_import("gc")
        # The preloaded libraries' objects are never examined by the cyclic
        # garbage collector again: at exit it looks at the program's only.
        collector.freeze()
        # A __main__ made after that, so the collector can end it at exit.
        sys.modules["__main__"] = type(sys)("__main__")
        namespace = sys.modules["__main__"].__dict__
    namespace.clear()
    namespace.update(
        __name__="__main__",
        __doc__=None,
        __package__=None,
        __loader__=loader,
        __spec__=None,
        __annotations__={},
        __builtins__=builtins,
    )
    del namespace  # only sys.modules holds __main__ now, as in a fresh interpreter
    if importer is not None:
        import runpy

        try:
            runpy._run_module_as_main("__main__", False)  # type: ignore[attr-defined]
        except SystemExit:
            raise
        except BaseException as error:
            # Reported as the interpreter would: the traceback starts in runpy.
            traceback = error.__traceback__.tb_next if error.__traceback__ else None
            error = error.with_traceback(traceback)
            sys.last_type, sys.last_value, sys.last_traceback = type(error), error, traceback
            sys.excepthook(type(error), error, traceback)
            if not isinstance(error, KeyboardInterrupt):
                raise SystemExit(1) from None
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
        return
    program_name = command_line[0]
    source = fopen(os.fsencode(script), b"rb")
    if not source:
        code = ctypes.get_errno()
        message = f"can't open file {script!r}: [Errno {code}] {os.strerror(code)}"
        print(f"{program_name}: {message}", file=sys.stderr)
        raise SystemExit(2)
    os.set_inheritable(libc.fileno(source), False)
    import stat as stat_module

    if stat_module.S_ISDIR(os.fstat(libc.fileno(source)).st_mode):
        fclose(source)
        print(f"{program_name}: {script!r} is a directory, cannot continue", file=sys.stderr)
        raise SystemExit(1)

    def finish_quickly(code: int) -> None:
        """What the interpreter's shutdown does that a program can see, then exit with ``code``.

        Returns (and the interpreter shuts down as usual) when the program
        registered ``atexit`` handlers (the interpreter reports their errors
        without any frame of ours), a non-daemon thread still runs or the output
        cannot be flushed: the interpreter's own way then applies.
        """
        if exit_hooks._ncallbacks() != hooks_before:
            return
        collector = sys.modules.get("gc") or hidden_import("gc")
        threading = sys.modules.get("threading")
        if threading is not None:
            main = threading.main_thread()
            if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
                return
            if hasattr(threading, "_shutdown"):
                threading._shutdown()  # e.g. hooks of concurrent.futures, as at shutdown
        exit_hooks._run_exitfuncs()  # the preloaded libraries' own
        exit_hooks._clear()
        # As the shutdown does: the last error goes, __main__ leaves sys.modules
        # and the collector ends what the program left (__del__ methods and
        # weakref callbacks run, unclosed files are flushed).
        for name in ("last_type", "last_value", "last_traceback"):
            if hasattr(sys, name):
                delattr(sys, name)
        sys.modules.pop("__main__", None)
        collector.collect()
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
        except BaseException:  # the shutdown then reports it as it always does
            return
        exit_now(code)

    # Our frames below the script would count against its recursion limit
    # (and show in "[Previous line repeated N more times]"): the thread's
    # recursion counter is set to a fresh interpreter's for the run.
    if preload:
        exit_hooks = hidden_import("atexit")
        hooks_before = exit_hooks._ncallbacks()
    recursion = recursion_counter(sys.getrecursionlimit())
    saved = 0
    if recursion is not None:
        saved = recursion[0].value
        recursion[0].value = recursion[1]
    result = run_file(source, os.fsencode(script), 1, None)
    if recursion is not None:
        recursion[0].value = saved
    # An error was already reported. A KeyboardInterrupt leaves the interpreter's
    # own flag set, so it ends by SIGINT after clean-up, as a fresh one does.
    failed = result != 0
    if failed and getattr(sys, "last_type", None) is KeyboardInterrupt:
        return
    if preload:
        finish_quickly(1 if failed else 0)
    if failed:
        raise SystemExit(1)


_further_link_warm_start()
