# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled I/O core of sllm_plugin.

Every function here works on raw addresses and file descriptors and releases the GIL for the
whole of its work, so Python worker threads calling it read in parallel. Python decides what to
read where (the plan); this module only moves and hashes bytes as fast as the kernel allows.

The checksum is XXH3-64 (seed 0) from the vendored xxHash 0.8 header, the same algorithm the
`xxhash` package exposes, so a checkpoint written in pure Python verifies here bit for bit.
"""

from libc.errno cimport errno, EINTR
from libc.stdint cimport uint64_t, uintptr_t
from libc.string cimport memcpy as c_memcpy, memset, strerror
from libc.stdlib cimport malloc, free
from posix.types cimport off_t

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include "xxhash.h"
    #include <sys/mman.h>
    #include <fcntl.h>
    #include <unistd.h>
    #ifndef MADV_HUGEPAGE
    #define MADV_HUGEPAGE 14
    #endif
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22
    #endif
    """
    ctypedef unsigned long long XXH64_hash_t
    XXH64_hash_t XXH3_64bits(const void* data, size_t length) nogil
    ssize_t c_pread "pread" (int fd, void* buf, size_t count, off_t offset) nogil
    int c_madvise "madvise" (void* addr, size_t length, int advice) nogil
    int MADV_HUGEPAGE
    int MADV_POPULATE_WRITE
    int MADV_POPULATE_READ
    int c_posix_fadvise "posix_fadvise" (int fd, off_t offset, off_t length, int advice) nogil
    int POSIX_FADV_DONTNEED
    void* c_mmap "mmap" (void* addr, size_t length, int prot, int flags, int fd, off_t offset) nogil
    int c_munmap "munmap" (void* addr, size_t length) nogil
    int c_mincore "mincore" (void* addr, size_t length, unsigned char* vec) nogil
    void* MAP_FAILED
    int PROT_READ
    int MAP_SHARED
    long c_sysconf "sysconf" (int name) nogil
    int _SC_PAGESIZE


cdef inline object _os_error(int err, str what, str path, long long offset):
    return OSError(err, f"{what} {path!r} at offset {offset}: {strerror(err).decode()}")


cdef bint _populate_supported = True


def read_chunk(int fd, uintptr_t addr, size_t length, long long offset, bint want_hash=False,
               str path="", bint populate=False):
    """Read `length` bytes at file `offset` into memory at `addr`; optionally hash them.

    With `populate`, the destination pages are faulted in first with one
    madvise(MADV_POPULATE_WRITE) call (Linux 5.14+; skipped silently where unsupported):
    one kernel entry for the whole range instead of a fault per 4 KiB page inside the read,
    measured 20% faster into fresh memory on the reference VM.

    Returns (bytes_read, xxh3_64 or None). Short reads are retried until end of file, so
    bytes_read < length means the file ended early (the caller names the truncated tensor).
    An error raises OSError carrying errno, the path and the offset of the failed read.
    """
    global _populate_supported
    cdef size_t done = 0
    cdef ssize_t n = 0
    cdef int err = 0
    cdef char* dst = <char*>addr
    cdef XXH64_hash_t h = 0
    cdef uintptr_t page_start
    cdef bint do_populate = populate and _populate_supported and length > 0
    with nogil:
        if do_populate:
            page_start = addr & ~(<uintptr_t>4095)
            if c_madvise(<void*>page_start, addr + length - page_start, MADV_POPULATE_WRITE) != 0:
                do_populate = False
        while done < length:
            n = c_pread(fd, dst + done, length - done, <off_t>(offset + <long long>done))
            if n > 0:
                done += <size_t>n
            elif n == 0:
                break
            elif errno == EINTR:
                continue
            else:
                err = errno
                break
        if err == 0 and want_hash:
            h = XXH3_64bits(dst, done)
    if populate and length > 0 and not do_populate:
        _populate_supported = False  # old kernel (EINVAL): plain first-touch faults from now on
    if err != 0:
        raise _os_error(err, "read of", path, offset + <long long>done)
    return done, (h if want_hash else None)


def populate(uintptr_t addr, size_t length):
    """Fault in [addr, addr+length) for writing, ahead of a read that will land there.

    MADV_POPULATE_WRITE where the kernel has it (5.14+), else a write per 4 KiB page.
    """
    global _populate_supported
    cdef uintptr_t page_start = addr & ~(<uintptr_t>4095)
    cdef uintptr_t p
    cdef int rc = -1
    if length == 0:
        return
    with nogil:
        if _populate_supported:
            rc = c_madvise(<void*>page_start, addr + length - page_start, MADV_POPULATE_WRITE)
        if rc != 0:
            # Only bytes inside the range are written: they are about to be overwritten.
            p = addr
            while p < addr + length:
                memset(<void*>p, 0, 1)
                p = (p & ~(<uintptr_t>4095)) + 4096
    if rc != 0:
        _populate_supported = False


def populate_read(uintptr_t addr, size_t length, str path="", long long offset=0):
    """Map [addr, addr+length) of a file mapping for reading, reading from disk what is not cached.

    One MADV_POPULATE_READ call (Linux 5.14+) instead of one fault per page; elsewhere a read
    per 4 KiB page. Called by several threads on disjoint ranges, it reads a file in parallel
    through the page cache. An I/O error is raised as OSError naming `path` (a plain page
    fault would have killed the process with SIGBUS).
    """
    cdef uintptr_t page_start = addr & ~(<uintptr_t>4095)
    cdef uintptr_t p
    cdef volatile char sink
    cdef int rc = -1
    cdef int err = 0
    if length == 0:
        return
    with nogil:
        rc = c_madvise(<void*>page_start, addr + length - page_start, MADV_POPULATE_READ)
        if rc != 0:
            err = errno
    if rc == 0:
        return
    if err != 22:  # anything but EINVAL (advice unknown to this kernel) is a real failure
        raise _os_error(err, "mapping", path, offset)
    with nogil:
        p = addr
        while p < addr + length:
            sink = (<char*>p)[0]
            p = (p & ~(<uintptr_t>4095)) + 4096


def xxh3_64(uintptr_t addr, size_t length):
    """XXH3-64 (seed 0) of `length` bytes at `addr`, computed without the GIL."""
    cdef XXH64_hash_t h
    with nogil:
        h = XXH3_64bits(<const void*>addr, length)
    return h


def copy_memory(uintptr_t dst, uintptr_t src, size_t length):
    """memcpy without the GIL; the benchmark's raw memory-copy limit."""
    with nogil:
        c_memcpy(<void*>dst, <const void*>src, length)


def fill_memory(uintptr_t dst, size_t length, int value=0):
    """memset without the GIL: faults pages in so a later measurement excludes first touch."""
    with nogil:
        memset(<void*>dst, value, length)


def advise_hugepages(uintptr_t addr, size_t length):
    """Ask for transparent huge pages on [addr, addr+length).

    Reading into fresh memory is dominated by first-touch page faults (one per 4 KiB page);
    with 2 MiB pages there are 512 times fewer. Returns False where the kernel declines.
    """
    cdef int rc
    with nogil:
        rc = c_madvise(<void*>addr, length, MADV_HUGEPAGE)
    return rc == 0


def evict_from_page_cache(int fd):
    """Drop a file's clean pages from the page cache (posix_fadvise DONTNEED); no root needed."""
    cdef int rc
    with nogil:
        rc = c_posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    if rc != 0:
        raise OSError(rc, f"posix_fadvise(DONTNEED) failed: {strerror(rc).decode()}")


def resident_fraction(int fd, size_t size):
    """Share of a file's pages that sit in the page cache now (mincore), 0.0 to 1.0.

    Decides buffered versus direct reads: a file in the page cache is read fastest through it,
    a cold one fastest with O_DIRECT, which also keeps the cache clean for other processes.
    """
    if size == 0:
        return 1.0
    cdef long page = c_sysconf(_SC_PAGESIZE)
    cdef size_t npages = (size + <size_t>page - 1) // <size_t>page
    cdef void* mapped
    cdef unsigned char* vec
    cdef size_t i, resident = 0
    cdef int rc = 0
    cdef int err = 0
    with nogil:
        mapped = c_mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0)
        if mapped == MAP_FAILED:
            err = errno
    if mapped == MAP_FAILED:
        raise _os_error(err, "mmap of", f"fd {fd}", 0)
    vec = <unsigned char*>malloc(npages)
    if vec == NULL:
        c_munmap(mapped, size)
        raise MemoryError()
    with nogil:
        rc = c_mincore(mapped, size, vec)
        if rc != 0:
            err = errno
        else:
            for i in range(npages):
                resident += vec[i] & 1
        c_munmap(mapped, size)
    free(vec)
    if rc != 0:
        raise _os_error(err, "mincore of", f"fd {fd}", 0)
    return resident / <double>npages
