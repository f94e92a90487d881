# File operations in a workspace, run by the worker as the workspace's user inside the session's
# sandbox: `list`, `read PATH`, `write PATH` (the text on stdin), `remove PATH`. The path was
# checked by the worker (relative, no `..`, no `.git`); here every component is opened relative
# to its directory without following symbolic links, so a link never leads out. One JSON answer
# on stdout, in the shape of the worker protocol's `FileResult`.
import errno, json, os, stat, sys

MAX = int(os.environ.get("SAGEWS_MAX_FILE", "1048576"))
MAX_FILES = 10000
op = sys.argv[1]
path = sys.argv[2] if len(sys.argv) > 2 else ""


def answer(**kw):
    sys.stdout.write(json.dumps(kw))
    sys.exit(0)


def fail(message):
    answer(kind="failed", message=message)


def parent_dir(path, create):
    """An fd of the directory holding `path`'s last component, and that component. Each
    directory is opened without following a symbolic link; missing ones are made if `create`."""
    parts = path.split("/")
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    for p in parts[:-1]:
        try:
            st = os.lstat(p, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(p, 0o755, dir_fd=fd)
            st = os.lstat(p, dir_fd=fd)
        if stat.S_ISLNK(st.st_mode):
            fail(f"{path} goes through {p}, a symbolic link: only regular files are opened here")
        nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd, parts[-1]


try:
    if op == "list":
        files = []
        for root, dirs, names in os.walk(".", followlinks=False):
            dirs[:] = sorted(d for d in dirs if not (root == "." and d == ".git"))
            for n in sorted(names):
                p = os.path.join(root, n)[2:]
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    files.append({"path": p, "size": st.st_size})
                    if len(files) > MAX_FILES:
                        fail(f"more than {MAX_FILES} files in the workspace")
        answer(kind="listed", files=files)
    if not path:
        fail("a file path is required")
    if op == "read":
        d, name = parent_dir(path, False)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=d)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fail(f"{path} is not a regular file")
        if st.st_size > MAX:
            fail(f"{path} is {st.st_size} bytes: files over {MAX} bytes are not opened here")
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX + 1)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"{path} is not a text file (not UTF-8)")
        answer(kind="read", path=path, data=text, size=len(data))
    if op == "write":
        data = sys.stdin.buffer.read(MAX + 1)
        if len(data) > MAX:
            fail(f"the text is over {MAX} bytes")
        d, name = parent_dir(path, True)
        # Checked before truncating, and without blocking on a FIFO.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644, dir_fd=d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            fail(f"{path} is not a regular file")
        os.ftruncate(fd, 0)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        answer(kind="written", path=path, size=len(data))
    if op == "remove":
        d, name = parent_dir(path, False)
        st = os.lstat(name, dir_fd=d)
        if stat.S_ISDIR(st.st_mode):
            fail(f"{path} is a directory: remove its files")
        os.unlink(name, dir_fd=d)
        answer(kind="removed", path=path)
    fail(f"unknown file operation {op!r}")
except FileNotFoundError:
    fail(f"no file {path} in the workspace")
except NotADirectoryError:
    fail(f"{path}: a part of the path is not a directory")
except OSError as e:
    if e.errno == errno.ELOOP:
        fail(f"{path} is a symbolic link: only regular files are opened here")
    fail(f"{path}: {e.strerror}")
