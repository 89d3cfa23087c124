#!/bin/sh
# Assemble /opt/criu-supervisor: CRIU, a Python runtime, the supervisor, tini and every library they
# load, so that the directory works copied into any glibc x86-64 image (or one with nothing; musl untested):
# its programs run through the bundle's own loader with the bundle's lib/ as library path (the shim,
# bundle.py), so nothing of the app's image is loaded and nothing in the app's environment is changed.
# Run in the bundle stage of images/base/Dockerfile, after the Debian packages are in.
set -eu
B=/opt/criu-supervisor
PY=python3.13
rm -rf "$B"
mkdir -p "$B/bin" "$B/lib/programs" "$B/lib/python3/dist-packages"

# bin/ holds what runs as it is (static programs, and links to the shim); lib/programs/ the dynamically
# linked ones, which only ever run through the bundle's loader.
cp /usr/sbin/criu "$B/lib/programs/criu"
cp /usr/bin/$PY "$B/lib/programs/$PY"
cp /usr/bin/tini-static "$B/bin/tini"
cp /criu-supervisor-shim "$B/bin/criu-supervisor-shim"

# The standard library, without its tests, GUI, terminal UI and build files. The rest stays (sqlite3,
# unittest, venv...): in the base image this Python is also the apps' python3.
cp -a /usr/lib/$PY "$B/lib/$PY"
cd "$B/lib/$PY"
rm -rf test idlelib tkinter turtledemo turtle.py ensurepip lib2to3 pydoc_data _pyrepl __phello__ \
       config-3.13-x86_64-linux-gnu curses site-packages dist-packages
rm -f lib-dynload/_curses* lib-dynload/readline* lib-dynload/_dbm* lib-dynload/_gdbm* lib-dynload/_tkinter* lib-dynload/xxlimited* \
      lib-dynload/_test* lib-dynload/_ctypes_test* lib-dynload/_xxtestfuzz*
find . -name '__pycache__' -prune -exec rm -rf {} +
cd /

# The supervisor's dependencies, from Debian's packages (pip cannot reach an index in builds here).
D=/usr/lib/python3/dist-packages
# supervisord 4.2.5 imports pkg_resources, which needs packaging, platformdirs, jaraco and more_itertools.
for item in click requests urllib3 idna charset_normalizer certifi watchdog supervisor pycriu google \
            zstandard lz4 seccomp.cpython-313-x86_64-linux-gnu.so \
            pkg_resources packaging jaraco more_itertools setuptools/_vendor/platformdirs; do
    cp -a "$D/$item" "$B/lib/python3/dist-packages/"
done
python3 -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$B/lib/python3/dist-packages" /src
rm -rf "$B/lib/python3/dist-packages/bin" "$B/lib/python3/dist-packages"/*.dist-info \
       "$B/lib/python3/dist-packages/pkg_resources/tests" "$B/lib/python3/dist-packages/supervisor/tests" \
       "$B/lib/python3/dist-packages/zstandard"/_cffi*  # (zstandard's C backend is the one used)
find "$B" -name '__pycache__' -prune -exec rm -rf {} +
# requests loads certifi's CA bundle when imported, and Debian's certifi names the system's, which an
# image may not have: the bundle carries its own copy (the supervisor itself only speaks plain HTTP,
# to the clouds' metadata services).
cp -L /etc/ssl/certs/ca-certificates.crt "$B/lib/python3/dist-packages/certifi/cacert.pem"
cat > "$B/lib/python3/dist-packages/certifi/core.py" <<'CERTIFI'
"""certifi in the criu-supervisor bundle: the CA certificates it carries (Debian's, at build time)."""
import os


def where() -> str:
    return os.path.join(os.path.dirname(__file__), "cacert.pem")


def contents() -> str:
    with open(where(), encoding="ascii") as handle:
        return handle.read()
CERTIFI

# Every library the binaries and extension modules load, and the loader itself.
{
    for elf in "$B/lib/programs/criu" "$B/lib/programs/$PY" $(find "$B/lib" -name '*.so' -o -name '*.so.*'); do
        ldd "$elf" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
    done
} | sort -u | while read -r library; do
    cp -L "$library" "$B/lib/"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$B/lib/ld-linux-x86-64.so.2"
# (glibc's own objects are left exactly as Debian built them: the loader and libc are touchy about
# rewriting, and Debian strips them already.)
for object in "$B/lib/programs/criu" "$B/lib/programs/$PY" "$B/lib"/*.so*; do
    case "$object" in */ld-linux-x86-64.so.2|*/libc.so.6) continue ;; esac
    strip --strip-unneeded "$object" 2>/dev/null || true
done

# Executables are left as Debian built them (patchelf breaks the python binary): they run through the
# bundle's loader with its library path, from a link to the loader named after the program
# (libexec/NAME), so that ps shows the program's name (see images/base/shim.c, supervisor_pkg/bundle.py).
# Libraries get the bundle's lib/ as RPATH, so that what the loader opens later (Python's extension
# modules) finds its own libraries in the bundle too.
find "$B/lib" ! -path "$B/lib/programs/*" \( -name '*.so' -o -name '*.so.*' \) ! -name 'ld-linux-x86-64.so.2' ! -name 'libc.so.6' | while read -r object; do
    patchelf --force-rpath --set-rpath "$B/lib" "$object"
done
mkdir -p "$B/libexec"
for name in criu-supervisor python3 criu supervisord supervisorctl; do
    ln -s ../lib/ld-linux-x86-64.so.2 "$B/libexec/$name"
done

# The entry points are the shim, under the names it answers to (images/base/shim.c): criu-supervisor
# (the supervisor, its signals blocked until its handlers are in), python3 (the bundle's Python, for the
# base image's apps and a re-exec of sys.executable), criu (CRIU, for `docker exec ... criu check`), and
# supervisord and supervisorctl (lib/NAME.py).
for name in criu-supervisor python3 criu supervisord supervisorctl; do
    ln -s criu-supervisor-shim "$B/bin/$name"
done
cat > "$B/lib/criu-supervisor.py" <<'ENTRY'
from supervisor_pkg.entry import main

main()
ENTRY
for tool in supervisord supervisorctl; do
    printf 'import sys\n\nfrom supervisor.%s import main\n\nsys.exit(main())\n' "$tool" > "$B/lib/$tool.py"
done

# Byte-compile once, here, so that a read-only image never recompiles at start-up. The standard library
# is kept as bytecode only (next to where its sources were: about half its size); the supervisor's
# own packages keep their sources, for readable tracebacks.
"$B/bin/python3" -I -m compileall -q -b -j 0 "$B/lib/$PY" >/dev/null
find "$B/lib/$PY" -name '*.py' -delete
"$B/bin/python3" -I -m compileall -q -j 0 "$B/lib/python3" >/dev/null
du -sh "$B"
