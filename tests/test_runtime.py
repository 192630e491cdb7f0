"""svp.runtime: libgomp's spin count is set before torch loads libgomp and glibc malloc keeps freed
buffers, never over the user's own settings."""
import os
import subprocess
import sys

import pytest

ENV = "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')"
CODE = f"import svp, os, torch; print({ENV}, svp.runtime.status()['applied_before_torch'])"

# How the child gets svp's settings: `import svp` (what users do), or svp/runtime.py loaded
# on its own and configured (no torch import: ~3 s less per process).
IMPORT_SVP = "import svp\nstatus = svp.runtime.status()\n"
RUNTIME_ONLY = """import importlib.util, os
loc = importlib.util.find_spec("svp").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("svp_runtime", os.path.join(loc, "runtime.py"))
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
status = rt.configure()
"""
CODE_RT = RUNTIME_ONLY + f"print({ENV}, status['applied_before_torch'])"


def _run(code, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SVP_NO_RUNTIME_DEFAULTS", "GLIBC_TUNABLES",
                         "SVP_CPU_DEDICATED", "SVP_SET_GOMP_SPINCOUNT")
            and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow  # starts processes
def test_short_spin_when_svp_comes_first():
    """svp's default: libgomp spins 1,000 rounds, then sleeps (not PASSIVE, which wakes a sleeping
    thread for every parallel region; not libgomp's default 300,000 rounds)."""
    from svp.runtime import SPINCOUNT
    assert SPINCOUNT == "1000"
    assert _run(CODE) == ["None", SPINCOUNT, "True"]


@pytest.mark.slow  # starts processes
def test_user_choice_and_opt_out_are_kept():
    assert _run(CODE_RT, OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "None", "True"]
    assert _run(CODE_RT, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "None", "True"]
    assert _run(CODE_RT, GOMP_SPINCOUNT="20000") == ["None", "20000", "True"]
    # a value svp put in a parent's environment (marked) is svp's, not the user's: a child in
    # dedicated mode sets its own over it (it kept the inherited 1000: review)
    from svp.runtime import SPINCOUNT, SPINCOUNT_DEDICATED
    assert _run(CODE_RT, GOMP_SPINCOUNT=SPINCOUNT, SVP_SET_GOMP_SPINCOUNT=SPINCOUNT,
                SVP_CPU_DEDICATED="1") == ["None", SPINCOUNT_DEDICATED, "True"]
    assert _run(CODE_RT, GOMP_SPINCOUNT="20000", SVP_SET_GOMP_SPINCOUNT=SPINCOUNT,
                SVP_CPU_DEDICATED="1") == ["None", "20000", "True"]   # changed since: the user's
    assert _run(CODE_RT, SVP_NO_RUNTIME_DEFAULTS="1")[:2] == ["None", "None"]
    # torch first: too late for libgomp, so svp leaves the environment alone and says so
    assert _run(f"import torch, os, svp; print({ENV}, svp.runtime.status()['applied_before_torch'])") == \
        ["None", "None", "False"]


@pytest.mark.slow  # starts processes
def test_cpu_kernels_warn_once_when_torch_came_first():
    """torch imported before svp, no spin setting of the user's: libgomp keeps its long spin, and
    svp's CPU kernels say so once, when first imported (not at `import svp`), where torch runs on
    its bundled libgomp."""
    code = ("import warnings, torch, svp\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    from svp.ops import scan_cpu, conv_cpu, norm_cpu, prompt_cpu\n"
            "print(bool(scan_cpu._torch_libgomp()), "
            "[issubclass(x.category, svp.runtime.LongSpinWarning) for x in w].count(True))")
    has_gomp, n = _run(code)
    assert n == ("1" if has_gomp == "True" else "0")


def test_long_spin_only_where_torch_came_first_and_the_user_chose_nothing(monkeypatch):
    from svp import runtime
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(runtime._state, "dedicated", False)
    monkeypatch.setitem(runtime._state, "applied_before_torch", False)
    assert "import svp before torch" in runtime.long_spin().lower()
    monkeypatch.setitem(runtime._state, "applied_before_torch", True)   # svp first
    assert runtime.long_spin() is None
    monkeypatch.setitem(runtime._state, "applied_before_torch", None)   # SVP_NO_RUNTIME_DEFAULTS
    assert runtime.long_spin() is None
    monkeypatch.setitem(runtime._state, "applied_before_torch", False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")   # the user's own choice
    assert runtime.long_spin() is None
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert runtime.long_spin() is None
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setitem(runtime._state, "dedicated", True)   # the kernels share torch's spinning threads
    assert runtime.long_spin() is None


@pytest.mark.slow  # starts processes
def test_a_dedicated_machine_spins_longer_unless_the_user_chose():
    """SVP_CPU_DEDICATED: libgomp spins 100,000 rounds (svp's kernels then share torch's OpenMP
    threads: tests/test_scan_backends.py); the user's own settings still win, and 0 means no."""
    from svp.runtime import SPINCOUNT, SPINCOUNT_DEDICATED, dedicated
    assert SPINCOUNT_DEDICATED == "100000"
    assert _run(CODE_RT, SVP_CPU_DEDICATED="1") == ["None", SPINCOUNT_DEDICATED, "True"]
    assert _run(CODE_RT, SVP_CPU_DEDICATED="0") == ["None", SPINCOUNT, "True"]
    assert _run(CODE_RT, SVP_CPU_DEDICATED="1", GOMP_SPINCOUNT="5000") == ["None", "5000", "True"]
    assert _run(CODE_RT, SVP_CPU_DEDICATED="1", OMP_WAIT_POLICY="PASSIVE") == ["PASSIVE", "None", "True"]
    assert [dedicated({"SVP_CPU_DEDICATED": v}) for v in ("1", "yes", "0", "off", "", " False ")] == \
        [True, True, False, False, False, False]


# malloc and free through ctypes, and the process's page faults so far
LIBC = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
"""
FAULTS = LIBC + """
counts = []
for i in range(6):
    f0 = faults()
    size = (30 - 2 * i) << 20
    bufs = [libc.malloc(size) for _ in range(3)]     # three (30 - 2i) MiB blocks, touched
    for p in bufs:
        ctypes.memset(p, 1, size)
    for p in bufs:
        libc.free(p)
    counts.append(faults() - f0)
print(str(status['malloc']).split()[0], sum(counts[2:]))
"""


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_buffers_are_reused_without_page_faults():
    """Three buffers of 30, 28, ..., 20 MiB allocated, touched and freed, round after round: with
    svp's malloc settings the later rounds reuse the heap (almost no page faults); with glibc's
    defaults (opt-out) each round's memory goes back to the kernel when freed (more than twice
    the adaptive mmap threshold at the top of the heap) and the next round faults it in again."""
    mine = _run(IMPORT_SVP + FAULTS)
    theirs = _run(RUNTIME_ONLY + FAULTS, SVP_NO_RUNTIME_DEFAULTS="1")
    assert mine[0] == "mmap" and int(mine[1]) < 2000, mine
    assert theirs[0] == "None" and int(theirs[1]) > 20000, theirs
    assert _run(RUNTIME_ONLY + FAULTS, MALLOC_TRIM_THRESHOLD_="1000000")[0] == "left"
    # set from inside the process, after glibc read its settings: glibc's defaults are still in
    # place, so svp's thresholds apply (and keep the heap); removed from inside, the user's stays
    late = "import os\nos.environ['MALLOC_TRIM_THRESHOLD_'] = '1000000'\n"
    late_set = _run(late + RUNTIME_ONLY + FAULTS)
    assert late_set[0] == "mmap" and int(late_set[-1]) < 2000, late_set
    gone = "import os\ndel os.environ['MALLOC_TRIM_THRESHOLD_']\n"
    assert _run(gone + RUNTIME_ONLY + FAULTS, MALLOC_TRIM_THRESHOLD_="1000000")[0] == "left"
    user = "glibc.malloc.hugetlb=0:glibc.malloc.top_pad=1000000"
    assert _run(RUNTIME_ONLY + FAULTS, GLIBC_TUNABLES=user)[0] == "left"
    # a tunable that is not one of the thresholds (huge pages, below) keeps svp's
    kept = _run(RUNTIME_ONLY + FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert kept[0] == "mmap" and int(kept[-1]) < 2000, kept


HELD = LIBC + """
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def rounds(n):
    counts = []
    for i in range(n):
        f0 = faults()
        size = (64 - 2 * i) << 20    # above the largest mmap threshold glibc takes (32 MiB)
        bufs = [libc.malloc(size) for _ in range(3)]
        for p in bufs:
            ctypes.memset(p, 1, size)
        for p in bufs:
            libc.free(p)
        counts.append(faults() - f0)
    return sum(counts[1:])           # the rounds after the first
outside = rounds(4)
with rt.held_heap():
    with rt.held_heap():
        inner = rounds(4)
    still = rt.heap_held()           # an inner exit keeps the outer hold
    nested = rounds(3)
    held = rss_mib()
after = rss_mib()
with rt.held_heap(active=False):
    inactive = rounds(3)
print(outside, inner, nested, int(still), int(rt.heap_held()), held - after, inactive)
"""


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_held_heap_reuses_buffers_above_the_mmap_threshold_and_gives_them_back_after():
    """Buffers of 58-64 MiB, above the largest mmap threshold glibc accepts: with svp's thresholds
    alone each is its own mapping, returned when freed and faulted in again (~46,000 pages a
    round); within held_heap (nested, as training holds it around its evaluations) the rounds
    after the first reuse the heap; the outermost exit gives the free heap back to the kernel.
    Where svp's malloc settings do not apply, held_heap holds nothing."""
    out = [int(v) for v in _run(RUNTIME_ONLY + HELD)]
    outside, inner, nested, still, after, returned, inactive = out
    assert outside > 20000 and inactive > 20000, out
    assert inner < 2000 and nested < 1000 and still == 1 and after == 0, out
    assert returned >= 150, out                       # of the 3 x 64 MiB the heap kept
    for env in ({"SVP_NO_RUNTIME_DEFAULTS": "1"}, {"MALLOC_MMAP_MAX_": "65536"}):
        theirs = [int(v) for v in _run(RUNTIME_ONLY + HELD, **env)]
        assert theirs[1] > 20000 and theirs[3] == 0, (env, theirs)


HUGE = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
bufs = [libc.malloc(30 << 20) for _ in range(3)]
for p in bufs:
    ctypes.memset(p, 1, 30 << 20)
huge = [line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(int(huge[0]) >> 10, "hugetlb=1" in str(status["malloc"]), "asks for them" in rt.huge_pages())
"""


def _thp_glibc():
    """Why the heap cannot get huge pages here, or None: glibc reads glibc.malloc.hugetlb from 2.35,
    and the kernel's transparent huge pages must not be 'never'."""
    from svp.runtime import _glibc_version
    version = _glibc_version()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return "no transparent huge pages"
    if version is None or version < (2, 35):
        return f"glibc {version} has no glibc.malloc.hugetlb"
    return "transparent huge pages are off ([never])" if "[never]" in mode else None


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_glibc() is not None,
                    reason=str(_thp_glibc()) if sys.platform.startswith("linux") else "glibc malloc settings")
def test_glibc_hugetlb_puts_the_heap_on_huge_pages_with_svps_thresholds():
    """The opt-in the module docstring documents: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 with svp's
    thresholds keeps the large buffers on a heap of 2 MiB pages (status() and huge_pages(), which
    `svp doctor` prints, say so); set later, from inside the process, glibc never sees it and
    neither claims it."""
    on = _run(RUNTIME_ONLY + HUGE, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert int(on[0]) >= 60 and on[1:] == ["True", "True"], on        # MiB of the 90 MiB touched
    # with another tunable before it (glibc 2.36 splits the variable's memory at the colon)
    after = _run(RUNTIME_ONLY + HUGE, GLIBC_TUNABLES="glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
    assert int(after[0]) >= 60 and after[1:] == ["True", "True"], after
    off = _run(RUNTIME_ONLY + HUGE)
    assert off[1:] == ["False", "False"], off
    late = _run("import os\nos.environ['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'\n" + RUNTIME_ONLY + HUGE)
    assert late[1:] == ["False", "False"], late


GC_CHECK = RUNTIME_ONLY + """import gc, weakref
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a
old = cycle()                  # the user's garbage from before the imports
gone = weakref.ref(old)
del old
enabled, frozen = gc.isenabled(), gc.get_freeze_count()
with rt.imports_outside_gc():
    during = gc.isenabled()
    made = [cycle() for _ in range(20000)]          # what an import makes and keeps
gen2 = {id(o) for o in gc.get_objects(2)}
in_oldest = sum(id(o) in gen2 for o in made)
gc.collect()
print(during, gc.isenabled() == enabled, gc.get_freeze_count() == frozen, in_oldest == len(made),
      gone() is None, str(rt.status()['gc']).split()[0])
"""


@pytest.mark.slow  # starts processes
def test_imports_run_with_the_collector_paused_and_land_in_the_oldest_generation():
    """What svp imports skips the young generations' collections; nothing is left frozen, and
    garbage made before the imports (the user's) is still collected."""
    assert _run(GC_CHECK) == ["False", "True", "True", "True", "True", "imports"]
    # the collector turned off by the user stays off, and nothing is moved
    off = _run("import gc; gc.disable()\n" + GC_CHECK)
    assert off[:3] == ["False", "True", "True"] and off[3] == "False" and off[5] == "left"
    # objects the user froze stay frozen (an unfreeze would hand them back to the collector)
    frozen = _run("import gc; keep = [[i] for i in range(1000)]; gc.freeze()\n" + GC_CHECK)
    assert frozen[:3] == ["False", "True", "True"] and frozen[5] == "collection"
    assert _run(GC_CHECK, SVP_NO_RUNTIME_DEFAULTS="1")[0] == "True"   # opted out: not even paused


RUN_CHECK = """import atexit, gc, sys
atexit.register(lambda: print("frozen", gc.get_freeze_count(), file=sys.stderr))
from svp.cli import main
main(["data", "list"])
print("after main", gc.get_freeze_count(), file=sys.stderr)
sys.argv = ["svp", "data", "list"]
"""
RUN_ENTRY = "from svp.cli import run\nrun()\n"
RUN_MODULE = "import runpy\nrunpy.run_module('svp', run_name='__main__')\n"


def _freeze_counts(code, **env):
    base = {k: v for k, v in os.environ.items() if k != "SVP_NO_RUNTIME_DEFAULTS"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "imagefolder" in out.stdout, out.stderr
    return [int(line.split()[-1]) for line in out.stderr.splitlines() if line.startswith(("after main", "frozen"))]


@pytest.mark.slow  # starts processes
def test_the_svp_command_freezes_its_imports_and_main_does_not():
    """`svp` (the console script, svp.cli:run, and python -m svp) freezes what it imported before
    running its command; main(), which tests and scripts call in their own process, leaves the
    collector alone, and so does the command with SVP_NO_RUNTIME_DEFAULTS set."""
    from importlib.metadata import entry_points
    eps = entry_points()
    scripts = eps.select(group="console_scripts") if hasattr(eps, "select") else eps["console_scripts"]
    assert {ep.name: ep.value for ep in scripts}.get("svp") == "svp.cli:run"
    after_main, at_exit = _freeze_counts(RUN_CHECK + RUN_ENTRY)
    assert after_main == 0 and at_exit > 100_000      # torch, timm, svp
    assert _freeze_counts(RUN_CHECK + RUN_MODULE)[1] > 100_000
    assert _freeze_counts(RUN_CHECK + RUN_ENTRY, SVP_NO_RUNTIME_DEFAULTS="1") == [0, 0]


LEAK_REPORT = """import atexit, logging, os, sys, types
# nanobind writes its report after Python's shutdown: here an atexit handler registered before
# svp's, so run after it
atexit.register(lambda: os.write(2, b"nanobind: leaked 4 instances!\\n"))
import svp
from svp import runtime as rt
def libtriton(module):   # nanobind: a bound class's metaclass has the metaclass nanobind.nb_meta
    meta = type("nb_meta", (type,), {"__module__": module})
    bound = meta("nb_type_0", (type,), {})
    return types.SimpleNamespace(ir=types.SimpleNamespace(context=bound("context", (), {})))
sys.modules["triton._C.libtriton"] = libtriton("nanobind")
assert not rt.hide_frozen_leak_report()          # nothing frozen: nothing reported
rt._state["gc"] = rt.FROZEN                      # (what svp.cli.run's freeze_imports sets)
sys.modules["triton._C.libtriton"] = libtriton("builtins")
assert not rt.hide_frozen_leak_report()          # Triton < 3.9: no nanobind, no report
sys.modules["triton._C.libtriton"] = libtriton("nanobind")
log = logging.getLogger("at_exit")
log.addHandler(logging.StreamHandler(sys.stderr))
atexit.register(lambda: log.warning("logged at exit"))
atexit.register(lambda: print("printed at exit", file=sys.stderr))
sys.stderr.write("the command's own line\\n")
raise SystemExit(2)                               # as argparse leaves after --help or a usage error
"""


def test_a_frozen_commands_exit_hides_nanobinds_leak_report_and_nothing_printed_before_it():
    """Triton 3.9 (torch 2.15's) built its library with nanobind, which reports every object still
    alive when the process ends as a leak: the imports the svp command froze, 26 lines on stderr
    after every command. svp's atexit handler, registered at `import svp` before the others and so
    run after them, sends C's stderr to the null device; what the command, the other atexit
    handlers and a logging handler made before print still reaches stderr, however the process
    ends. (A stand-in library: this environment's Triton is not a nanobind one.)"""
    out = subprocess.run([sys.executable, "-c", LEAK_REPORT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == ["the command's own line", "printed at exit", "logged at exit"], out.stderr


def test_on_off_switches_read_0_false_no_off_as_off():
    """SVP_NO_RUNTIME_DEFAULTS=0 (or false) turned svp's defaults off: any value counted."""
    from svp import runtime
    for v, on in (("", False), ("0", False), ("false", False), (" Off ", False), ("no", False),
                  ("1", True), ("yes", True), ("true", True)):
        assert runtime.no_defaults({"SVP_NO_RUNTIME_DEFAULTS": v}) is on, v
        assert runtime.dedicated({"SVP_CPU_DEDICATED": v}) is on, v
    assert runtime.no_defaults({}) is False


def test_the_command_is_told_from_other_programs_importing_svp(monkeypatch):
    from svp.runtime import started_as_command
    assert started_as_command(["/venv/bin/svp", "train"], [])
    assert started_as_command([r"C:\venv\Scripts\svp", "train"], [])
    assert started_as_command(["-m", "data"], ["python", "-m", "svp", "data"])
    assert started_as_command(["-m", "data"], ["python", "-m", "svp.cli", "data"])
    assert not started_as_command(["-m", "x"], ["python", "-m", "svp.tools", "x"])
    assert not started_as_command(["-m", "x"], ["python", "-m", "mypkg", "x"])   # mypkg imports svp
    assert not started_as_command(["train.py"], ["python", "train.py"])
    assert not started_as_command(["-c"], ["python", "-c", "import svp"])
    assert not started_as_command([], [])
    # Python 3.9 has no sys.orig_argv: any -m counted, so `python -m mypkg` importing svp kept svp's
    # Ctrl-C guard (exit 130, the program's finally blocks skipped: review); /proc tells them apart
    from svp import runtime
    real = runtime._proc_cmdline
    monkeypatch.delattr(sys, "orig_argv", raising=False)
    for cmdline, command in ((["python3.9", "-m", "mypkg.train"], False), (["python3.9", "-m", "svp", "train"], True),
                             ([], False)):   # no /proc: not the command (the guard is for it alone)
        monkeypatch.setattr(runtime, "_proc_cmdline", lambda c=cmdline: c)
        assert started_as_command(["-m"]) is command, cmdline
    if os.path.exists("/proc/self/cmdline"):
        assert real()[:1] == [sys.executable] or os.path.basename(real()[0]).startswith("python")


def test_the_import_guard_leaves_an_ignored_or_own_sigint_alone(monkeypatch):
    """A process started with SIGINT ignored (CI's background jobs, nohup) or with a handler of its
    own keeps it: the guard must not put its own there. Installed, it is taken off before the
    command runs."""
    import signal

    from svp import runtime
    monkeypatch.setattr(runtime, "started_as_command", lambda *a: True)
    old = signal.getsignal(signal.SIGINT)
    try:
        for kept in (signal.SIG_IGN, lambda *a: None):
            signal.signal(signal.SIGINT, kept)
            runtime.guard_command_imports()
            assert signal.getsignal(signal.SIGINT) is kept
            runtime.end_command_imports()
            assert signal.getsignal(signal.SIGINT) is kept
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runtime.guard_command_imports()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        runtime.end_command_imports()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.slow  # starts processes
def test_a_ctrl_c_while_the_command_imports_is_one_line_and_exit_130():
    """A Ctrl-C in the seconds `import svp` takes (torch, timm) printed Python's traceback through
    the imports (15-70 lines); the command now says it was interrupted, as it does once running.
    A program importing svp still gets its KeyboardInterrupt."""
    import signal
    import time

    def interrupted(code):
        args = ["-m", "svp"] if code is None else ["-c", code]
        # (SIGINT as a terminal leaves it: a shell's background job, as CI runs the suites, ignores it)
        p = subprocess.Popen([sys.executable, *args, "data", "list"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(0.4)   # in `import svp` (~1-3 s: torch, timm)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=300)
        return p.returncode, err
    # the console script (svp.cli:run; its argv[0] ends in "svp"), and python -m svp
    rc, err = interrupted("import sys; sys.argv[0] = '/venv/bin/svp'; from svp.cli import run; run()")
    assert rc == 130 and err == "svp: interrupted\n", (rc, err)
    rc, err = interrupted(None)
    assert rc == 130 and err == "svp: interrupted\n", (rc, err)
    # a program importing svp keeps Python's handler (its KeyboardInterrupt) throughout
    code = "import signal, svp; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_svp_version_is_answered_before_torch_is_imported():
    """`svp --version` built every command's parser, importing torch and timm first: 2.5-3.6 s for
    one line (retest 82). Alone, it is answered as `import svp` starts; as the first of several
    arguments it is argparse's, as before."""
    import svp
    for args in (["-m", "svp", "--version"], ["-c", "import sys; sys.argv = ['svp', '--version']; import svp"]):
        out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and out.stdout == f"svp {svp.__version__}\n", out
        imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
        assert "svp" in imported and "torch" not in imported and "timm" not in imported, sorted(imported)
    # stdout closed: nothing printed, exit 0, as argparse's action (an AttributeError: retest 90)
    out = subprocess.run(["sh", "-c", f"'{sys.executable}' -m svp --version >&-"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == "", out
    # elsewhere (a program of one's own with that command line) import svp runs as always
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['mytool', '--version']; import svp, torch; "
                          "print('imported')"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "imported\n", out
