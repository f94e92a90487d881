
# ---- The engine server ("zygote"), appended to engine.py by the worker. ----
# Runs as root with the engine's heavy modules imported once (above: `base`; here the preload
# list), never runs users' code, and holds no key: the worker starts it with a clean
# environment and no descriptor but its socket (fd 3). Per session the worker sends a spec
# (JSON) and the session's descriptors; this process makes a PID namespace, forks its init
# (the session's pid for the worker) and answers its pid; the init enters the sandbox the spec
# describes (the policy is the worker's: the same steps its own pre-exec takes for a fresh
# process) and forks the engine: it drops to the session's uid, installs the seccomp filter, and
# serves cells from a copy of `base`. When an init ends, its wait status goes to the worker.
import base64, ctypes, json, resource, selectors, signal, socket, struct

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
SYS_MOUNT_SETATTR, SYS_SECCOMP = {"x86_64": (442, 317), "aarch64": (442, 277)}[os.uname().machine]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def check(r, what):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def cstr(s):
    return None if s is None else s.encode()


def apply_view(steps):
    """The session's view of the file systems: the worker's `session_view`, step by step."""
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    for st in steps:
        op = st["op"]
        if op == "read_only":
            attr = MountAttr(1, 0, 0, 0)
            check(libc.syscall(SYS_MOUNT_SETATTR, -100, b"/", 0x8000, ctypes.byref(attr),
                               ctypes.sizeof(attr)), "read-only view")
        elif op == "writable":
            p = cstr(st["path"])
            check(libc.mount(p, p, None, MS_BIND, None), "binding " + st["path"])
            check(libc.mount(None, p, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None),
                  "making " + st["path"] + " writable")
        elif op == "mount":
            check(libc.mount(cstr(st["source"]), cstr(st["target"]), cstr(st["fstype"]),
                             st["flags"], cstr(st["data"])), "mounting " + st["target"])
        else:
            raise ValueError("unknown step " + op)


def wait_for(pid):
    """Waits for `pid`, reaping others meanwhile: its exit code, or 128 + its signal."""
    while True:
        try:
            got, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return 127
        except InterruptedError:
            continue
        if got == pid:
            return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


ENDING = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGILL, signal.SIGABRT,
          signal.SIGBUS, signal.SIGFPE, signal.SIGKILL, signal.SIGSEGV, signal.SIGPIPE,
          signal.SIGALRM, signal.SIGTERM, signal.SIGXCPU, signal.SIGXFSZ}


def session(spec, fds):
    """In the forked child, PID 1 of the session's new PID namespace: never returns. (The server
    makes the namespace before forking, so a session costs two forks of this large process, not
    three.)"""
    try:
        # The server's signal plumbing is not the session's.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # An init with a handler takes the SIGINT meant for the engine's group (Python gave it
        # one): it ignores it, as a C init would; SIGTERM has none, so only the engine gets it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        ctrl, status, out, err = fds[:4]
        # Into the session's cgroup before anything else.
        for fd in fds[4:]:
            os.write(fd, b"0")
        os.setsid()
        # The session's descriptors at 1-4 (moved clear of those numbers first), nothing else.
        moved = [os.dup(fd) for fd in (out, err, ctrl, status)]
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        for target, fd in zip((1, 2, 3, 4), moved):
            os.dup2(fd, target)
        os.closerange(5, 65536)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS),
              "new namespaces")
        apply_view(spec["view"])
        check(libc.sethostname(b"sagews", 6), "host name")
        os.chdir(spec["home"])
        pid = os.fork()
        if pid:
            # The init: holds nothing open, reaps orphans, ends as the engine did (128 + n for
            # signal n: the server reports that as death by signal n).
            os.closerange(0, 5)
            os._exit(wait_for(pid))
        # The engine (PID 2): limits, the user, the filter, then cells (an interrupt is a
        # KeyboardInterrupt again).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for res, soft, hard in spec["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        for prog in spec["seccomp"]:
            raw = base64.b64decode(prog)
            buf = ctypes.create_string_buffer(raw, len(raw))
            fprog = SockFprog(len(raw) // 8, ctypes.addressof(buf))
            check(libc.syscall(SYS_SECCOMP, 1, 0, ctypes.byref(fprog)), "seccomp filter")
        os.environ.update(spec["env"])
        os.environ["SAGEWS_ZYGOTE"] = "1"
        reseed()
        serve()
    except BaseException:
        # To the session's stderr (the worker shows it as why the engine did not start), from
        # wherever that is now.
        text = traceback.format_exc().encode()
        for fd in (2, fds[3]):
            try:
                os.write(fd, text)
                break
            except OSError:
                continue
    finally:
        os._exit(1)


def wait_status(st):
    """The init's wait status as the worker reads it: its `128 + n` is the engine's death by
    signal n."""
    if os.WIFEXITED(st):
        code = os.WEXITSTATUS(st)
        if code > 128 and code - 128 in ENDING:
            return code - 128
    return st


def reseed():
    """What each session must not share with the others: random states."""
    import random
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if engine == "sage":
        from sage.misc.randstate import set_random_seed
        set_random_seed()


def main():
    # Nothing but stdio and the socket (fd 3), whatever the worker's process held.
    os.closerange(4, 65536)
    os.environ.pop("SAGEWS_ZYGOTE", None)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    for name in filter(None, os.environ.pop("SAGEWS_PRELOAD", "").split(",")):
        try:
            __import__(name)
            if name == "matplotlib":
                sys.modules["matplotlib"].use("Agg")
        except Exception as e:
            print(f"preloading {name}: {e}", file=sys.stderr)
    # What every session shares stays shared: the collector never walks (and so never copies)
    # the objects made so far.
    import gc
    gc.collect()
    gc.freeze()
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(rfd, selectors.EVENT_READ)
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 16)
                except InterruptedError:
                    continue
                if not msg:
                    os._exit(0)  # the worker is gone
                req = json.loads(msg)
                try:
                    # The child is PID 1 of a new PID namespace; later children are ours again.
                    check(libc.unshare(CLONE_NEWPID), "a PID namespace")
                    pid = -1
                    try:
                        pid = os.fork()
                    finally:
                        if pid != 0:
                            check(libc.setns(own_pidns, CLONE_NEWPID), "back to our PID namespace")
                except OSError as e:
                    for fd in fds:
                        os.close(fd)
                    sock.send(json.dumps({"id": req["id"], "error": str(e)}).encode())
                    continue
                if pid == 0:
                    sock.close()
                    session(req["spec"], fds)
                for fd in fds:
                    os.close(fd)
                sock.send(json.dumps({"id": req["id"], "pid": pid}).encode())
            else:
                try:
                    os.read(rfd, 512)
                except BlockingIOError:
                    pass
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock.send(json.dumps({"exit": pid, "status": wait_status(st)}).encode())


main()
