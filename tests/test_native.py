"""The kernel library and its Python side agree: every exported function is declared once, in fiddler_native.h,
and gets its ctypes signature from there; the limits and the structs Python mirrors are those the library was
built with; a limit changed in native/limits.py reaches the C code (a build the next process reuses), and a
build without the limits stops."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from fiddler_moe.native import build, kernels, limits
from fiddler_moe.native.shm_call import LayerCall
from fiddler_moe.native.shm_serve import _Expert
from fiddler_moe.protocol.shm import SlotAddresses

needs_library = pytest.mark.skipif(not kernels.available(), reason="the kernel library is not built on this machine")


def exported_functions(lib: ctypes.CDLL) -> set[str]:
    """The fiddler_* functions the shared library defines, from its dynamic symbol table."""
    listing = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True, text=True, check=True)
    return {fields[2] for fields in map(str.split, listing.stdout.splitlines())
            if len(fields) == 3 and fields[1] == "T" and fields[2].startswith("fiddler_")}


@needs_library
def test_the_header_declares_every_exported_function_with_the_signature_ctypes_uses():
    lib = kernels.library()
    declared = build.signatures()
    for source in build.SOURCES:  # so that the compiler holds each definition to the header's prototype
        assert '#include "fiddler_native.h"' in source.read_text(), source.name
    if shutil.which("nm"):
        assert exported_functions(lib) == set(declared)
    for name, (argtypes, restype) in declared.items():
        function = getattr(lib, name)
        assert (function.argtypes, function.restype) == (argtypes, restype), name
    assert declared["fiddler_parked_watch"] == ([ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64],
                                                ctypes.c_int)
    assert declared["fiddler_gather_rows"] == ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                               ctypes.c_void_p], None)
    assert declared["fiddler_serve_requests"][1] is ctypes.c_int64
    assert declared["fiddler_combine"][0][3] is ctypes.c_int  # weights_bf16


def test_the_header_reader_maps_the_types_it_knows_and_refuses_the_rest(tmp_path):
    header = tmp_path / "fiddler_native.h"
    header.write_text("""/* a comment; with a semicolon */
#ifndef X
#define X
typedef struct thing { int a; double b[4]; } thing;
const char *fiddler_name(const thing *t, uint32_t n,
                         double scale);
void fiddler_none(void);
#endif
""")
    assert build.signatures(header) == {
        "fiddler_name": ([ctypes.c_void_p, ctypes.c_uint32, ctypes.c_double], ctypes.c_void_p),
        "fiddler_none": ([], None)}
    refused = {"float fiddler_f(int64_t n);": "`float`", "int fiddler_f(size_t n);": "`size_t n`",
               "int fiddler_f(int64_t);": "`int64_t`", "int fiddler_f();": "fiddler_f(void)",
               "extern int fiddler_count;": "cannot read", "int fiddler_f(int (*g)(int));": "cannot read",
               "int fiddler_f(int n); int fiddler_f(int n);": "declared twice", "/* nothing */": "no fiddler_*"}
    for text, says in refused.items():
        header.write_text(text)
        with pytest.raises(ValueError, match="fiddler_native.h") as info:
            build.signatures(header)
        assert says in str(info.value), text


@needs_library
def test_the_library_reports_the_limits_and_struct_sizes_python_uses():
    lib = kernels.library()
    for name, value in limits.values().items():
        assert lib.fiddler_constant(name.encode()) == value, name
    assert kernels.MAX_ROWS == limits.MAX_ROWS
    for struct, mirror in [("lane_slots", SlotAddresses), ("lane_expert", _Expert), ("layer_call", LayerCall)]:
        assert lib.fiddler_constant(f"sizeof {struct}".encode()) == ctypes.sizeof(mirror), struct
    assert lib.fiddler_constant(b"MAX_NOTHING") == -1


@needs_library
def test_a_limit_changed_in_python_reaches_the_c_code_and_the_build_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path))
    monkeypatch.setattr(limits, "MAX_PAIRS", 32)
    kernels.library.cache_clear()
    try:
        lib = kernels.library()  # a build of its own: the limits are part of the cache key
        assert lib is not None and lib.fiddler_constant(b"MAX_PAIRS") == 32
        assert lib.fiddler_constant(b"sizeof layer_call") == ctypes.sizeof(LayerCall) - 3 * 32 * 8
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no build folder left behind
        mtime = built[0].stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.available() and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        kernels.library.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_build_without_the_limits_stops_and_says_where_they_come_from():
    for source in build.SOURCES:
        done = subprocess.run(["cc", "-fsyntax-only", "-fopenmp", "-mavx2", "-mfma", str(source)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "comes from native/limits.py" in done.stderr, source.name
