# The engine driver: runs inside the session's python3 (or sage's python) as the workspace's
# user. Cells arrive on fd 3 ("<length>\n<utf-8 code>"); their output goes to fd 1 and fd 2 as
# any program's would; after each cell a marker ends both streams, the cell's pictures go to
# fd 4 ("image <mime> <base64>\n" each), then its status ("ok\n", ...).
# The same code serves a session forked from the engine server (zygote.py, appended to this
# file there): it prepares `base` once, and each session's `serve` starts from a copy of it.
import ast, os, sys, traceback

engine = os.environ.pop("SAGEWS_ENGINE", "python3")
preparse = None
base = {"__name__": "__main__", "__builtins__": __builtins__}
if engine == "sage":
    exec("from sage.all import *", base)
    # Line for line (as Sage's own REPL does): tracebacks name the lines the person wrote.
    from sage.repl.preparse import preparse


def readline():
    line = b""
    while not line.endswith(b"\n"):
        c = ctrl.read(1)
        if not c:
            sys.exit(0)
        line += c
    return line


def readn(n):
    data = b""
    while len(data) < n:
        chunk = ctrl.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


def run(code):
    try:
        if preparse is not None:
            code = preparse(code)
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                if not show_graphics(value):
                    print(repr(value))
        return "ok"
    except KeyboardInterrupt:
        print("KeyboardInterrupt", file=sys.stderr)
        return "interrupted"
    except SystemExit:
        return "ok"
    except BaseException:
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next)
        return "error"


# Pictures made by the cell other than matplotlib's figures (Sage's graphics), as status lines.
pictures = []


def show_graphics(value):
    """A Sage plot echoed by a cell is shown as a picture, as Sage's notebook does."""
    if engine != "sage":
        return False
    from sage.plot.graphics import Graphics

    multi = type(value).__name__ in ("GraphicsArray", "MultiGraphics")
    if not (isinstance(value, Graphics) or multi):
        return False
    import base64, tempfile

    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        value.save(f.name, dpi=96)
        data = open(f.name, "rb").read()
    if len(data) > max_image:
        print(f"the picture is {len(data)} bytes as PNG, over the limit of {max_image}: not shown",
              file=sys.stderr)
    else:
        pictures.append(b"image image/png " + base64.b64encode(data) + b"\n")
    return True


def figures():
    """The cell's matplotlib figures as PNG images on fd 4, then closed (a cell's pictures are
    shown once, as a notebook would)."""
    out = pictures[:]
    pictures.clear()
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return out
    import base64, io

    for n in plt.get_fignums():
        buf = io.BytesIO()
        try:
            plt.figure(n).savefig(buf, format="png", dpi=96, bbox_inches="tight")
        except Exception as e:
            print(f"figure {n} could not be drawn: {e}", file=sys.stderr)
            continue
        data = buf.getvalue()
        if len(data) > max_image:
            print(
                f"figure {n} is {len(data)} bytes as PNG, over the limit of {max_image}: not shown",
                file=sys.stderr,
            )
            continue
        out.append(b"image image/png " + base64.b64encode(data) + b"\n")
    plt.close("all")
    return out


def serve():
    """Runs cells from fd 3 until it closes. Only this process speaks for the session: a child
    forked by a cell closes the control pipes, and one that leaks out of its cell exits instead
    of reading the next cell."""
    global ctrl, status, marker, max_image, namespace
    ctrl = os.fdopen(3, "rb", buffering=0)
    status = os.fdopen(4, "wb", buffering=0)
    marker = os.environ.pop("SAGEWS_MARKER").encode()
    max_image = int(os.environ.pop("SAGEWS_MAX_IMAGE", "2097152"))
    namespace = dict(base)
    main_pid = os.getpid()

    def _in_child():
        for fd in (3, 4):
            try:
                os.close(fd)
            except OSError:
                pass

    os.register_at_fork(after_in_child=_in_child)
    status.write(b"ready\n")
    while True:
        images = []
        try:
            n = int(readline())
            code = readn(n).decode("utf-8", "replace")
            result = run(code)
            try:
                images = figures()
            except Exception:
                traceback.print_exc()
        except KeyboardInterrupt:
            result = "interrupted"
        if os.getpid() != main_pid:
            os._exit(0)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os.write(1, marker)
        os.write(2, marker)
        for image in images:
            status.write(image)
        status.write(result.encode() + b"\n")


if "SAGEWS_ZYGOTE" not in os.environ:
    serve()
